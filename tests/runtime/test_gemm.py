"""The prompt path (runtime.gemm: kernels.qgemm where the host has AVX512-VNNI, else BLAS)
against the per-row kernels and float64.

Tolerance 1e-5 of the result's range, as tests/kernels/test_products.py: the same decoded
weights on both sides, only float32 summation order differs (~3e-7 measured); the int8 path
adds its rounding bound of x."""
import numpy as np
import pytest

import cpuq
from cpuq.kernels.qgemm import HOST_VNNI, TYPES as INT8_TYPES
from cpuq.runtime.gemm import Gemm


def _weights(qtype, m, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k), dtype=np.float32)
    t = cpuq.get_qtype(qtype)
    data = (t.encode(w) if t.block_size == 1 else cpuq.quantize(w, qtype)).reshape(m, -1)
    return data, int(t.ggml_type), cpuq.dequantize(data, qtype, (m, k)).astype(np.float64)


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HOST_VNNI, reason="needs AVX512-VNNI"))])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_linear_many_matrices_many_tiles(monkeypatch, n_threads, int8):
    """int8: the block types through kernels.qgemm, x rounded to 2^-16 / 127 of each 32
    values' largest |x| (tests/kernels/test_qgemm.py): that bound is added to the tolerance."""
    import cpuq.runtime.gemm as G
    monkeypatch.setattr(G, "TILE_BYTES", 64 * 1024)  # several tiles per matrix, uneven splits
    k = 512
    mats = [_weights(q, m, k, i) for i, (q, m) in enumerate([("Q5_0", 101), ("Q8_0", 7), ("Q4_K", 64), ("F16", 33)])]
    x = np.random.default_rng(9).standard_normal((40, k), dtype=np.float32)
    half_step = np.repeat(np.abs(x).reshape(40, -1, 32).max(-1), 32, axis=1).astype(np.float64) / (127 * 256 * 2)
    g = Gemm(n_threads, int8=int8)
    try:
        with g.session():
            outs = g.linear(x, [(d, t) for d, t, _ in mats])
    finally:
        g.close()
    for (_, t, dense), out in zip(mats, outs):
        ref = x.astype(np.float64) @ dense.T
        assert out.shape == ref.shape
        rounding = half_step @ np.abs(dense).T if int8 and t in INT8_TYPES else 0.0
        assert np.all(np.abs(out - ref) <= rounding + 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HOST_VNNI, reason="needs AVX512-VNNI"))])
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_linear_groups_gives_each_group_its_own_matrices(monkeypatch, n_threads, int8, indexed):
    """Groups of 1, 9, 3 and 5 rows (the last one's int8 pass reads past x's rows into the
    padding), each with its own two matrices (one split in several tiles): each group's rows
    against float64, tolerance as above. indexed: the rows given as 7 distinct rows and each
    row's index among them (a MoE chunk's tokens, each picked by several experts)."""
    import cpuq.runtime.gemm as G
    monkeypatch.setattr(G, "TILE_BYTES", 64 * 1024)
    k = 512
    spans = [(0, 1), (1, 10), (10, 13), (13, 18)]
    mats = [[_weights("Q4_K", 48, k, 2 * j), _weights("Q6_K" if j % 2 else "F16", 40, k, 2 * j + 1)]
            for j in range(len(spans))]
    x = np.random.default_rng(5).standard_normal((18, k), dtype=np.float32)
    index = None
    if indexed:
        index = np.random.default_rng(6).integers(0, 7, 18)
        distinct, x = x[:7].copy(), x[:7][index]
    half_step = np.repeat(np.abs(x).reshape(18, -1, 32).max(-1), 32, axis=1).astype(np.float64) / (127 * 256 * 2)
    g = Gemm(n_threads, int8=int8)
    try:
        with g.session():
            outs = g.linear_groups(distinct if indexed else x, spans, [[(d, t) for d, t, _ in ms] for ms in mats],
                                   index)
    finally:
        g.close()
    assert [o.shape for o in outs] == [(18, 48), (18, 40)]
    for (lo, hi), ms in zip(spans, mats):
        for (_, t, dense), out in zip(ms, outs):
            ref = x[lo:hi].astype(np.float64) @ dense.T
            rounding = half_step[lo:hi] @ np.abs(dense).T if int8 and t in INT8_TYPES else 0.0
            assert np.all(np.abs(out[lo:hi] - ref) <= rounding + 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("parts_by", ["memory", "tokens"])
def test_attention_through_blas_matches_the_kernel(monkeypatch, start, parts_by):
    """Prompt-chunk attention (Q K^T, causal softmax, P V per kv head) against the decode
    kernel, after `start` cached positions, with the query rows split in several parts
    (each with only the keys its tokens see), by the scores' memory or by PART_TOKENS."""
    import cpuq.runtime.gemm as G
    from cpuq.kernels.attention import attention, store_kv
    if parts_by == "memory":
        monkeypatch.setattr(G, "SCORES_BYTES", 4 * 7 * 90)  # a few query rows per part
    else:
        monkeypatch.setattr(G, "PART_TOKENS", 16)  # 40 tokens: parts of 16, 16, 8
    rng = np.random.default_rng(3)
    n, n_head, n_kv, hd, block = 40, 14, 2, 16, 8
    n_blocks = -(-(start + n) // block)
    k_cache = np.zeros((n_blocks, n_kv, hd, block), np.uint16)
    v_cache = np.zeros((n_blocks, n_kv, block, hd), np.uint16)
    k, v = rng.standard_normal((2, start + n, n_kv, hd), dtype=np.float32)
    store_kv(k_cache, v_cache, k, v, 0)
    q = rng.standard_normal((n, n_head, hd), dtype=np.float32)
    ref, got = np.empty_like(q), np.empty_like(q)
    attention(q, k_cache, v_cache, start, np.float32(0.25), ref)
    g = Gemm(2)
    try:
        with g.session():
            g.attention(q, k_cache, v_cache, start, 0.25, got)
    finally:
        g.close()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)  # float32 sums in other orders; values ~1


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_each_runs_every_item_once_the_calling_thread_too(n_threads):
    import threading
    import time
    gemm = Gemm(n_threads)
    done, lock = [], threading.Lock()

    def fn(item):
        time.sleep(0.002)  # long enough that every thread gets items
        with lock:
            done.append((item, threading.get_ident()))

    gemm._each(fn, range(40))
    gemm.close()
    assert sorted(i for i, _ in done) == list(range(40))
    threads = {t for _, t in done}
    assert threading.get_ident() in threads  # the caller works instead of waiting
    assert len(threads) <= n_threads


def test_each_reraises_after_every_running_item_stopped():
    import threading
    import time
    gemm = Gemm(3)
    running, started, lock = [0], [], threading.Lock()

    def fn(item):
        with lock:
            running[0] += 1
            started.append(item)
        try:
            if item == 2:
                raise ValueError("item 2")
            time.sleep(0.02)
        finally:
            with lock:
                running[0] -= 1

    with pytest.raises(ValueError, match="item 2"):
        gemm._each(fn, range(100))
    assert running[0] == 0  # no task still writing into the caller's arrays
    assert len(started) < 100  # the others took no further items
    gemm._each(fn, [0, 1])  # the pool still works
    gemm.close()
