"""Causal grouped-query attention over a KV cache."""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def attention(q, k_cache, v_cache, start, scale, out):
    """q: (n, n_head, hd) f32 for positions start .. start+n-1; k_cache, v_cache:
    (n_head_kv, hd, n_ctx) f32, position p of kv head g in column [g, :, p], holding
    positions 0 .. start+n-1 -> out: (n, n_head, hd) f32.
    Query head h reads kv head h // (n_head / n_head_kv); position p sees keys 0..p.
    The cache is stored transposed so that both products run along the positions: the
    scores as n_keys-long multiply-adds per head dimension, the output as one n_keys-long
    reduction per dimension, both vectorizing without a horizontal sum per key.
    Dot products and sums may be reassociated (no NaN/inf assumptions)."""
    n, n_head, hd = q.shape
    n_head_kv = k_cache.shape[0]
    group = max(1, n_head // max(1, n_head_kv))
    n_ctx = min(k_cache.shape[2], v_cache.shape[2])
    hd = min(hd, k_cache.shape[1], v_cache.shape[1], out.shape[2])
    for job in prange(n * n_head):
        t = job // n_head
        h = job % n_head
        kvh = min(h // group, n_head_kv - 1)
        n_keys = min(start + t + 1, n_ctx)
        scores = np.zeros(n_keys, np.float32)
        for d in range(hd):
            qd = q[t, h, d] * scale
            krow = k_cache[kvh, d]
            for j in range(n_keys):
                scores[j] += qd * krow[j]
        best = scores.max()
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(hd):
            vrow = v_cache[kvh, d]
            acc = np.float32(0.0)
            for j in range(n_keys):
                acc += scores[j] * vrow[j]
            out[t, h, d] = acc * inv
