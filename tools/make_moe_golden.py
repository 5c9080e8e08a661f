"""Golden files for the mixture-of-experts tests (qwen3moe, qwen2moe), so CI, which has
neither torch nor llama.cpp, still checks cpuq against both:

* tests/golden/moe_logits.npz: HF transformers' float32 logits on tiny MoE checkpoints
  (both architectures, both expert layouts: one matrix per expert and the fused
  gate_up_proj stacks; f32 storage, so HF computes the exact function of the F32 GGUF) for
  make_runtime_golden.IDS, and llama.cpp's logits on the F16 GGUF cpuq converts from each
  (which also shows llama.cpp loads cpuq's files). As make_runtime_golden does, it keeps a
  fixed random set of N_COLUMNS vocabulary columns plus each reference's top-1.
* tests/golden/moe_convert.json: the sha256 and size of llama.cpp's own f16, q8_0 and
  q4_k_m files (convert_hf_to_gguf.py, then llama-quantize Q4_K_M, the mix) of small bf16
  MoE checkpoints, so tests/convert/test_convert_moe.py checks cpuq's files are
  byte-identical without llama.cpp.

    .venv/bin/python tools/make_moe_golden.py   # writes both files

Needs the peer venvs and llama.cpp's source and llama-quantize (tools/peer_env.sh):
CPUQ_HF_VENV (torch + transformers, also runs convert_hf_to_gguf.py), CPUQ_PEER_VENV
(llama-cpp-python). The checkpoints are rebuilt by the tests from the same arguments, which
make_tiny_checkpoint draws deterministically; the golden files keep those arguments.

Imports numpy, cpuq and the sibling tools; runs torch and llama.cpp only in subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuq  # noqa: E402
from make_runtime_golden import HF_PYTHON, IDS, PEER, PEER_PYTHON, reference_logits  # noqa: E402
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOGITS_OUT = ROOT / "tests" / "golden" / "moe_logits.npz"
CONVERT_OUT = ROOT / "tests" / "golden" / "moe_convert.json"
LLAMA_CPP = PEER / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
LLAMA_QUANTIZE = PEER / "llama-quantize"
PEER_LIB = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "lib" / "python3.11" / "site-packages" / "lib"
LLAMA_CPP_PYTHON = "0.3.36"

# name -> (arch, make_tiny_checkpoint keyword arguments): the logits cases, f32 storage.
# qwen3moe's defaults have 8 experts (weights renormalized), qwen2moe's 6 and a shared expert.
# qwen2moe untied, as the released models are: llama.cpp's qwen2moe loader requires
# output.weight (llm_build_qwen2moe has no tied fallback), so it cannot load a tied file.
LOGITS_CASES: dict[str, tuple[str, dict]] = {
    "qwen3moe": ("qwen3moe", {"dtype": "f32", "seed": 21}),
    "qwen3moe_fused": ("qwen3moe", {"dtype": "f32", "seed": 22, "fused_experts": True, "tied": False}),
    "qwen2moe": ("qwen2moe", {"dtype": "f32", "seed": 23, "tied": False}),
    "qwen2moe_fused": ("qwen2moe", {"dtype": "f32", "seed": 24, "fused_experts": True, "tied": False}),
}
# The byte-identity cases, bf16 storage: 8 experts at row length 256 (llama-quantize's
# 8-expert bumps, attn_output's Q5_K needing 4 heads of 64; the stacks in Q4_K/Q6_K proper),
# and 6 fused experts at row length 64 (no bumps; the stacks' shape fallbacks).
CONVERT_CASES: dict[str, tuple[str, dict]] = {
    "qwen3moe": ("qwen3moe", {"dtype": "bf16", "seed": 31, "hidden_size": 256, "head_dim": 64,
                              "moe_intermediate_size": 256}),
    "qwen2moe_fused": ("qwen2moe", {"dtype": "bf16", "seed": 32, "fused_experts": True, "tied": False}),
}
QTYPES = ("f16", "q8_0", "q4_k_m")


def build_logits_case(name: str, where: Path) -> Path:
    arch, kwargs = LOGITS_CASES[name]
    return make_tiny_checkpoint(Path(where) / name, arch=arch, **kwargs)


def build_convert_case(name: str, where: Path, cases: dict[str, tuple[str, dict]] = CONVERT_CASES) -> Path:
    """The checkpoint in a folder named tiny-<name>: the name becomes general.name."""
    arch, kwargs = cases[name]
    return make_tiny_checkpoint(Path(where) / f"tiny-{name}", arch=arch, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(what: str, args: list, env: dict) -> None:
    """Run a llama.cpp program (arguments str()-ed); ToolError with its last output line."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env={**os.environ, **env},
                       timeout=600)
    if r.returncode != 0:
        last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{what} failed (exit {r.returncode}): {last}")


