"""Causal grouped-query attention over a KV cache."""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def attention(q, k_cache, v_cache, start, scale, out):
    """q: (n, n_head, hd) f32 for positions start .. start+n-1; k_cache, v_cache:
    (n_ctx, n_head_kv, hd) f32 holding positions 0 .. start+n-1 -> out: (n, n_head, hd) f32.
    Query head h reads kv head h // (n_head / n_head_kv); position p sees keys 0..p.
    Dot products and sums may be reassociated (no NaN/inf assumptions)."""
    n, n_head, hd = q.shape
    n_head_kv = k_cache.shape[1]
    group = max(1, n_head // max(1, n_head_kv))
    n_ctx = min(k_cache.shape[0], v_cache.shape[0])
    for job in prange(n * n_head):
        t = job // n_head
        h = job % n_head
        kvh = min(h // group, n_head_kv - 1)
        n_keys = min(start + t + 1, n_ctx)
        scores = np.empty(n_keys, np.float32)
        best = np.float32(-np.inf)
        for j in range(n_keys):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[t, h, d] * k_cache[j, kvh, d]
            acc *= scale
            scores[j] = acc
            best = max(best, acc)
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(hd):
            out[t, h, d] = 0.0
        for j in range(n_keys):
            wj = scores[j] * inv
            for d in range(hd):
                out[t, h, d] += wj * v_cache[j, kvh, d]
