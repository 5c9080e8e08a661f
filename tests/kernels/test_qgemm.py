"""kernels.qgemm (prompt-chunk products in int8 with AVX512-VNNI) against float64 products
of the weights cpuq.dequantize decodes (bit-equal to gguf-py / llama.cpp).

Two tolerances, each from where the error comes from:
- against x as quantize_tokens rounds it (the same inputs on both sides): 1e-5 of the
  result's range, as tests/kernels/test_products.py (float32 sums; ~4e-7 measured);
- against x itself: the bound of that rounding, sum_i |w_i| * |x_i - x~_i| with |x_i - x~_i|
  <= half a low-digit step = max|x of i's 32| / (127 * 256 * 2), plus the 1e-5 above.
A wrong nibble, scale or offset moves results by > 1e-2 of their range."""
import numpy as np
import pytest

import cpuq
from cpuq.kernels import qgemm as Q

pytestmark = pytest.mark.skipif(not Q.HOST_VNNI, reason="needs AVX512-VNNI (the kernel's instruction)")

TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q5_1"]


def _weights(qtype, m, k, seed=0):
    w = np.random.default_rng(seed).standard_normal((m, k), dtype=np.float32)
    data = cpuq.quantize(w, qtype)
    return data, int(cpuq.get_qtype(qtype).ggml_type), cpuq.dequantize(data, qtype, (m, k)).astype(np.float64)