def llama_cpp_files(src: Path, where: Path, convert_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """llama.cpp's f16 and q8_0 (convert_hf_to_gguf.py, with convert_args) and q4_k_m
    (llama-quantize of the f16 file, the Q4_K_M mix) files of the checkpoint `src`."""
    files = {}
    for qtype in ("f16", "q8_0"):
        files[qtype] = where / f"{src.name}-{qtype}.gguf"
        _run("convert_hf_to_gguf.py", [HF_PYTHON, LLAMA_CPP / "convert_hf_to_gguf.py", src, "--outtype", qtype,
                                        *convert_args, "--outfile", files[qtype]],
             {"PYTHONPATH": str(LLAMA_CPP / "gguf-py")})
    files["q4_k_m"] = where / f"{src.name}-q4_k_m.gguf"
    _run("llama-quantize", [LLAMA_QUANTIZE, files["f16"], files["q4_k_m"], "Q4_K_M", 2],
         {"LD_LIBRARY_PATH": str(PEER_LIB)})
    return files


def logits_golden(tmp: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"ids": np.array(IDS, np.int64), "cases": np.array(json.dumps(LOGITS_CASES))}
    for name in LOGITS_CASES:
        entries = reference_logits(name, build_logits_case(name, tmp), tmp)
        top1 = np.mean(entries[f"{name}/hf_top1"] == entries.pop(f"{name}/llama_top1"))
        out.update(entries)
        print(f"{name}: logits done (llama.cpp F16 top-1 agrees with HF at {top1:.0%} of positions)")
    return out


def convert_golden(tmp: Path, convert_cases: dict[str, tuple[str, dict]] = CONVERT_CASES,
                   convert_args=lambda kwargs: ()) -> dict:
    """The golden of convert_cases; convert_args(a case's arguments) -> convert_hf_to_gguf.py's
    extra arguments for it."""
    cases = {}
    for name, (arch, kwargs) in convert_cases.items():
        src = build_convert_case(name, tmp, convert_cases)
        files = llama_cpp_files(src, tmp, convert_args(kwargs))
        cases[name] = {"arch": arch, "checkpoint": kwargs, "folder": src.name,
                       "files": {q: {"sha256": sha256(p), "bytes": p.stat().st_size} for q, p in files.items()}}
        for qtype, path in files.items():  # informational: the golden is llama.cpp's, whatever cpuq writes
            same = sha256(cpuq.convert(src, tmp / f"cpuq-{name}-{qtype}.gguf", qtype)) == sha256(path)
            print(f"{name} {qtype}: cpuq's file {'is' if same else 'is NOT'} byte-identical to llama.cpp's")
    return {"cases": cases, "llama_quantize_type": {"q4_k_m": "Q4_K_M"}, "llama_cpp_python": LLAMA_CPP_PYTHON}


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_moe_golden.py takes none")
    for python in (HF_PYTHON, PEER_PYTHON):
        if not python.is_file():
            raise ToolError(f"{python}: reference venv missing; run tools/peer_env.sh")
    for path in (LLAMA_CPP / "convert_hf_to_gguf.py", LLAMA_QUANTIZE):
        if not path.is_file():
            raise ToolError(f"{path}: missing; run tools/peer_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        logits = logits_golden(Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_golden(Path(tmp))
    with output_file(LOGITS_OUT) as part, open(part, "wb") as f:  # a file object: savez would add ".npz"
        np.savez_compressed(f, **logits)
    with output_file(CONVERT_OUT) as part:
        part.write_text(json.dumps(converted, indent=2) + "\n")
    print(f"wrote {LOGITS_OUT} ({LOGITS_OUT.stat().st_size / 1e6:.1f} MB) and {CONVERT_OUT}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
