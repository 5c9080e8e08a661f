"""cpuq's block quantizers (cpuq.quants.kquants / legacy) against llama.cpp's reference
quantizer, `ggml_quantize_chunk` from the peer build (tools/ggml_oracle.py).

The encoders perform llama.cpp's float32 operations in the same order, and the oracle was
built without -march flags (so without fused multiply-adds), so the tolerance is zero:
every byte must match, with and without an importance matrix.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G

import ggml_oracle  # on sys.path through tests/conftest.py
from cpuq.quants import kquants, legacy
from tests import data

pytestmark = pytest.mark.peer

if not ggml_oracle.available():
    pytest.skip("llama.cpp peer library not built (tools/peer_env.sh)", allow_module_level=True)

# name: (ggml type, encoder, block_size, type_size), the sizes gguf-py's GGML_QUANT_SIZES
TYPES = {name: (g, encode, *GGML_QUANT_SIZES[g]) for name, g, encode in (
    ("q4_k", G.Q4_K, kquants.quantize_q4_k),
    ("q5_k", G.Q5_K, kquants.quantize_q5_k),
    ("q6_k", G.Q6_K, kquants.quantize_q6_k),
    ("q8_0", G.Q8_0, legacy.quantize_q8_0),
    ("q4_0", G.Q4_0, legacy.quantize_q4_0),
    ("q4_1", G.Q4_1, legacy.quantize_q4_1),
    ("q5_0", G.Q5_0, legacy.quantize_q5_0),
    ("q5_1", G.Q5_1, legacy.quantize_q5_1),
)}
K_COLS = (256, 512, 1536, 4096)
LEGACY_COLS = (32, 96) + K_COLS


def rows_for(cols: int) -> int:
    """About 16k values per matrix, and an odd row count so that several short rows share a
    work unit unevenly."""
    return max(3, 16384 // cols) | 1


def first_difference(ours: np.ndarray, ref: np.ndarray, type_size: int) -> str:
    blocks_per_row = ref.shape[1] // type_size
    bad = np.nonzero((ours.reshape(-1, type_size) != ref.reshape(-1, type_size)).any(axis=1))[0]
    first = int(bad[0])
    byte = int(np.nonzero(ours.reshape(-1, type_size)[first] != ref.reshape(-1, type_size)[first])[0][0])
    return (f"{bad.size} of {ref.size // type_size} blocks differ; first: block {first} "
            f"(row {first // blocks_per_row}, block {first % blocks_per_row} of the row), byte {byte}")


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", list(data.KINDS))
@pytest.mark.parametrize("name", list(TYPES))
def test_bytes_equal_llama_cpp(name, kind, weighted):
    ggml_type, encode, block_size, type_size = TYPES[name]
    for seed, cols in enumerate(K_COLS if block_size == 256 else LEGACY_COLS):
        x = data.KINDS[kind](rows_for(cols), cols, seed)
        importance = data.importance(cols, seed) if weighted else None
        ref = ggml_oracle.quantize(x, ggml_type, importance)
        ours = encode(x, importance)
        assert ours.dtype == np.uint8 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
        assert np.array_equal(ours, ref), f"{name} {kind} cols={cols}: {first_difference(ours, ref, type_size)}"


def extreme_rows(cols: int) -> np.ndarray:
    """Finite values at the edges of float32 and fp16: subnormals, near FLT_MAX, constant
    rows, a single non-zero value, scales that overflow or underflow fp16."""
    rng = np.random.default_rng(7)
    rows = [
        rng.standard_normal(cols) * 1e-40,
        rng.standard_normal(cols) * 1e-38,
        np.clip(rng.standard_normal(cols) * 3e38, -3.4e38, 3.4e38),
        rng.standard_normal(cols) * 1e5,
        np.full(cols, -2.5),
        np.full(cols, 65520.0 * 8),
        np.where(np.arange(cols) == 7, 1.0, 0.0),
        np.where(rng.random(cols) < 0.5, 1e-45, -1e-45),
    ]
    return np.ascontiguousarray(np.array(rows).astype(np.float32))


@pytest.mark.parametrize("importance", ["none", "zeros", "huge", "tiny"])
@pytest.mark.parametrize("name", list(TYPES))
def test_extreme_values_bytes_equal_llama_cpp(name, importance):
    ggml_type, encode, _, type_size = TYPES[name]
    cols = 512
    x = extreme_rows(cols)
    imp = {"none": None, "zeros": np.zeros(cols, np.float32), "huge": np.full(cols, 1e30, np.float32),
           "tiny": np.full(cols, 1e-30, np.float32)}[importance]
    with np.errstate(all="ignore"):
        ref = ggml_oracle.quantize(x, ggml_type, imp)
    ours = encode(x, imp)
    assert np.array_equal(ours, ref), f"{name} extreme, importance {importance}: {first_difference(ours, ref, type_size)}"