def _quantized(x):
    """quantize_tokens' arrays for x, rows padded to a multiple of 8, and x as they hold it."""
    n, k = x.shape
    n_pad = -(-n // Q.TOKENS) * Q.TOKENS
    x8 = np.zeros((n_pad, 2 * k), np.int8)
    d8, xs32 = np.zeros((2, n_pad, k // 32), np.float32)
    xs16 = np.zeros((n_pad, k // 16), np.float32)
    Q.quantize_tokens(x, x8[:, :k], x8[:, k:], d8, xs16, xs32)
    digits = 256.0 * x8[:n, :k].astype(np.float64) + x8[:n, k:]
    held = (digits.reshape(n, -1, 32) * d8[:n, :, None]).reshape(n, k)
    return (x8, d8, xs16, xs32), held


def _rounding_bound(x, dense):
    """Per (token, row): sum_i |w_i| * max|x of i's 32| / (127 * 256 * 2)."""
    n, k = x.shape
    half_step = np.repeat(np.abs(x).reshape(n, -1, 32).max(-1), 32, axis=1) / (127 * 256 * 2)
    return half_step.astype(np.float64) @ np.abs(dense).T


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n", [1, 13])
def test_every_type_against_float64(qtype, n):
    m, k = 37, 512  # m not a multiple of the 16-row strip, n not of the 8-token pass
    data, t, dense = _weights(qtype, m, k)
    x = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    x[:, 5] *= 300.0  # an outlier channel, as real models have: its group's other values need the low digit
    xq, held = _quantized(x)
    out = np.full((n, m), np.nan, np.float32)
    Q.qgemm_rows(*xq, data, t, 0, m, out)
    ref_held = held @ dense.T
    assert np.abs(out - ref_held).max() <= 1e-5 * np.abs(ref_held).max()
    ref = x.astype(np.float64) @ dense.T
    assert np.all(np.abs(out - ref) <= _rounding_bound(x, dense) + 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES)
def test_unpack_strip_holds_the_weights(qtype):
    """The strip layout itself: a * u - b gives every weight exactly as cpuq.dequantize
    (gguf-py's decoders) does (the products are exact in float64, so one float32 rounding
    of each is the decoders' one rounding); lanes of rows past m are zeros. The last strip
    of 21 rows holds 5."""
    m, k = 21, 512
    data, t, dense = _weights(qtype, m, k, seed=7)
    group = int(Q.group_size(t))
    for r0 in (0, 16):
        u = np.full(k * Q.ROWS, 0xAB, np.uint8)  # garbage where nothing is written would show
        a, b = np.full((2, k // group, Q.ROWS), np.nan, np.float32)
        Q.unpack_strip(data, t, r0, u, a, b)
        u_rows = u.reshape(k // 4, Q.ROWS, 4).transpose(1, 0, 2).reshape(Q.ROWS, k).astype(np.float64)
        a_rows = np.repeat(a.T.astype(np.float64), group, axis=1)
        b_rows = np.repeat(b.T.astype(np.float64), group, axis=1)
        got = (a_rows * u_rows - b_rows).astype(np.float32)
        rows = min(Q.ROWS, m - r0)
        assert np.array_equal(got[:rows], dense[r0:r0 + rows].astype(np.float32))
        assert not u_rows[rows:].any() and not a[:, rows:].any() and not b[:, rows:].any()


def test_row_range_and_partial_strips():
    """r0..r1 not on strip boundaries of the matrix: only those columns are written."""
    m, k = 50, 256
    data, t, dense = _weights("Q4_K", m, k, seed=2)
    x = np.random.default_rng(3).standard_normal((9, k), dtype=np.float32)
    xq, held = _quantized(x)
    out = np.full((9, m), -7.0, np.float32)
    Q.qgemm_rows(*xq, data, t, 16, 45, out)
    ref = held @ dense.T
    assert np.all(out[:, :16] == -7.0) and np.all(out[:, 45:] == -7.0)
    assert np.abs(out[:, 16:45] - ref[:, 16:45]).max() <= 1e-5 * np.abs(ref).max()


def test_quantize_tokens_digits_nan_and_zeros():
    k = 64
    x = np.random.default_rng(4).standard_normal((3, k), dtype=np.float32)
    x[1, :32] = 0.0  # an all-zero group: scale 0, digits 0
    x[2, 40] = np.nan  # its group's scale is NaN, the other group's is finite
    xq, held = _quantized(x)
    x8, d8 = xq[0], xq[1]
    assert np.all(np.abs(x8[:3, :k].astype(int)) <= 127)
    assert d8[1, 0] == 0.0 and np.all(x8[1, :32] == 0) and np.all(x8[1, k:k + 32] == 0)
    assert np.isnan(d8[2, 1]) and np.isfinite(d8[2, 0])
    ok = np.isfinite(held)
    bound = np.repeat(np.abs(x).reshape(3, -1, 32).max(-1), 32, axis=1) / (127 * 256 * 2) * 1.01  # float32 rounding of x / step: < 0.4% of the bound
    assert np.all(np.abs(held - x)[ok] <= bound[ok])
    assert not ok[2, 32:].any() and ok[2, :32].all()


def test_short_rows_stay_in_bounds():
    """Rows holding fewer bytes than k needs (a malformed file): the blocks present are
    used, the rest read as zeros, nothing outside the arrays is touched."""
    m, k = 20, 512
    data, t, dense = _weights("Q4_K", m, k, seed=5)
    short = np.ascontiguousarray(data[:, :144 + 100])  # one whole Q4_K block and part of a second
    x = np.random.default_rng(6).standard_normal((8, k), dtype=np.float32)
    xq, held = _quantized(x)
    out = np.empty((8, m), np.float32)
    Q.qgemm_rows(*xq, short, t, 0, m, out)
    ref = held[:, :256] @ dense[:, :256].T
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_mismatched_shapes_leave_out_untouched():
    m, k = 16, 256
    data, t, _ = _weights("Q8_0", m, k)
    xq, _ = _quantized(np.ones((8, k), np.float32))
    out = np.full((8, m), 3.0, np.float32)
    Q.qgemm_rows(xq[0][:7], xq[1], xq[2], xq[3], data, t, 0, m, out)  # 7 token rows: not a multiple of 8
    Q.qgemm_rows(xq[0], xq[1][:, :3], xq[2], xq[3], data, t, 0, m, out)  # scales for fewer columns than k
    assert np.all(out == 3.0)
