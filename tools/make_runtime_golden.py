"""Golden logits for the runtime tests: HF transformers (float32) on tiny Qwen2 / Qwen3 /
Llama checkpoints, and llama.cpp on the F16 GGUF cpuq converts from each, so CI (which
has neither torch nor llama.cpp) still checks cpuq's forward pass against both.

    .venv/bin/python tools/make_runtime_golden.py   # writes tests/golden/runtime_logits.npz

Needs the peer venvs (tools/peer_env.sh): CPUQ_HF_VENV (torch + transformers) and
CPUQ_PEER_VENV (llama-cpp-python). The checkpoints are rebuilt by the tests from the same
(arch, overrides, seed), which make_tiny_checkpoint draws deterministically; the npz keeps
those arguments next to the results. To stay small it keeps, for every position, the
logits of a fixed random set of 4096 vocabulary columns plus each reference's top-1.

Imports numpy, cpuq and the sibling make_tiny_checkpoint; runs torch and llama.cpp only
in subprocesses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuq  # noqa: E402
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "runtime_logits.npz"
PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
HF_PYTHON = Path(os.environ.get("CPUQ_HF_VENV", PEER / "hf-venv")) / "bin" / "python"
PEER_PYTHON = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "bin" / "python"

# name -> (arch, make_tiny_checkpoint keyword arguments). f32 weights, so HF's float32
# forward pass computes the exact function of the F32 GGUF.
CASES: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen2", {"dtype": "f32", "seed": 1}),
    "qwen3": ("qwen3", {"dtype": "f32", "seed": 2}),
    "llama": ("llama", {"dtype": "f32", "seed": 3, "tied": False}),
    "qwen2_yarn": ("qwen2", {"dtype": "f32", "seed": 4, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}),
}
# 20 ids spread over the vocabulary (no special tokens); the tests feed them in two batches.
IDS = [9707, 11, 1879, 0, 13, 576, 4937, 5, 100, 2000, 30, 31, 151000, 77, 42, 3000, 12345, 999, 6, 88888]
N_COLUMNS = 4096

_HF = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
ids = json.loads(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    np.save(sys.argv[3], m(torch.tensor([ids])).logits[0].numpy().astype(np.float32))
"""

# llama.cpp with its default settings (f16 KV cache): "what llama.cpp achieves on the file".
_LLAMA = """
import json, sys
import numpy as np, llama_cpp
ids = json.loads(sys.argv[2])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[:len(ids)], dtype=np.float32))
"""


def build_case(name: str, where: Path) -> Path:
    arch, kwargs = CASES[name]
    return make_tiny_checkpoint(where / name, arch=arch, **kwargs)


def reference_logits(name: str, src: Path, tmp: Path) -> dict[str, np.ndarray]:
    """The golden entries of one case: HF's float32 logits of checkpoint `src` and
    llama.cpp's of cpuq's F16 file of it, on a fixed random set of N_COLUMNS vocabulary
    columns plus both references' top-1, and HF's top-1."""
    f16 = cpuq.convert(src, tmp / f"{name}-f16.gguf", "f16")
    hf, ll = tmp / f"{name}-hf.npy", tmp / f"{name}-llama.npy"
    _reference(HF_PYTHON, _HF, src, json.dumps(IDS), hf)
    _reference(PEER_PYTHON, _LLAMA, f16, json.dumps(IDS), ll)
    hf_logits, llama_logits = np.load(hf), np.load(ll)
    rng = np.random.default_rng(0)
    cols = set(rng.choice(hf_logits.shape[1], N_COLUMNS, replace=False).tolist())
    cols |= set(hf_logits.argmax(1).tolist()) | set(llama_logits.argmax(1).tolist())
    cols = np.array(sorted(cols), np.int64)
    return {f"{name}/columns": cols, f"{name}/hf": hf_logits[:, cols], f"{name}/llama_f16": llama_logits[:, cols],
            f"{name}/hf_top1": hf_logits.argmax(1), f"{name}/llama_top1": llama_logits.argmax(1)}


def _reference(python: Path, script: str, *args) -> None:
    """Run a reference side's script in its venv; ToolError with its last output line."""
    r = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{python} failed (exit {r.returncode}): {last}")


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_runtime_golden.py takes none")
    for python in (HF_PYTHON, PEER_PYTHON):
        if not python.is_file():
            raise ToolError(f"{python}: reference venv missing; run tools/peer_env.sh")
    out: dict[str, np.ndarray] = {"ids": np.array(IDS, np.int64), "cases": np.array(json.dumps(CASES))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in CASES:
            entries = reference_logits(name, build_case(name, tmp), tmp)
            entries.pop(f"{name}/llama_top1")  # the tests read HF's top-1 only
            out.update(entries)
            print(name, "done")
    with output_file(OUT) as tmp, open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a name
        np.savez_compressed(f, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run(main, sys.argv[1:])
