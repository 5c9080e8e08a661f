"""Causal grouped-query attention over a KV cache."""
from __future__ import annotations

import numpy as np
from numba import njit, prange


_FAST = {"reassoc", "contract"}


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
    scores = np.zeros(n_keys, np.float32)
    for d in range(hd):
        qd = q[t, h, d] * scale
        for b0 in range(0, n_keys, block):
            krow = k_cache[b0 // block, kvh, d]
            part = scores[b0:min(n_keys, b0 + block)]
            for j in range(part.shape[0]):
                part[j] += qd * krow[j]
    best = scores.max()
    total = np.float32(0.0)
    for j in range(n_keys):
        e = np.exp(scores[j] - best)
        scores[j] = e
        total += e
    inv = np.float32(1.0) / total
    for d in range(hd):
        acc = np.float32(0.0)
        for b0 in range(0, n_keys, block):
            vrow = v_cache[b0 // block, kvh, d]
            part = scores[b0:min(n_keys, b0 + block)]
            for j in range(part.shape[0]):
                acc += part[j] * vrow[j]
        out[t, h, d] = acc * inv


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


@njit(cache=True, nogil=True, fastmath=_FAST)
def attention_serial(q, k_cache, v_cache, start, scale, out):
    """attention on the calling thread, without the GIL (callers split the queries by
    position over their own threads: q[lo:hi] with start + lo, out[lo:hi])."""
    for job in range(q.shape[0] * q.shape[1]):
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
