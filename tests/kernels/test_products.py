"""The runtime's products with quantized weights against float64 products with the
weights cpuq.dequantize decodes (itself bit-equal to gguf-py / llama.cpp).

Tolerance: max |error| <= 1e-5 of max |result|. Both sides use the same decoded values;
only float32 accumulation (in a different order) separates them: ~2e-7 measured for
k <= 4864, so 1e-5 is 50x that and still far below any decoding mistake (a wrong scale or
nibble moves results by > 1e-2 of their range)."""
import numpy as np
import pytest

import cpuq
from cpuq.kernels.matmul import dequantize_rows, get_rows, matmul
from cpuq.kernels.blocks import BLOCK_INTS, BLOCK_K_INTS, PMADDWD_LANES, X_ORDERS
from cpuq.kernels.matvec import matvec, matvec_many, quantize_x

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _weights(qtype, m, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k), dtype=np.float32)
    t = cpuq.get_qtype(qtype)
    data = (t.encode(w) if t.block_size == 1 else cpuq.quantize(w, qtype)).reshape(m, -1)
    return t, data, cpuq.dequantize(data, qtype, (m, k)).astype(np.float64)


def _int16_rounded(x):
    """x as matvec.quantize_x hands it to the integer products (one scale per 256 values
    when len(x) is a multiple of 256, else per 32), in float64."""
    g = x.reshape(-1, 256 if x.size % 256 == 0 else 32)
    d = (np.abs(g).max(1) / np.float32(32767.0)).astype(np.float32)
    q = np.rint(g * (np.float32(1.0) / d)[:, None])
    return (q * d[:, None].astype(np.float64)).reshape(-1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_and_matvec(qtype, n):
    m, k = 67, 512  # m not a multiple of the row tile
    t, data, dense = _weights(qtype, m, k)
    x = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    ref = x.astype(np.float64) @ dense.T
    out = np.empty((n, m), np.float32)
    matmul(x, data, int(t.ggml_type), out)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    if n == 1:
        v = np.empty(m, np.float32)
        matvec(x[0], data, int(t.ggml_type), v)
        if (int(t.ggml_type) in BLOCK_INTS or int(t.ggml_type) in BLOCK_K_INTS) and PMADDWD_LANES:
            # x multiplied as int16: exact against x so rounded (Q4_K's minimum terms use
            # the float sums of x, so only the second check applies); against x itself,
            # within 1e-4 (2^-16 of each span's max per element, ~2e-5 measured).
            if qtype != "Q4_K":
                assert np.abs(v - _int16_rounded(x[0]) @ dense.T).max() <= 1e-5 * np.abs(ref).max()
            assert np.abs(v - ref[0]).max() <= 1e-4 * np.abs(ref).max()
        else:
            assert np.abs(v - ref[0]).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_matvec_non_finite_x(qtype, bad):
    """A NaN or inf in x gives NaN (its span of x gets a NaN scale; float products would
    give NaN or inf), and an all-zero x gives zeros."""
    t, data, _ = _weights(qtype, 9, 512)
    x = np.random.default_rng(4).standard_normal(512, dtype=np.float32)
    x[300] = bad
    out = np.empty(9, np.float32)
    matvec(x, data, int(t.ggml_type), out)
    assert np.isnan(out).all()
    matvec(np.zeros(512, np.float32), data, int(t.ggml_type), out)
    assert not out.any()


def test_x_orders():
    """quantize_x's rows 1 and 2 are row 0 in the orders the Q4_K / Q6_K integer products
    read, per whole 256 values (k = 800: three blocks and a 32-value tail, not written)."""
    k = 800
    x = np.random.default_rng(3).standard_normal(k, dtype=np.float32)
    xq = np.zeros((3, k), np.int16)
    quantize_x(x, xq, np.empty(k // 32, np.float32), np.empty(k // 32, np.float32))
    for row, t in ((1, 12), (2, 14)):
        order = np.array(X_ORDERS[t])
        assert sorted(order) == list(range(256))
        for base in range(0, 768, 256):
            np.testing.assert_array_equal(xq[row, base:base + 256], xq[0, base:base + 256][order])
        assert not xq[row, 768:].any()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16"])
def test_get_rows(qtype):
    t, data, dense = _weights(qtype, 40, 256)
    out = np.empty((3, 256), np.float32)
    get_rows(data, int(t.ggml_type), np.array([0, 39, 7]), out)
    np.testing.assert_array_equal(out, dense[[0, 39, 7]].astype(np.float32))


def test_matvec_many_mixed_types_in_one_region():
    """q/k/v-style: three matrices of different types and row counts, one x."""
    k = 512
    x = np.random.default_rng(2).standard_normal(k, dtype=np.float32)
    mats = [_weights(q, m, k, seed=i) for i, (q, m) in enumerate([("Q5_0", 70), ("Q8_0", 9), ("Q6_K", 33)])]
    outs = matvec_many(x, [(data, int(t.ggml_type)) for t, data, _ in mats])
    for (_, _, dense), out in zip(mats, outs):
        ref = dense @ x.astype(np.float64)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()  # int16 x: see test_matmul_and_matvec


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_rows_equals_dequantize(qtype):
    """The prompt path's tile decoder (vector IR for block types) is bit-equal to
    cpuq.dequantize (itself bit-equal to gguf-py), from any starting row."""
    t, data, dense = _weights(qtype, 19, 512)
    out = np.full((8, 512), np.nan, np.float32)
    dequantize_rows(data, int(t.ggml_type), 5, out)
    np.testing.assert_array_equal(out, dense[5:13].astype(np.float32))
    short = np.full((8, 512), np.nan, np.float32)  # rows past the end are left alone
    dequantize_rows(data, int(t.ggml_type), 15, short)
    np.testing.assert_array_equal(short[:4], dense[15:19].astype(np.float32))
    assert np.isnan(short[4:]).all()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_matvec_with_subnormal_half_scales(qtype):
    """Weights of ordinary magnitude give K-quant block scales below fp16's smallest normal
    (6.1e-5; Q6_K's are ~1e-5 for weights of ~0.02): the block kernels read such a half as
    its exact value (blocks._half's subnormal branch), as quants' decoder does."""
    t, data, dense = _weights(qtype, 33, 512)
    scale = {"Q8_0": 1e-5, "Q4_0": 1e-5, "Q5_0": 1e-5}.get(qtype, 1e-2)
    w = (dense * scale).astype(np.float32)
    data = cpuq.quantize(w, qtype).reshape(33, -1)
    dense = cpuq.dequantize(data, qtype, (33, 512)).astype(np.float64)
    d = data.reshape(33, -1, t.type_size)[:, :, 208 if qtype == "Q6_K" else 0:][:, :, :2].copy().view(np.float16)
    assert (np.abs(d[d != 0]) < np.float16(6.1e-5)).mean() > 0.5  # mostly subnormal halves
    x = np.random.default_rng(2).standard_normal(512, dtype=np.float32)
    ref = x.astype(np.float64) @ dense.T
    v = np.empty(33, np.float32)
    matvec(x, data, int(t.ggml_type), v)
    # the int16 rounding of x, as test_matmul_and_matvec's bound
    assert np.abs(v - ref).max() <= 1e-4 * np.abs(ref).max()
