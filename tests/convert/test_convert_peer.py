"""cpuq.convert against llama.cpp itself: the same tiny HF checkpoint converted by cpuq and
by llama.cpp must give byte-identical GGUF files (header, every key/value, tensor infos,
tensor data, padding).

References (docs/llama_cpp_conventions.md section 0):
* f32/f16/bf16/q8_0: the vendored `convert_hf_to_gguf.py --outtype X`, run in the torch venv
  (CPUQ_HF_VENV, default ~/.cache/cpuq-peer/hf-venv; it also needs `sentencepiece`, which
  the converter imports even for BPE vocabularies) with the vendored gguf-py.
* pure q4_k/q6_k/q5_0: `convert_hf_to_gguf.py --outtype f16` then llama.cpp's
  `llama_model_quantize` with `pure = true` (llama-cpp-python in the peer venv, tools/peer_env.sh).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import cpuq
from make_tiny_checkpoint import make_tiny_checkpoint

PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
LLAMA_CPP = PEER / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
HF_PYTHON = Path(os.environ.get("CPUQ_HF_VENV", PEER / "hf-venv")) / "bin" / "python"
PEER_PYTHON = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "bin" / "python"

pytestmark = pytest.mark.peer

_QUANTIZE = """
import sys, llama_cpp
src, dst, ftype, pure = sys.argv[1:5]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.pure = pure == "pure"
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p))
"""
# cpuq type -> llama-quantize ftype whose default type it is (llama_ftype_get_default_type).
PURE_FTYPES = {"q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K", "q4_0": "Q4_0", "q5_0": "Q5_0"}


def _need(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{path} missing ({what})")


def llama_cpp_convert(src: Path, dst: Path, outtype: str) -> Path:
    _need(HF_PYTHON, "torch+transformers venv")
    _need(LLAMA_CPP / "convert_hf_to_gguf.py", "llama.cpp source, tools/peer_env.sh")
    if subprocess.run([HF_PYTHON, "-c", "import sentencepiece"], capture_output=True).returncode:
        pytest.skip(f"{HF_PYTHON} lacks sentencepiece (pip install sentencepiece)")
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    r = subprocess.run([HF_PYTHON, LLAMA_CPP / "convert_hf_to_gguf.py", src, "--outtype", outtype,
                        "--outfile", dst], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, pure: bool = True) -> Path:
    _need(PEER_PYTHON, "llama-cpp-python peer venv, tools/peer_env.sh")
    r = subprocess.run([PEER_PYTHON, "-c", _QUANTIZE, src, dst, ftype, "pure" if pure else "mix"],
                       capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


def _first_difference(a: bytes, b: bytes) -> str:
    return next((f"byte {i}" for i, (x, y) in enumerate(zip(a, b)) if x != y), f"lengths {len(a)} vs {len(b)}")


def test_same_name_keys_as_convert_hf_to_gguf(tmp_path):
    """A real-style model id in config.json and directory name (general.name/basename/...)."""
    src = make_tiny_checkpoint(tmp_path / "Qwen2.5-0.5B-Instruct-v2", arch="qwen2", dtype="bf16",
                               _name_or_path="Qwen/Qwen2.5-Coder-7B-Chat")
    ours = cpuq.convert(src, tmp_path / "cpuq.gguf", "bf16").read_bytes()
    theirs = llama_cpp_convert(src, tmp_path / "llama.gguf", "bf16").read_bytes()
    assert ours == theirs, _first_difference(ours, theirs)


@pytest.mark.parametrize("arch, tied, sharded, qtype", [
    ("qwen2", True, False, "q8_0"),
    ("qwen2", False, False, "f32"),
    ("qwen3", True, True, "bf16"),
    ("qwen3", True, False, "q8_0"),
    ("llama", False, False, "q8_0"),   # q/k permutation, lm_head -> output.weight
    ("llama", True, True, "f16"),
])
def test_same_bytes_as_convert_hf_to_gguf(arch, tied, sharded, qtype, tmp_path):
    # The directory name feeds general.name, so both sides see the same one.
    src = make_tiny_checkpoint(tmp_path / f"tiny-{arch}", arch=arch, dtype="bf16", tied=tied, sharded=sharded)
    ours = cpuq.convert(src, tmp_path / "cpuq.gguf", qtype).read_bytes()
    theirs = llama_cpp_convert(src, tmp_path / "llama.gguf", qtype).read_bytes()
    assert ours == theirs, _first_difference(ours, theirs)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}),
    ("qwen3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # llama3 rope: the generated rope_freqs.weight tensor (LlamaModel.generate_extra_tensors), float32 like torch
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               "hidden_size": 256, "head_dim": 64}),
])
def test_rope_scaling_same_bytes(arch, overrides, tmp_path):
    src = make_tiny_checkpoint(tmp_path / f"tiny-{arch}", arch=arch, dtype="bf16", **overrides)
    ours = cpuq.convert(src, tmp_path / "cpuq.gguf", "q8_0").read_bytes()
    theirs = llama_cpp_convert(src, tmp_path / "llama.gguf", "q8_0").read_bytes()
    assert ours == theirs, _first_difference(ours, theirs)


@pytest.mark.parametrize("arch, hidden, qtype", [
    ("qwen2", 256, "q4_k"),    # every matrix Q4_K
    ("qwen3", 64, "q4_k"),     # row length 64: Q4_K -> Q5_0 fallback (tensor_type_fallback)
    ("llama", 256, "q6_k"),
    ("qwen2", 64, "q5_0"),
    ("qwen2", 64, "q5_k"),     # row length 64: Q5_K -> Q5_1 fallback
    ("qwen3", 256, "q5_k"),
    ("llama", 64, "q4_0"),
])
def test_same_bytes_as_llama_quantize_pure(arch, hidden, qtype, tmp_path):
    src = make_tiny_checkpoint(tmp_path / f"tiny-{arch}", arch=arch, dtype="bf16", tied=arch != "llama",
                               hidden_size=hidden, intermediate_size=2 * hidden)
    ours = cpuq.convert(src, tmp_path / "cpuq.gguf", qtype).read_bytes()
    f16 = llama_cpp_convert(src, tmp_path / "llama-f16.gguf", "f16")
    theirs = llama_cpp_quantize(f16, tmp_path / "llama.gguf", PURE_FTYPES[qtype]).read_bytes()
    assert ours == theirs, _first_difference(ours, theirs)


@pytest.mark.parametrize("arch, hidden, n_layer, tied", [
    ("qwen2", 256, 8, True),     # use_more_bits over 8 layers; tied token_embd -> Q6_K
    ("llama", 64, 2, False),     # row length 64: Q6_K -> Q8_0, Q4_K -> Q5_0
    ("qwen3", 256, 3, False),
])
def test_same_bytes_as_llama_quantize_q4_k_m(arch, hidden, n_layer, tied, tmp_path):
    src = make_tiny_checkpoint(tmp_path / f"tiny-{arch}", arch=arch, dtype="bf16", tied=tied,
                               hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer)
    ours = cpuq.convert(src, tmp_path / "cpuq.gguf", "q4_k_m").read_bytes()
    f16 = llama_cpp_convert(src, tmp_path / "llama-f16.gguf", "f16")
    theirs = llama_cpp_quantize(f16, tmp_path / "llama.gguf", "Q4_K_M", pure=False).read_bytes()
    assert ours == theirs, _first_difference(ours, theirs)
