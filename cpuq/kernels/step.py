"""The one-token (decode) ops a model file's stages name, as Numba functions: bound to
the stages by cpuq.runtime.stages, a block compiles to one Numba function and
`blocks` runs a token through every block in one call.

Why one call: from Python, a block's ~16 kernel calls each pay their argument checks and
allocations, and a call per block ~25 us for its ~30 arguments (docs/performance.md).
These are the kernels the prompt-chunk ops (runtime.chunk) run for one row, in the same
order, so a token's logits are bit-identical on either path (tests/runtime/test_logits.py).

The ops are inlined into the stages that call them (Numba IR), so a cold start compiles
the stages, not each op as well.

Shapes: x (1, n_embd) f32. A matrix is (w, ggml_type): w uint8 (rows, row_bytes) GGML
blocks of matvec.BLOCK_TYPES; a vector (norm, bias) is f32, or empty (0,) where the model
has none. c is a StepContext.

Imports numpy, numba and the sibling kernels only.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .activations import sigmoid_mul as _sigmoid_mul, split_halves as _split_halves, swiglu as _swiglu
from . import deltanet as _dn
from .attention import attention as _attention, store_kv
from .matvec import NONE_TYPE, NONE_W, matvec3
from . import moe as _moe
from .norms import rms_norm as _rms_norm
from .rope import apply_rope

# NONE_TYPE as an int64, not a literal: one compiled matvec3 for every call (each literal or
# array type is another full compilation, ~2 s of a cold start)
_NONE = np.array([NONE_TYPE], np.int64)

StepContext = namedtuple("StepContext", "eps cos sin neox k_cache v_cache start scale head_dim n_expert n_used "
                                        "norm_topk conv_state ssm_state n_group d_state v_heads v_dim v_tiled")
"""eps: RMSNorm's; cos, sin (1, n_rot/2) f32: the token's RoPE tables; k_cache, v_cache:
every layer's caches in kernels.attention's layouts; start: the token's position; scale:
attention's 1/sqrt(head_dim) as f32; n_expert, n_used, norm_topk: the experts per block,
the experts a token uses, whether their weights are renormalized (0, 0, False: dense).
The hybrids' Gated DeltaNet (runtime.forward.KVCache; empty arrays and zeros otherwise):
conv_state (n_layer, d_conv - 1, conv channels) and ssm_state (n_layer, v_heads, d_state,
v_dim) f32 every block's states; n_group key heads of d_state; v_heads value heads of
v_dim; v_tiled: value head h reads key head h % n_group (else h // (v_heads / n_group))."""

StepPack = namedtuple("StepPack", "buf at types vectors")
"""Every block's tensors addressed in the file's mapping (runtime.forward builds it):
buf (n_bytes,) uint8 the file; at (n_layer, n_matrix, 3) int64 each matrix (an expert
stack as its n_expert * rows rows) as (byte offset, rows, row bytes), (0, 0, 0) where the
model has none, types (n_layer, n_matrix) their type ids; vectors: per float32 tensor
(n_layer, *shape) f32, every dim 0 where the model has none."""


@njit(cache=True, inline="always")
def _row(v):
    return v.reshape(1, v.shape[0])


@njit(cache=True)
def products(x, w0, t0, w1, t1, w2, t2):
    """x (k,) f32 times three matrices of block types (NONE_W with type NONE_TYPE for none)
    -> their (m,) f32 outputs, in one parallel region, as matvec_many. F32/F16/BF16 matrices
    take the chunk path: compiling matmul here too cost ~3 s of a cold start."""
    o0, o1, o2 = np.empty(w0.shape[0], np.float32), np.empty(w1.shape[0], np.float32), np.empty(w2.shape[0], np.float32)
    matvec3(x, w0, t0, o0, w1, t1, o1, w2, t2, o2)
    return o0, o1, o2


@njit(inline="always")
def rms_norm(x, weight, c):
    h = np.empty_like(x)
    _rms_norm(x, weight, c.eps, h)
    return h


@njit(inline="always")
def linear3(h, a, b, d, c):
    o0, o1, o2 = products(h[0], a[0], a[1], b[0], b[1], d[0], d[1])
    return _row(o0), _row(o1), _row(o2)


@njit(inline="always")
def linear2(h, a, b, c):
    o0, o1, _ = products(h[0], a[0], a[1], b[0], b[1], NONE_W, _NONE[0])
    return _row(o0), _row(o1)


@njit(inline="always")
def linear(h, a, c):
    return _row(products(h.reshape(-1), a[0], a[1], NONE_W, _NONE[0], NONE_W, _NONE[0])[0])


@njit(inline="always")
def add_bias(t, bias, c):
    if bias.shape[0]:
        row = t[0]
        row += bias


@njit(inline="always")
def head_norm(t, weight, c):
    if weight.shape[0]:
        heads = t.reshape(t.shape[1] // c.head_dim, c.head_dim)
        _rms_norm(heads, weight, c.eps, heads)


@njit(inline="always")
def rope(t, c):
    apply_rope(t.reshape(1, t.shape[1] // c.head_dim, c.head_dim), c.cos, c.sin, c.neox)


@njit(inline="always")
def attend(q, k, v, il, c):
    hd = c.head_dim
    q3 = q.reshape(1, q.shape[1] // hd, hd)
    store_kv(c.k_cache[il], c.v_cache[il], k.reshape(1, k.shape[1] // hd, hd), v.reshape(1, v.shape[1] // hd, hd),
             c.start)
    out = np.empty_like(q3)
    _attention(q3, c.k_cache[il], c.v_cache[il], c.start, c.scale, out)
    return out.reshape(1, q.shape[1])


@njit(inline="always")
def swiglu(gate_up, c):
    gate, up = gate_up
    _swiglu(gate, up, gate)
    return gate


@njit(inline="always")
def route(h, w, c):
    ids = np.empty((1, c.n_used), np.int64)
    weights = np.empty((1, c.n_used), np.float32)
    _moe.route(h, w, c.n_used, c.norm_topk, ids, weights)
    return ids, weights


@njit(inline="always")
def experts(h, ids, weights, gate, up, down, c):
    sel = ids[0]
    m = gate[0].shape[0] // max(c.n_expert, 1)
    og = np.empty((sel.shape[0], m), np.float32)
    ou = np.empty((sel.shape[0], m), np.float32)
    _moe.gate_up(h[0], gate[0], gate[1], up[0], up[1], sel, og, ou)
    _swiglu(og, ou, og)
    y = np.empty((1, sel.shape[0], h.shape[1]), np.float32)
    _moe.down(og, down[0], down[1], sel, y[0])
    out = np.empty_like(h)
    _moe.weighted_sum(y, weights, out)
    return out


@njit(inline="always")
def present(a):
    return a[0].shape[0] > 0


@njit(inline="always")
def add_gated(out, y, h, g, c):
    _moe.add_gated(out, y, h, g)


@njit(inline="always")
def split_heads(qg, c):
    half = qg.shape[1] // 2
    q = np.empty((1, half), np.float32)
    gate = np.empty((1, half), np.float32)
    _split_halves(qg, c.head_dim, q, gate)
    return q, gate


@njit(inline="always")
def mul_sigmoid(out, gate, c):
    _sigmoid_mul(out, gate)


@njit(inline="always")
def split_ba(ba, c):
    beta = np.empty((1, c.v_heads), np.float32)
    alpha = np.empty((1, c.v_heads), np.float32)
    _split_halves(ba, c.v_heads // c.n_group, beta, alpha)
    return beta, alpha


@njit(inline="always")
def conv(qkv, w, il, c):
    out = np.empty_like(qkv)
    _dn.conv_step(qkv[0], c.conv_state[il], w, out[0])
    return out


@njit(inline="always")
def delta_rule(qkv, alpha, beta, dt, a, il, c):
    kd, vd = c.n_group * c.d_state, c.v_heads * c.v_dim
    g = np.empty((1, c.v_heads), np.float32)
    b = np.empty((1, c.v_heads), np.float32)
    _dn.gates(alpha, beta, dt, a, g, b)
    row = qkv[0]
    q = np.ascontiguousarray(row[:kd]).reshape(c.n_group, c.d_state)
    k = np.ascontiguousarray(row[kd:2 * kd]).reshape(c.n_group, c.d_state)
    v = np.ascontiguousarray(row[2 * kd:2 * kd + vd]).reshape(c.v_heads, c.v_dim)
    out = np.empty((c.v_heads, c.v_dim), np.float32)
    _dn.gdn_step(q, k, v, g[0], b[0], c.ssm_state[il], out, c.v_tiled, c.eps)
    return out.reshape(1, vd)


@njit(inline="always")
def gated_norm(out, w, z, c):
    o = out.reshape(c.v_heads, c.v_dim)
    _dn.gated_norm(o, w, z.reshape(c.v_heads, c.v_dim), c.eps, o)


OPS = dict(rms_norm=rms_norm, linear3=linear3, linear2=linear2, linear=linear, add_bias=add_bias,
           head_norm=head_norm, rope=rope, attend=attend, swiglu=swiglu, route=route, experts=experts,
           present=present, add_gated=add_gated, split_heads=split_heads, mul_sigmoid=mul_sigmoid,
           split_ba=split_ba, conv=conv, delta_rule=delta_rule, gated_norm=gated_norm)


@njit(cache=True, inline="always")
def matrix_at(buf, at):
    """Rows (at[1], at[2] bytes each) of buf from byte at[0]: a matrix of a StepPack."""
    return buf[at[0]:at[0] + at[1] * at[2]].reshape(at[1], at[2])


def blocks(x, n_layers, p, c):
    """x (1, n_embd) f32, in place: through blocks 0 .. n_layers-1 of the StepPack p.
    Compiled per model file with its `block` and `layer_at` (runtime.stages)."""
    for il in range(min(n_layers, p.at.shape[0])):
        block(x, layer_at(p, il), il, c)  # noqa: F821 (bound by runtime.stages)
