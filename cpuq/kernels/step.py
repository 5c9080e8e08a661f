"""One token through a transformer block's two stages (a decode step), each stage one
Numba call: `attention_step` (norm, q/k/v products, biases, q/k norms, RoPE, KV store,
attention, output product) and `mlp_step` (norm, gate/up products, SwiGLU, down product);
`blocks_step`: both stages of every block in one call.

Why: as Python, a stage is ~8 kernel calls, each with its argument checks and output
allocations, and the glue between them; composed here, a Qwen3-0.6B Q4_K_M token (28
blocks) takes 18.45 ms against 19.35 (tools/decode_ab.py, faster in 18 of 20 rounds). The
same kernels run in the same order with the same rounding, so the results are
bit-identical with runtime.forward's attention_block / mlp_block for one token; the
products keep their parallel regions (matvec.matvec3, attention.attention).

Shapes: x (n_embd,) f32; matrices uint8 (rows, row_bytes) GGML blocks of matvec.BLOCK_TYPES
with their type ids (runtime.weights checked them against the config at load); biases and
q/k norm weights f32, or empty (0,) where the model has none; cos, sin (1, n_rot/2) f32;
k_cache, v_cache one layer's caches in attention's layouts.

Imports numpy, numba and the sibling kernels only.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .activations import swiglu
from .attention import attention, store_kv
from .matvec import NONE_TYPE, NONE_W, matvec3
from .norms import rms_norm
from .rope import apply_rope

# NONE_TYPE as an int64, not a literal: one compiled matvec3 for every call (each literal or
# array type is another full compilation, ~2 s of a cold start)
_NONE = np.array([NONE_TYPE], np.int64)


@njit(cache=True, inline="always")
def _row(v):
    return v.reshape(1, v.shape[0])


@njit(cache=True)
def products(x, w0, t0, w1, t1, w2, t2):
    """x (k,) f32 times three matrices of block types (matvec.BLOCK_TYPES; w (m, row_bytes)
    uint8 of type t; NONE_W with type NONE_TYPE for none) -> their (m,) f32 outputs, in one
    parallel region, as matvec_many. F32/F16/BF16 matrices (matmul) take forward's
    stage-by-stage path: compiling matmul here too cost ~3 s of a cold start."""
    o0, o1, o2 = np.empty(w0.shape[0], np.float32), np.empty(w1.shape[0], np.float32), np.empty(w2.shape[0], np.float32)
    matvec3(x, w0, t0, o0, w1, t1, o1, w2, t2, o2)
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


@njit(cache=True, inline="always")
def _matrix(buf, at):
    """Rows (at[1], at[2] bytes each) of buf from byte at[0]: a matrix of blocks_step."""
    return buf[at[0]:at[0] + at[1] * at[2]].reshape(at[1], at[2])


@njit(cache=True)
def blocks_step(x, n_layers, buf, at, types, attn_norm, bq, bk, bv, q_norm, k_norm, ffn_norm, eps, cos, sin, neox,
                k_cache, v_cache, start, scale, n_head, n_head_kv, head_dim):
    """x (n_embd,) f32, in place: through blocks 0 .. n_layers-1 at position `start`, each as
    attention_step then mlp_step. Why: from Python, the two calls per block cost ~25 us with
    their ~30 arguments each (~0.6 ms of a ~19 ms Qwen3-0.6B token); the same kernels in the
    same order here give the same bits.
    buf (n_bytes,) uint8: the file; at (n_layer, 7, 3) int64: each block's q, k, v, output,
    gate, up and down matrices as (byte offset in buf, rows, row bytes), types (n_layer, 7)
    their type ids (BLOCK_TYPES; runtime.forward.StepPack checked both); attn_norm ... ffn_norm
    (n_layer, n) f32, n = 0 for what the model lacks; k_cache, v_cache: (n_layer, ...) the
    caches of every block, in attention's layouts."""
    for il in range(min(n_layers, at.shape[0], types.shape[0])):
        a, t = at[il], types[il]
        x += attention_step(x, attn_norm[il], eps, _matrix(buf, a[0]), t[0], bq[il], _matrix(buf, a[1]), t[1], bk[il],
                            _matrix(buf, a[2]), t[2], bv[il], q_norm[il], k_norm[il], cos, sin, neox, k_cache[il],
                            v_cache[il], start, scale, _matrix(buf, a[3]), t[3], n_head, n_head_kv, head_dim)
        x += mlp_step(x, ffn_norm[il], eps, _matrix(buf, a[4]), t[4], _matrix(buf, a[5]), t[5], _matrix(buf, a[6]),
                      t[6])
