"""Golden logits for the Gated-DeltaNet hybrids (qwen35, qwen35moe, qwen3next), so CI, which
has neither torch nor llama.cpp, still checks cpuq's forward pass against HF transformers and
llama.cpp:

* tests/golden/hybrid_logits.npz: HF transformers' float32 logits (f32 storage, so HF
  computes the exact function of the F32 GGUF) on tiny checkpoints of the three classes
  (make_tiny_checkpoint's archs: dense with as many value as key heads, fewer key heads with
  the mtp.* tensors, the ...ForConditionalGeneration layout, MoE with split and with stacked
  experts, Qwen3-Next) for IDS, 80 ids: more than one 64-token chunk of transformers'
  chunked delta rule, so a prompt crosses a chunk boundary. To stay small it keeps, for
  every position, a fixed random set of N_COLUMNS vocabulary columns plus HF's top-1.
  Beside them, llama.cpp's logits (llama-cpp-python, its default settings: f16 KV cache) on
  the F16 and the F32 GGUF cpuq converts from each checkpoint, on the same columns: llama.cpp
  loads and runs cpuq's hybrid files; on the F32 file it computes HF's function (the check
  that it agrees), and on the F16 file it gives the tests llama.cpp's own error from HF.

    .venv/bin/python tools/make_hybrid_golden.py   # writes tests/golden/hybrid_logits.npz

Needs the peer venvs (tools/peer_env.sh): CPUQ_HF_VENV (torch + transformers) and
CPUQ_PEER_VENV (llama-cpp-python). The tests rebuild the checkpoints from the arguments the
npz keeps (`cases`), which make_tiny_checkpoint draws deterministically.

npz entries: ids (80,) int64; cases: JSON {name: [arch, make_tiny_checkpoint kwargs]};
versions: JSON {transformers, torch}; llama_cpp: llama-cpp-python's version; per case
<name>/columns (k,) int64 sorted,
<name>/hf (80, k) float32, <name>/hf_top1 (80,) int64 (over the whole vocabulary),
<name>/llama_f16 and <name>/llama_f32 (80, k) float32 (the same columns), <name>/llama_f16_top1
and <name>/llama_f32_top1 (80,) int64 (over the whole vocabulary).

Imports numpy, cpuq and the sibling tools; runs torch and llama.cpp only in subprocesses.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuq  # noqa: E402
from make_runtime_golden import HF_PYTHON, IDS as RUNTIME_IDS, PEER_PYTHON  # noqa: E402
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "hybrid_logits.npz"

# name -> (arch, make_tiny_checkpoint keyword arguments), f32 storage. qwen35's default has as
# many value as key heads (Qwen3.5-0.8B/2B); qwen35_mtp has 2 key heads for 4 value heads (the
# converter's V-head reorder) and the mtp.* tensors transformers skips; the MoE and Qwen3-Next
# cases are untied, as those releases are.
CASES: dict[str, tuple[str, dict]] = {
    "qwen35": ("qwen35", {"dtype": "f32", "seed": 41}),
    "qwen35_mtp": ("qwen35", {"dtype": "f32", "seed": 42, "mtp": True, "linear_num_key_heads": 2,
                              "linear_num_value_heads": 4}),
    "qwen35_conditional": ("qwen35", {"dtype": "f32", "seed": 43, "conditional": True, "mtp": True,
                                      "tied": False}),
    "qwen35moe_split": ("qwen35moe", {"dtype": "f32", "seed": 44, "tied": False, "fused_experts": False}),
    "qwen35moe_fused": ("qwen35moe", {"dtype": "f32", "seed": 45, "tied": False, "fused_experts": True,
                                      "mtp": True}),
    "qwen3next": ("qwen3next", {"dtype": "f32", "seed": 46, "tied": False, "mtp": True}),
}
# make_runtime_golden's 20 ids, then 60 more drawn below the special tokens (151643 on).
IDS = RUNTIME_IDS + np.random.default_rng(26).integers(0, 151643, 60).tolist()
N_COLUMNS = 1024

# The class config.json names (AutoModelForCausalLM would take the text model out of a
# ...ForConditionalGeneration checkpoint; the golden is of the class the checkpoint declares).
_HF = """
import json, sys
import numpy as np, torch, transformers
torch.set_num_threads(2)
src, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cls = getattr(transformers, json.load(open(src + "/config.json"))["architectures"][0])
m = cls.from_pretrained(src, dtype=torch.float32).eval()
with torch.no_grad():
    np.save(out, m(torch.tensor([ids])).logits[0].numpy().astype(np.float32))
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))
"""

# llama.cpp with its default settings (f16 KV cache), as make_runtime_golden's: "what
# llama.cpp achieves on the file"; a context and batch that hold all 80 ids in one call.
_LLAMA = """
import json, sys
import numpy as np, llama_cpp
ids = json.loads(sys.argv[2])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[:len(ids)], dtype=np.float32))
print(json.dumps({"llama_cpp": llama_cpp.__version__}))
"""


def build_case(name: str, where: Path) -> Path:
    arch, kwargs = CASES[name]
    return make_tiny_checkpoint(Path(where) / name, arch=arch, **kwargs)


def _reference(python: Path, script: str, src: Path, out: Path) -> dict:
    """Run a reference's script on `src` (a checkpoint or a GGUF file) for IDS, the logits
    saved to `out`; returns the versions it printed. ToolError with its last output line."""
    r = subprocess.run([python, "-c", script, src, json.dumps(IDS), out], capture_output=True, text=True)
    if r.returncode != 0:
        last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{python} failed on {src.name} (exit {r.returncode}): {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def hf_logits(src: Path, out: Path) -> dict:
    """HF's float32 logits of checkpoint `src` for IDS, saved to `out`; returns the versions."""
    return _reference(HF_PYTHON, _HF, src, out)


