"""Decode attention over the fp16 KV cache against float64 attention computed by numpy on
the same fp16-rounded keys and values (numpy's own float16 rounding), and the fp16
conversions against numpy's.

Tolerance 1e-5 absolute on outputs of magnitude ~1: both sides see the same fp16 values,
so only float32 sums (in another order) and float32 exp separate them (~4e-7 measured);
a layout mistake (a key from the wrong position or head) moves outputs by ~1e-1."""
import numpy as np
import pytest
from numba import njit

from cpuq.kernels.attention import _expf, attention, gather_kv, store_kv
from cpuq.kernels.halves import f16_to_f32, f32_to_f16


@njit(cache=False)
def _to_f32(bits, out):
    for i in range(bits.shape[0]):
        out[i] = f16_to_f32(bits[i])


@njit(cache=False)
def _to_f16(x, out):
    for i in range(x.shape[0]):
        out[i] = f32_to_f16(x[i])


@njit(cache=False)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = _expf(x[i])


def test_vectorizable_exp_within_3_ulp():
    # The softmax's exp: polynomial, measured max 3.0 ulp against float64 exp over
    # [-87.3, 88); 0 below (where float32 exp is subnormal), inf above, NaN kept.
    x = np.linspace(-87.3, 88.0, 1_000_001, dtype=np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(got - ref) / np.spacing(ref.astype(np.float32))).max() <= 3.0
    edge = np.float32([-88.0, -1e30, -np.inf, 89.0, np.inf, np.nan, 0.0])
    out = np.empty_like(edge)
    _exp_all(edge, out)
    np.testing.assert_array_equal(out, np.float32([0, 0, 0, np.inf, np.inf, np.nan, 1.0]))


def test_fp16_conversions_equal_numpy():
    bits = np.arange(65536, dtype=np.uint16)
    got = np.empty(65536, np.float32)
    _to_f32(bits, got)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)).astype(np.float32)
    x = np.concatenate([x, np.float32([65519.99, 65520.0, 1e9, -1e9, 2 ** -25, 1.5 * 2 ** -24, np.inf, -0.0])])
    out = np.empty(x.size, np.uint16)
    _to_f16(x, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("n_head,n_kv,hd,block,start,n", [
    (14, 2, 64, 64, 0, 1),      # Qwen2.5-0.5B heads, first token
    (14, 2, 64, 64, 200, 1),    # a partial last block
    (16, 8, 128, 64, 255, 1),   # full blocks only
    (16, 8, 128, 64, 63, 3),    # Qwen3-0.6B heads, several tokens across a block edge
    (4, 4, 24, 8, 17, 5),       # no grouping, a head size that is not a multiple of 16
])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])  # fp16 bits (default), or kv_type="f32"
def test_attention_matches_numpy_on_fp16_cache(n_head, n_kv, hd, block, start, n, dtype):
    """Block size 64 with head sizes 64/128 take the vector-IR block products
    (halves.block_scores / block_values); the last case, Numba's loops."""
    rng = np.random.default_rng(n_head + start)
    total = start + n
    n_blocks = -(-total // block) + 1  # one spare block: never read
    k_cache = np.zeros((n_blocks, n_kv, hd, block), dtype)
    v_cache = np.zeros((n_blocks, n_kv, block, hd), dtype)
    k, v = rng.standard_normal((2, total, n_kv, hd), dtype=np.float32)
    store_kv(k_cache, v_cache, k, v, 0)
    nan = np.float16(np.nan).view(np.uint16) if dtype == np.uint16 else np.nan
    for p in range(total, n_blocks * block):  # positions not (yet) used: a stale NaN must not reach out
        k_cache[p // block, :, :, p % block] = nan
        v_cache[p // block, :, p % block, :] = nan
    q = rng.standard_normal((n, n_head, hd), dtype=np.float32)
    out = np.empty_like(q)
    scale = np.float32(hd ** -0.5)
    attention(q, k_cache, v_cache, start, scale, out)

    stored = (lambda a: a.astype(np.float16)) if dtype == np.uint16 else (lambda a: a)
    k16, v16 = stored(k).astype(np.float64), stored(v).astype(np.float64)
    group = n_head // n_kv
    for t in range(n):
        seen = start + t + 1
        for h in range(n_head):
            s = k16[:seen, h // group] @ q[t, h].astype(np.float64) * float(scale)
            p = np.exp(s - s.max())
            ref = (p / p.sum()) @ v16[:seen, h // group]
            np.testing.assert_allclose(out[t, h], ref, rtol=0, atol=1e-5)

    keys, values = np.empty((total, hd), np.float32), np.empty((total, hd), np.float32)
    gather_kv(k_cache, v_cache, n_kv - 1, total, keys, values)
    np.testing.assert_array_equal(keys, k16[:, n_kv - 1])
    np.testing.assert_array_equal(values, v16[:, n_kv - 1])
