"""One token through a transformer block's two stages (a decode step), each stage one
Numba call: `attention_step` (norm, q/k/v products, biases, q/k norms, RoPE, KV store,
attention, output product) and `mlp_step` (norm, gate/up products, SwiGLU, down product).

Why: as Python, a stage is ~8 kernel calls, each with its argument checks and output
allocations, and the glue between them: ~1.5 ms of a ~22 ms Qwen3-0.6B token (28 blocks)
measured. Composed here, the same kernels run in the same order with the same rounding, so
the results are bit-identical with runtime.forward's attention_block / mlp_block for one
token; the products keep their parallel regions (matvec.matvec3, attention.attention).

Shapes: x (n_embd,) f32; matrices uint8 (rows, row_bytes) GGML blocks with their type ids
(runtime.weights checked them against the config at load); biases and q/k norm weights
f32, or empty (0,) where the model has none; cos, sin (1, n_rot/2) f32; k_cache, v_cache
one layer's caches in attention's layouts.

Imports numpy, numba and the sibling kernels only.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .activations import swiglu
from .attention import attention, store_kv
from .matmul import matmul
from .matvec import BLOCK_TYPES, NONE_TYPE, NONE_W, matvec3

# NONE_TYPE as an int64, not a literal: one compiled matvec3 for every call (each literal or
# array type is another full compilation, ~2 s of a cold start)
_NONE = np.array([NONE_TYPE], np.int64)
from .norms import rms_norm
from .rope import apply_rope


@njit(cache=True, inline="always")
def _row(v):
    return v.reshape(1, v.shape[0])


@njit(cache=True, inline="always")
def _is_block(t):
    found = False
    for b in BLOCK_TYPES:
        found |= t == b
    return found


@njit(cache=True)
def _product(x, w, t, out):
    if _is_block(t):
        nothing = np.empty(0, np.float32)  # not NONE_OUT: a global is a read-only constant in Numba
        matvec3(x, w, t, out, NONE_W, _NONE[0], nothing, NONE_W, _NONE[0], nothing)
    else:
        matmul(_row(x), w, t, _row(out))


@njit(cache=True)
def products(x, w0, t0, w1, t1, w2, t2):
    """x (k,) f32 times three matrices (w (m, row_bytes) uint8 of type t; NONE_W with
    type NONE_TYPE for none) -> their (m,) f32 outputs: the block types in one parallel region
    (F32/F16/BF16 matrices, rare in a quantized file, one at a time), as matvec_many."""
    o0, o1, o2 = np.empty(w0.shape[0], np.float32), np.empty(w1.shape[0], np.float32), np.empty(w2.shape[0], np.float32)
    if _is_block(t0) and _is_block(t1) and _is_block(t2):
        matvec3(x, w0, t0, o0, w1, t1, o1, w2, t2, o2)
    else:
        _product(x, w0, t0, o0)
        _product(x, w1, t1, o1)
        _product(x, w2, t2, o2)
    return o0, o1, o2


@njit(cache=True)
def attention_step(x, attn_norm, eps, wq, tq, bq, wk, tk, bk, wv, tv, bv, q_norm, k_norm, cos, sin, neox,
                   k_cache, v_cache, start, scale, wo, to, n_head, n_head_kv, head_dim):
    """The attention stage of one token at position `start` (its key and value stored in
    the caches) -> (n_embd,) f32, what the stage adds to x."""
    h = np.empty_like(x)
    rms_norm(_row(x), attn_norm, eps, _row(h))
    q, k, v = products(h, wq, tq, wk, tk, wv, tv)
    if bq.shape[0]:
        q += bq
    if bk.shape[0]:
        k += bk
    if bv.shape[0]:
        v += bv
    q3 = q.reshape(1, n_head, head_dim)
    k3 = k.reshape(1, n_head_kv, head_dim)
    if q_norm.shape[0]:  # qwen3: RMSNorm over each head before rope
        rms_norm(q.reshape(n_head, head_dim), q_norm, eps, q.reshape(n_head, head_dim))
        rms_norm(k.reshape(n_head_kv, head_dim), k_norm, eps, k.reshape(n_head_kv, head_dim))
    apply_rope(q3, cos, sin, neox)
    apply_rope(k3, cos, sin, neox)
    store_kv(k_cache, v_cache, k3, v.reshape(1, n_head_kv, head_dim), start)
    out = np.empty_like(q3)
    attention(q3, k_cache, v_cache, start, scale, out)
    return products(out.reshape(-1), wo, to, NONE_W, _NONE[0], NONE_W, _NONE[0])[0]


@njit(cache=True)
def mlp_step(x, ffn_norm, eps, w_gate, t_gate, w_up, t_up, w_down, t_down):
    """The MLP stage of one token -> (n_embd,) f32, what the stage adds to x."""
    h = np.empty_like(x)
    rms_norm(_row(x), ffn_norm, eps, _row(h))
    gate, up, _ = products(h, w_gate, t_gate, w_up, t_up, NONE_W, _NONE[0])
    swiglu(_row(gate), _row(up), _row(gate))
    return products(gate, w_down, t_down, NONE_W, _NONE[0], NONE_W, _NONE[0])[0]