def llama_logits(gguf: Path, out: Path) -> dict:
    """llama.cpp's logits of the GGUF file `gguf` for IDS, saved to `out`; returns its version."""
    return _reference(PEER_PYTHON, _LLAMA, gguf, out)


def columns(logits: np.ndarray) -> np.ndarray:
    """The fixed random N_COLUMNS vocabulary columns plus every position's top-1, sorted."""
    cols = set(np.random.default_rng(0).choice(logits.shape[1], N_COLUMNS, replace=False).tolist())
    return np.array(sorted(cols | set(logits.argmax(1).tolist())), np.int64)


def golden(tmp: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"ids": np.array(IDS, np.int64), "cases": np.array(json.dumps(CASES))}
    versions, llama_versions = set(), set()
    for name in CASES:
        src = build_case(name, tmp)
        npy, llama_npy = tmp / f"{name}-hf.npy", tmp / f"{name}-llama.npy"
        versions.add(json.dumps(hf_logits(src, npy), sort_keys=True))
        logits = np.load(npy)
        cols = columns(logits)  # HF's: the llama.cpp references came later, the columns stay
        out.update({f"{name}/columns": cols, f"{name}/hf": logits[:, cols], f"{name}/hf_top1": logits.argmax(1)})
        print(f"{name}: {logits.shape[0]} positions, logits std {logits.std():.3f}")
        for qtype in ("f16", "f32"):
            llama_npy = tmp / f"{name}-llama-{qtype}.npy"
            gguf = cpuq.convert(src, tmp / f"{name}-{qtype}.gguf", qtype)
            llama_versions.add(llama_logits(gguf, llama_npy)["llama_cpp"])
            llama = np.load(llama_npy)
            out.update({f"{name}/llama_{qtype}": llama[:, cols], f"{name}/llama_{qtype}_top1": llama.argmax(1)})
            rel = np.sqrt(np.mean((llama[:, cols] - logits[:, cols]) ** 2) / np.mean(logits[:, cols] ** 2))
            print(f"  llama.cpp on cpuq's {qtype.upper()} file: {rel:.2e} relative RMS from HF, top-1 the same "
                  f"at {np.mean(llama.argmax(1) == logits.argmax(1)):.0%} of positions")
    (out["versions"],) = (np.array(v) for v in versions)  # one transformers for every case
    (out["llama_cpp"],) = (np.array(v) for v in llama_versions)  # and one llama-cpp-python
    return out


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_hybrid_golden.py takes none")
    for python in (HF_PYTHON, PEER_PYTHON):
        if not python.is_file():
            raise ToolError(f"{python}: reference venv missing; run tools/peer_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        entries = golden(Path(tmp))
    with output_file(OUT) as part, open(part, "wb") as f:  # a file object: savez would add ".npz"
        np.savez_compressed(f, **entries)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run(main, sys.argv[1:])
