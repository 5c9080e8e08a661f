"""Mixture-of-experts kernels: the router (softmax, top-k, weights) and one token's
selected experts read in place from their stacks.

A stack is w: uint8 (n_expert * rows, row_bytes), expert e's matrix its rows
e*rows .. (e+1)*rows - 1. Only the selected experts' rows are read, each with the same
per-row dot product as matvec (so one token's experts give the prompt chunk's numbers
bit for bit), all selected experts' gate and up rows in one parallel region and their
down rows in another.

Imports numpy, numba and the sibling kernels only.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .matvec import _dot, quantize_x

# llama.cpp clamps the top-k weights' sum to F16's smallest normal before dividing by it
_MIN_SUM = np.float32(6.103515625e-5)
# the router's dot products may reorder their sums (so they vectorize), as matmul's do
_DOT = {"reassoc", "contract"}


@njit(cache=True, inline="always")
def _select(logits, n_used, norm, ids, weights, i):
    """Row i of ids and weights from one token's router logits (n_expert,) f32, which it
    overwrites with their softmax."""
    n_expert = logits.shape[0]
    used = min(n_used, n_expert, ids.shape[1], weights.shape[1])
    top = np.float32(-np.inf)
    for e in range(n_expert):
        top = max(top, logits[e])
    total = np.float32(0.0)
    for e in range(n_expert):
        logits[e] = np.exp(logits[e] - top)
        total += logits[e]
    for e in range(n_expert):
        logits[e] /= total
    picked = 0
    while picked < used:
        best = -1
        for e in range(n_expert):
            taken = False
            for q in range(picked):
                taken |= ids[i, q] == e
            if not taken and (best < 0 or logits[e] > logits[best]):
                best = e
        ids[i, picked] = best
        weights[i, picked] = logits[best]
        picked += 1
    if norm:
        s = np.float32(0.0)
        for q in range(used):
            s += weights[i, q]
        s = max(s, _MIN_SUM)
        for q in range(used):
            weights[i, q] /= s


@njit(cache=True, nogil=True, fastmath=_DOT)
def route(h, w, n_used, norm, ids, weights):
    """h (n, k) f32 rows, w (n_expert, k) f32 router -> ids (n, n_used) int64: each row's
    n_used most probable experts, most probable first (the lower index on a tie), and
    weights (n, n_used) f32: their softmax probabilities, divided by their sum if norm."""
    logits = np.empty(w.shape[0], np.float32)
    for i in range(min(h.shape[0], ids.shape[0], weights.shape[0])):
        for e in range(w.shape[0]):
            acc = np.float32(0.0)
            for j in range(min(h.shape[1], w.shape[1])):
                acc += h[i, j] * w[e, j]
            logits[e] = acc
        _select(logits, n_used, norm, ids, weights, i)


@njit(cache=True, nogil=True)
def route_logits(logits, n_used, norm, ids, weights):
    """route's choice from the router's logits (n, n_expert) f32, already computed (a
    prompt chunk's by one BLAS product); overwrites them with their softmax."""
    for i in range(min(logits.shape[0], ids.shape[0], weights.shape[0])):
        _select(logits[i], n_used, norm, ids, weights, i)


@njit(cache=True, parallel=True)
def gate_up(x, wg, tg, wu, tu, ids, og, ou):
    """x (k,) f32, one token; wg, wu: stacks (n_expert * m rows) of types tg, tu; ids (K,)
    the selected experts -> og, ou (K, m) f32: each selected expert's gate and up rows."""
    m = og.shape[1]
    n_groups = x.shape[0] // 32
    xq = np.empty((3, n_groups * 32), np.int16)
    dx = np.empty(n_groups, np.float32)
    xsum = np.empty(n_groups, np.float32)
    quantize_x(x, xq, dx, xsum)
    x = x[:n_groups * 32]
    n_sel = min(ids.shape[0], og.shape[0], ou.shape[0])
    for r in prange(2 * n_sel * m):
        k, i = (r // m) % n_sel, r % m
        row = ids[k] * m + i
        if r < n_sel * m:
            if 0 <= row < wg.shape[0]:
                og[k, i] = _dot(tg, x, xq, dx, xsum, wg, row)
        elif 0 <= row < wu.shape[0] and i < ou.shape[1]:
            ou[k, i] = _dot(tu, x, xq, dx, xsum, wu, row)


@njit(cache=True, parallel=True)
def down(act, wd, td, ids, out):
    """act (K, f) f32, the selected experts' activations; wd: stack (n_expert * m rows) of
    type td -> out (K, m) f32: expert ids[k]'s down projection of act[k]."""
    n_sel, m = min(ids.shape[0], act.shape[0], out.shape[0]), out.shape[1]
    n_groups = act.shape[1] // 32
    xq = np.empty((n_sel, 3, n_groups * 32), np.int16)
    dx = np.empty((n_sel, n_groups), np.float32)
    xsum = np.empty((n_sel, n_groups), np.float32)
    for k in range(n_sel):
        quantize_x(act[k], xq[k], dx[k], xsum[k])
    for r in prange(n_sel * m):
        k, i = r // m, r % m
        row = ids[k] * m + i
        if 0 <= row < wd.shape[0]:
            out[k, i] = _dot(td, act[k, :n_groups * 32], xq[k], dx[k], xsum[k], wd, row)


@njit(cache=True)
def weighted_sum(y, weights, out):
    """y (n, K, d), weights (n, K) -> out (n, d) = sum over k of weights[:, k] * y[:, k],
    added in k's order (llama.cpp's order: the most probable expert first)."""
    for i in range(min(y.shape[0], out.shape[0], weights.shape[0])):
        for j in range(min(y.shape[2], out.shape[1])):
            acc = np.float32(0.0)
            for k in range(min(y.shape[1], weights.shape[1])):
                acc += weights[i, k] * y[i, k, j]
            out[i, j] = acc


@njit(cache=True, fastmath=_DOT)
def add_gated(out, y, h, g):
    """out (n, d) += sigmoid(h[i] . g) * y (n, d): qwen2moe's gated shared expert."""
    for i in range(min(out.shape[0], y.shape[0], h.shape[0])):
        acc = np.float32(0.0)
        for j in range(min(h.shape[1], g.shape[0])):
            acc += h[i, j] * g[j]
        gate = np.float32(1.0) / (np.float32(1.0) + np.exp(-acc))
        for j in range(min(out.shape[1], y.shape[1])):
            out[i, j] += gate * y[i, j]
