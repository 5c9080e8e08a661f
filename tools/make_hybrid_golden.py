"""Golden logits for the Gated-DeltaNet hybrids (qwen35, qwen35moe, qwen3next), so CI, which
has no torch, still checks cpuq's forward pass against HF transformers:

* tests/golden/hybrid_logits.npz: HF transformers' float32 logits (f32 storage, so HF
  computes the exact function of the F32 GGUF) on tiny checkpoints of the three classes
  (make_tiny_checkpoint's archs: dense with as many value as key heads, fewer key heads with
  the mtp.* tensors, the ...ForConditionalGeneration layout, MoE with split and with stacked
  experts, Qwen3-Next) for IDS, 80 ids: more than one 64-token chunk of transformers'
  chunked delta rule, so a prompt crosses a chunk boundary. To stay small it keeps, for
  every position, a fixed random set of N_COLUMNS vocabulary columns plus HF's top-1.

    .venv/bin/python tools/make_hybrid_golden.py   # writes tests/golden/hybrid_logits.npz

Needs the HF peer venv (tools/peer_env.sh: CPUQ_HF_VENV, torch + transformers). The tests
rebuild the checkpoints from the arguments the npz keeps (`cases`), which make_tiny_checkpoint
draws deterministically.

npz entries: ids (80,) int64; cases: JSON {name: [arch, make_tiny_checkpoint kwargs]};
versions: JSON {transformers, torch}; per case <name>/columns (k,) int64 sorted,
<name>/hf (80, k) float32, <name>/hf_top1 (80,) int64 (over the whole vocabulary).

Imports numpy and the sibling tools; runs torch only in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_runtime_golden import HF_PYTHON, IDS as RUNTIME_IDS  # noqa: E402
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


def build_case(name: str, where: Path) -> Path:
    arch, kwargs = CASES[name]
    return make_tiny_checkpoint(Path(where) / name, arch=arch, **kwargs)


def hf_logits(src: Path, out: Path) -> dict:
    """HF's float32 logits of checkpoint `src` for IDS, saved to `out`; returns the versions
    that computed them. ToolError with the subprocess's last output line."""
    r = subprocess.run([HF_PYTHON, "-c", _HF, src, json.dumps(IDS), out], capture_output=True, text=True)
    if r.returncode != 0:
        last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{HF_PYTHON} failed on {src.name} (exit {r.returncode}): {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def columns(logits: np.ndarray) -> np.ndarray:
    """The fixed random N_COLUMNS vocabulary columns plus every position's top-1, sorted."""
    cols = set(np.random.default_rng(0).choice(logits.shape[1], N_COLUMNS, replace=False).tolist())
    return np.array(sorted(cols | set(logits.argmax(1).tolist())), np.int64)


def golden(tmp: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"ids": np.array(IDS, np.int64), "cases": np.array(json.dumps(CASES))}
    versions = set()
    for name in CASES:
        npy = tmp / f"{name}-hf.npy"
        versions.add(json.dumps(hf_logits(build_case(name, tmp), npy), sort_keys=True))
        logits = np.load(npy)
        cols = columns(logits)
        out.update({f"{name}/columns": cols, f"{name}/hf": logits[:, cols], f"{name}/hf_top1": logits.argmax(1)})
        print(f"{name}: {logits.shape[0]} positions, logits std {logits.std():.3f}")
    (out["versions"],) = (np.array(v) for v in versions)  # one transformers for every case
    return out


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_hybrid_golden.py takes none")
    if not HF_PYTHON.is_file():
        raise ToolError(f"{HF_PYTHON}: reference venv missing; run tools/peer_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        entries = golden(Path(tmp))
    with output_file(OUT) as part, open(part, "wb") as f:  # a file object: savez would add ".npz"
        np.savez_compressed(f, **entries)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run(main, sys.argv[1:])
