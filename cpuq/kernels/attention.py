"""Causal grouped-query attention over a KV cache: the whole of it for decode steps
(`attention`), and the pieces of the BLAS path for prompt chunks (runtime/gemm.py):
`causal_softmax` between its two matrix products, `gather_kv` to lay keys and values out
for them, `store_kv` to append to the cache (fp16 as kernels.halves' uint16 bits, or float32)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .halves import BLOCK_POSITIONS, as_f32, block_scores, block_values, f32_from_bits, stored


_FAST = {"reassoc", "contract"}


@njit(cache=True, inline="always")
def _expf(x):
    """exp(x) for float32 x, within 3 ulp below 88 (softmax's x is <= 0), in arithmetic a
    loop can vectorize (np.exp is a scalar libm call, ~4 ns: a third of decode attention at
    4k positions): x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial
    (error < 1.2e-7 relative), 2^n from its exponent bits. Below -87.3 (where float32 exp
    turns subnormal) it returns 0, above 88.7 inf; NaN stays NaN."""
    f = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    n = min(max(f, np.float32(-126.0)), np.float32(127.0))
    r = x - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
    p = r * np.float32(1.0 / 720.0) + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    e = p * f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    e = np.float32(0.0) if x < np.float32(-87.33654) else e
    return np.float32(np.inf) if x > np.float32(88.72283) else e


@njit(cache=True, fastmath=_FAST, inline="always")
def _exp_shifted(row, n):
    """row[:n] = exp(row[:n] - max(row[:n])) in place (n >= 1); returns their sum, the
    softmax's denominator."""
    best = row[:n].max()
    total = np.float32(0.0)
    for j in range(n):
        e = _expf(row[j] - best)
        row[j] = e
        total += e
    return total


@njit(cache=True, fastmath=_FAST, inline="always")
def _attend(q, k_cache, v_cache, start, scale, out, job):
    """Token t = job // n_head_kv, kv head g = job % n_head_kv of `attention`: all the
    query heads that read g, block by block, so each block of keys and values is read
    from memory once for all of them."""
    n, n_head, hd = q.shape
    n_blocks, n_head_kv, _, block = k_cache.shape
    group = max(1, n_head // max(1, n_head_kv))
    n_ctx = min(n_blocks, v_cache.shape[0]) * block
    hd = min(hd, k_cache.shape[2], v_cache.shape[3], out.shape[2])
    t = job // n_head_kv
    g = job % n_head_kv
    h0 = g * group
    heads = max(0, min(group, n_head - h0))
    n_keys = min(start + t + 1, n_ctx)
    scores = np.zeros((heads, n_keys), np.float32)
    qs = np.empty((heads, hd), np.float32)
    for hh in range(heads):
        for d in range(hd):
            qs[hh, d] = q[t, h0 + hh, d] * scale
    # Per block, one view of it and of each head's scores, then all head dimensions: views
    # per (block, dimension) cost more than the multiply-adds at a 4k context.
    vector_keys = block == BLOCK_POSITIONS and k_cache.shape[2] == hd  # block_scores' shapes
    vector_values = hd % 16 == 0 and v_cache.shape[3] == hd  # block_values' shapes
    # The last, partial block too: all its positions (in the cache's memory, the unused ones
    # stale or zeros) into `part`, the used ones kept: element by element, the partial block
    # took most of a layer's decode attention.
    part = np.empty(block, np.float32)
    for b0 in range(0, n_keys, block):
        cnt = min(block, n_keys - b0)
        kb = k_cache[b0 // block, g]
        for hh in range(heads):
            sb = scores[hh, b0:b0 + cnt]
            if vector_keys:
                if cnt == block:
                    block_scores(qs[hh], kb, sb)
                else:
                    part[:] = 0.0
                    block_scores(qs[hh], kb, part)
                    sb += part[:cnt]
                continue
            for d in range(hd):
                qd = qs[hh, d]
                for j in range(cnt):
                    sb[j] += qd * as_f32(kb[d, j])
    acc = np.zeros((heads, hd), np.float32)
    inv = np.empty(heads, np.float32)
    for hh in range(heads):
        inv[hh] = np.float32(1.0) / _exp_shifted(scores[hh], n_keys)
    for b0 in range(0, n_keys, block):
        cnt = min(block, n_keys - b0)
        vb = v_cache[b0 // block, g]
        for hh in range(heads):
            a = acc[hh]
            sb = scores[hh, b0:b0 + cnt]
            if vector_values:
                block_values(sb, vb, cnt, a)
                continue
            for j in range(cnt):
                p = sb[j]
                vj = vb[j]
                for d in range(hd):
                    a[d] += p * as_f32(vj[d])
    for hh in range(heads):
        for d in range(hd):
            out[t, h0 + hh, d] = acc[hh, d] * inv[hh]


@njit(cache=True, parallel=True, fastmath=_FAST)
def attention(q, k_cache, v_cache, start, scale, out):
    """q: (n, n_head, hd) f32 for positions start .. start+n-1; k_cache: (n_blocks,
    n_head_kv, hd, block) and v_cache: (n_blocks, n_head_kv, block, hd), both fp16 bits
    (uint16, kernels.halves) or both float32, position p of kv head g at k_cache[p // block, g, :, p % block] and
    v_cache[p // block, g, p % block, :], holding positions 0 .. start+n-1 -> out: (n,
    n_head, hd) f32. Query head h reads kv head h // (n_head / n_head_kv); position p sees
    keys 0..p.
    Keys are stored transposed and values not, so that both products run along contiguous
    memory without a horizontal sum per key: the scores as multiply-adds along each block's
    positions per head dimension, the output as multiply-adds along the head dimensions per
    position. Blocks of positions keep the memory touched proportional to the positions
    used; fp16 (as llama.cpp's default cache) halves what a step reads.
    Dot products and sums may be reassociated (no NaN/inf assumptions)."""
    for job in prange(q.shape[0] * k_cache.shape[1]):
        _attend(q, k_cache, v_cache, start, scale, out, job)


@njit(cache=True, nogil=True)
def store_kv(k_cache, v_cache, k, v, start):
    """k, v: (n, n_head_kv, hd) f32 for positions start .. start+n-1 -> the caches in
    attention's layouts (rounded to fp16 for uint16 caches); positions past the caches are dropped (callers
    check the context first)."""
    n_blocks, n_head_kv, hd, block = k_cache.shape
    n_blocks = min(n_blocks, v_cache.shape[0])
    n_head_kv = min(n_head_kv, v_cache.shape[1], k.shape[1], v.shape[1])
    hd = min(hd, v_cache.shape[3], k.shape[2], v.shape[2])
    for t in range(min(k.shape[0], v.shape[0])):
        p = start + t
        if p < 0 or p >= n_blocks * block:
            continue
        b, o = p // block, p % block
        for g in range(n_head_kv):
            for d in range(hd):
                k_cache[b, g, d, o] = stored(k_cache, k[t, g, d])
                v_cache[b, g, o, d] = stored(v_cache, v[t, g, d])


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
def gather_kv(k_cache, v_cache, g, n_keys, keys, values):
    """The caches in attention's layouts -> keys, values: (n_keys, hd) f32, the first
    n_keys positions of kv head g, one row per position."""
    n_blocks, _, hd, block = k_cache.shape
    n_keys = min(n_keys, min(n_blocks, v_cache.shape[0]) * block, keys.shape[0], values.shape[0])
    hd = min(hd, v_cache.shape[3], keys.shape[1], values.shape[1])
    for p in range(n_keys):
        b, o = p // block, p % block
        for d in range(hd):
            keys[p, d] = as_f32(k_cache[b, g, d, o])
            values[p, d] = as_f32(v_cache[b, g, o, d])
