"""Causal grouped-query attention over a KV cache: the whole of it for decode steps
(`attention`), and the pieces of the BLAS path for prompt chunks (runtime/gemm.py):
`causal_softmax` between its two matrix products, `gather_kv` to lay keys out for them,
`store_kv` to append to the cache."""
from __future__ import annotations

import numpy as np
from numba import njit, prange


_FAST = {"reassoc", "contract"}


@njit(cache=True, fastmath=_FAST, inline="always")
def _exp_shifted(row, n):
    """row[:n] = exp(row[:n] - max(row[:n])) in place (n >= 1); returns their sum, the
    softmax's denominator."""
    best = row[:n].max()
    total = np.float32(0.0)
    for j in range(n):
        e = np.exp(row[j] - best)
        row[j] = e
        total += e
    return total


@njit(cache=True, fastmath=_FAST, inline="always")
def _attend(q, k_cache, v_cache, start, scale, out, job):
    """Query job = t * n_head + h of `attention`."""
    n, n_head, hd = q.shape
    n_blocks, n_head_kv, _, block = k_cache.shape
    group = max(1, n_head // max(1, n_head_kv))
    n_ctx = min(n_blocks, v_cache.shape[0]) * block
    hd = min(hd, k_cache.shape[2], v_cache.shape[2], out.shape[2])
    t = job // n_head
    h = job % n_head
    kvh = min(h // group, n_head_kv - 1)
    n_keys = min(start + t + 1, n_ctx)
    full = n_keys // block
    scores = np.zeros(n_keys, np.float32)
    # Block by block, one view of the block and of its scores, then all dimensions: views
    # per (block, dimension) cost more than the multiply-adds at a 4k context.
    for blk in range(full + 1):
        b0 = blk * block
        cnt = min(block, n_keys - b0)
        if cnt <= 0:
            break
        kb = k_cache[blk, kvh]
        sb = scores[b0:b0 + cnt]
        for d in range(hd):
            qd = q[t, h, d] * scale
            for j in range(cnt):
                sb[j] += qd * kb[d, j]
    inv = np.float32(1.0) / _exp_shifted(scores, n_keys)
    acc = np.zeros(hd, np.float32)
    for blk in range(full + 1):
        b0 = blk * block
        cnt = min(block, n_keys - b0)
        if cnt <= 0:
            break
        vb = v_cache[blk, kvh]
        sb = scores[b0:b0 + cnt]
        for d in range(hd):
            a = np.float32(0.0)
            for j in range(cnt):
                a += sb[j] * vb[d, j]
            acc[d] += a
    for d in range(hd):
        out[t, h, d] = acc[d] * inv


@njit(cache=True, parallel=True, fastmath=_FAST)
def attention(q, k_cache, v_cache, start, scale, out):
    """q: (n, n_head, hd) f32 for positions start .. start+n-1; k_cache, v_cache:
    (n_blocks, n_head_kv, hd, block) f32, position p of kv head g at [p // block, g, :,
    p % block], holding positions 0 .. start+n-1 -> out: (n, n_head, hd) f32.
    Query head h reads kv head h // (n_head / n_head_kv); position p sees keys 0..p.
    The cache is stored transposed so that both products run along the positions: the
    scores as multiply-adds along each block's positions per head dimension, the output as
    reductions along them, both vectorizing without a horizontal sum per key; blocks of
    positions keep the memory touched proportional to the positions used.
    Dot products and sums may be reassociated (no NaN/inf assumptions)."""
    for job in prange(q.shape[0] * q.shape[1]):
        _attend(q, k_cache, v_cache, start, scale, out, job)


@njit(cache=True, nogil=True)
def store_kv(cache, x, start):
    """x: (n, n_head_kv, hd) f32 for positions start .. start+n-1 -> cache (n_blocks,
    n_head_kv, hd, block) in attention's layout; positions past the cache are dropped
    (callers check the context first)."""
    n_blocks, n_head_kv, hd, block = cache.shape
    n_head_kv = min(n_head_kv, x.shape[1])
    hd = min(hd, x.shape[2])
    for t in range(x.shape[0]):
        p = start + t
        if p < 0 or p >= n_blocks * block:
            continue
        b, o = p // block, p % block
        for g in range(n_head_kv):
            for d in range(hd):
                cache[b, g, d, o] = x[t, g, d]


@njit(cache=True, nogil=True, fastmath=_FAST)
def causal_softmax(scores, group, first_keys):
    """scores: (n * group, n_keys) f32, row r the query of token r // group, which sees keys
    0 .. first_keys + r // group - 1 -> in place: softmax over those keys, 0 for the rest
    (prompt-chunk attention through BLAS: scores = Q K^T before, P V after)."""
    rows, n_keys = scores.shape
    for r in range(rows):
        seen = max(0, min(n_keys, first_keys + r // max(1, group)))
        row = scores[r]
        if seen == 0:
            row[:] = 0.0
            continue
        inv = np.float32(1.0) / _exp_shifted(row, seen)
        for j in range(seen):
            row[j] *= inv
        row[seen:] = 0.0


@njit(cache=True, nogil=True)
def gather_kv(cache, g, n_keys, out):
    """cache: (n_blocks, n_head_kv, hd, block) in attention's layout -> out: (n_keys, hd)
    f32, the first n_keys positions of kv head g, one row per position."""
    n_blocks, _, hd, block = cache.shape
    n_keys = min(n_keys, n_blocks * block, out.shape[0])
    hd = min(hd, out.shape[1])
    for p in range(n_keys):
        b, o = p // block, p % block
        for d in range(hd):
            out[p, d] = cache[b, g, d, o]
