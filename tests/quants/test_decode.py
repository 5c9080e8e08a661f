"""cpuq.quants.decode against gguf-py's numpy dequantizers (gguf.quants.dequantize).

gguf-py performs the same float32 operations in the same order as llama.cpp's
dequantize_row_* (e.g. Q4_K: (d * scale) * q - dmin * min, with no fused multiply-add), so
the expected tolerance is zero: outputs are compared bit for bit. Only where a result is NaN
may the payload legitimately differ (which of two NaN operands an add propagates depends on
operand order the compiler is free to swap), so inputs with NaN/inf scales are compared
with np.array_equal(..., equal_nan=True).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from cpuq.quants import decode
from tests import data as testdata

# name: (ggml type, block_size, type_size, byte offsets of the fp16 fields in a block), the
# sizes gguf-py's GGML_QUANT_SIZES
TYPES = {name: (g, *GGML_QUANT_SIZES[g], offsets) for name, g, offsets in (
    ("q8_0", G.Q8_0, (0,)),
    ("q4_0", G.Q4_0, (0,)),
    ("q4_1", G.Q4_1, (0, 2)),
    ("q5_0", G.Q5_0, (0,)),
    ("q5_1", G.Q5_1, (0, 2)),
    ("q4_k", G.Q4_K, (0, 2)),
    ("q5_k", G.Q5_K, (0, 2)),
    ("q6_k", G.Q6_K, (208,)),
    ("f16", G.F16, (0,)),
    ("bf16", G.BF16, ()),
)}
# (rows, cols): one block, one row of several blocks, and an odd row count so that the
# parallel split over rows is uneven
SHAPES = [(1, 256), (1, 4096), (37, 1024)]


def reference(blocks: np.ndarray, name: str, cols: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf * 0 and the like, on purpose
        out = gguf_dequantize(blocks, TYPES[name][0])
    return np.asarray(out, dtype=np.float32).reshape(blocks.shape[0], cols)


def ours(blocks: np.ndarray, name: str, cols: int) -> np.ndarray:
    return getattr(decode, f"dequantize_{name}")(blocks, cols)


def random_blocks(name: str, rows: int, cols: int, seed: int, sane_scales: bool) -> np.ndarray:
    """Random bytes; with sane_scales, every fp16 scale field is overwritten by a finite,
    normal half of modest size (as a quantizer would write)."""
    _, block_size, type_size, scale_offsets = TYPES[name]
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if sane_scales:
        for offset in scale_offsets:
            halves = (rng.uniform(-1.0, 1.0, n_blocks) * 10.0 ** rng.uniform(-5, 1, n_blocks)).astype(np.float16)
            blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
        if name == "bf16":
            values = rng.standard_normal(n_blocks).astype(np.float32)
            blocks[:] = gguf_quantize(values, G.BF16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def assert_bitwise_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = got.view(np.uint32) != want.view(np.uint32)
    assert not diff.any(), f"{diff.sum()} of {diff.size} values differ, first at {np.argwhere(diff)[0]}"


def test_half_conversion_exhaustive():
    """Every one of the 65536 halves (subnormals, signed zeros, inf, quiet and signalling
    NaNs) converts to the same float32 bits as numpy's float16 -> float32 cast."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = decode.dequantize_f16(halves.view(np.uint8).reshape(1, -1), 1 << 16)[0]
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", TYPES)
def test_random_valid_blocks(name, shape):
    rows, cols = shape
    blocks = random_blocks(name, rows, cols, seed=rows * 7 + cols, sane_scales=True)
    assert_bitwise_equal(ours(blocks, name, cols), reference(blocks, name, cols))


@pytest.mark.parametrize("name", TYPES)
def test_random_bytes(name):
    """Arbitrary bytes, as from a corrupt or hostile file: NaN/inf/subnormal scales must
    give what gguf-py gives, and nothing worse."""
    rows, cols = 19, 2048
    blocks = random_blocks(name, rows, cols, seed=1, sane_scales=False)
    # make sure the special scale values occur whatever the random draw
    _, block_size, type_size, scale_offsets = TYPES[name]
    flat = blocks.reshape(-1, type_size)
    specials = np.array([0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x8000, 0x03FF, 0x7BFF], dtype=np.uint16)
    for offset in scale_offsets:
        flat[: len(specials), offset:offset + 2] = specials.view(np.uint8).reshape(-1, 2)
    got, want = ours(blocks, name, cols), reference(blocks, name, cols)
    assert not np.isfinite(want).all()  # the specials above did reach the output
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "zeros", "real"])
@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16"])
def test_blocks_from_gguf_quantizer(name, kind):
    rows, cols = 24, 512
    x = testdata.KINDS[kind](rows, cols, seed=3)
    blocks = np.asarray(gguf_quantize(x, TYPES[name][0])).view(np.uint8).reshape(rows, -1)
    assert_bitwise_equal(ours(blocks, name, cols), reference(blocks, name, cols))


@pytest.mark.parametrize("name", TYPES)
def test_into_row_range(name):
    """The in-place kernels decode a row range into a slice of a larger output."""
    rows, cols = 10, 512
    blocks = random_blocks(name, rows, cols, seed=5, sane_scales=True)
    into = getattr(decode, f"dequantize_{name}_into")
    out = np.full((rows + 2, cols), -7.0, dtype=np.float32)
    into(blocks[3:8], out[1:6])
    assert_bitwise_equal(out[1:6], reference(blocks[3:8], name, cols))
    assert (out[:1] == -7.0).all() and (out[6:] == -7.0).all()


@pytest.mark.parametrize("name", TYPES)
def test_into_never_leaves_its_arrays(name):
    """Mismatched shapes (a truncated row, a short output) decode only the whole blocks both
    arrays have room for and touch nothing else."""
    _, block_size, type_size, _ = TYPES[name]
    into = getattr(decode, f"dequantize_{name}_into")
    cols = 4 * max(block_size, 32)
    blocks = random_blocks(name, 3, cols, seed=9, sane_scales=True)
    want = reference(blocks, name, cols)

    truncated = np.ascontiguousarray(blocks[:, : 2 * type_size + 1])  # 2 whole blocks and a byte
    out = np.full((5, cols), -7.0, dtype=np.float32)
    into(truncated, out)
    assert_bitwise_equal(out[:3, : 2 * block_size], want[:, : 2 * block_size])
    assert (out[:3, 2 * block_size:] == -7.0).all() and (out[3:] == -7.0).all()

    short = np.full((2, block_size + block_size // 2 if block_size > 1 else 1), -7.0, dtype=np.float32)
    into(blocks, short)
    assert_bitwise_equal(short[:, :block_size], want[:2, :block_size])
    assert (short[:, block_size:] == -7.0).all()


@pytest.mark.parametrize("name", TYPES)
def test_rejects_inconsistent_shapes(name):
    _, block_size, type_size, _ = TYPES[name]
    blocks = random_blocks(name, 2, 256, seed=0, sane_scales=True)
    with pytest.raises(ValueError):
        ours(blocks, name, 512)
    with pytest.raises(ValueError):
        ours(blocks.reshape(-1), name, 256)
    with pytest.raises(ValueError):
        ours(blocks.view(np.int8), name, 256)
