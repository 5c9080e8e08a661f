"""The prompt-chunk ops a model file's stages name (runtime.stages binds them): n tokens
at once, a chunk of at least gemm.min_tokens through gemm's worker threads (int8 or
BLAS products, row ranges of the row-wise kernels), a shorter one on the calling thread.
Also the reference path: an observer (the importance matrix's collector) sees the input
of every product here.

Shapes: x (n, n_embd) f32; a matrix is a runtime.weights.Matrix; a vector f32 or None
where the model has none. c is a ChunkContext.

Imports numpy, cpuq.kernels and cpuq.runtime.gemm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..kernels import activations, attention as attn, deltanet, moe, norms
from ..kernels.matmul import matmul
from ..kernels.matvec import matvec_many
from ..kernels.rope import apply_rope
from .gemm import Gemm

Observer = Callable[[np.ndarray, tuple[str, ...]], None]


@dataclass
class ChunkContext:
    """What the ops need besides their operands: cos, sin (n, n_rot/2) the chunk's RoPE
    tables; k_cache, v_cache every layer's caches (runtime.forward.KVCache); start the
    first token's position; gemm the workers (None: this thread); observe(x, names);
    n_expert, n_used, norm_topk and the Gated DeltaNet's states and sizes (conv_state ..
    v_tiled): kernels.step.StepContext's."""
    eps: float
    cos: np.ndarray
    sin: np.ndarray
    neox: bool
    k_cache: np.ndarray
    v_cache: np.ndarray
    start: int
    scale: np.float32
    head_dim: int
    gemm: Gemm | None = None
    observe: Observer | None = None
    n_expert: int = 0
    n_used: int = 0
    norm_topk: bool = False
    conv_state: np.ndarray | None = None
    ssm_state: np.ndarray | None = None
    n_group: int = 0
    d_state: int = 0
    v_heads: int = 0
    v_dim: int = 0
    v_tiled: bool = False


def batched(gemm: Gemm | None, n: int) -> bool:
    """Whether n rows go through gemm's workers (a chunk of at least gemm.min_tokens)."""
    return gemm is not None and n >= gemm.min_tokens


def products(x: np.ndarray, c: ChunkContext, *ws) -> list[np.ndarray]:
    """x (n, k) @ W.T for each W (up to three). One token: the fused per-row kernels, all W
    in one parallel region; a batched chunk: gemm, all W in one round of tasks.
    c.observe(x, names of the W) first, when given."""
    if c.observe is not None:
        c.observe(x, tuple(w.name for w in ws))
    if x.shape[0] == 1:
        return [o.reshape(1, -1) for o in matvec_many(x[0], [(w.data, w.ggml_type) for w in ws])]
    if batched(c.gemm, x.shape[0]):
        return c.gemm.linear(x, [(w.data, w.ggml_type) for w in ws])
    outs = [np.empty((x.shape[0], w.rows), np.float32) for w in ws]
    for w, out in zip(ws, outs):
        matmul(x, w.data, w.ggml_type, out)
    return outs


def rows(c: ChunkContext, n: int, fn) -> None:
    """fn(lo, hi) over rows [0, n): in gemm's workers for a batched chunk."""
    if not batched(c.gemm, n):
        fn(0, n)
    else:
        c.gemm.split(n, fn)


def rms_norm(x, weight, c):
    out = np.empty_like(x)
    rows(c, x.shape[0], lambda lo, hi: norms.rms_norm(x[lo:hi], weight, c.eps, out[lo:hi]))
    return out


def linear3(h, a, b, d, c):
    return tuple(products(h, c, a, b, d))


def linear2(h, a, b, c):
    return tuple(products(h, c, a, b))


def linear(h, a, c):
    return products(h, c, a)[0]


def add_bias(t, bias, c):
    if bias is not None:
        t += bias


def head_norm(t, weight, c):
    if weight is not None:
        n, hd = t.shape[0], c.head_dim
        heads = t.reshape(n, -1, hd)
        rows(c, n, lambda lo, hi: norms.rms_norm(heads[lo:hi].reshape(-1, hd), weight, c.eps,
                                                heads[lo:hi].reshape(-1, hd)))


def rope(t, c):
    n = t.shape[0]
    heads = t.reshape(n, -1, c.head_dim)
    rows(c, n, lambda lo, hi: apply_rope(heads[lo:hi], c.cos[lo:hi], c.sin[lo:hi], c.neox))


def attend(q, k, v, il, c):
    n, hd = q.shape[0], c.head_dim
    q3 = q.reshape(n, -1, hd)
    attn.store_kv(c.k_cache[il], c.v_cache[il], k.reshape(n, -1, hd), v.reshape(n, -1, hd), c.start)
    out = np.empty_like(q3)
    if not batched(c.gemm, n):
        attn.attention(q3, c.k_cache[il], c.v_cache[il], c.start, c.scale, out)
    else:
        c.gemm.attention(q3, c.k_cache[il], c.v_cache[il], c.start, c.scale, out)
    return out.reshape(n, -1)


def swiglu(gate_up, c):
    gate, up = gate_up
    rows(c, gate.shape[0], lambda lo, hi: activations.swiglu(gate[lo:hi], up[lo:hi], gate[lo:hi]))
    return gate


def route(h, w, c):
    ids = np.empty((h.shape[0], c.n_used), np.int64)
    weights = np.empty((h.shape[0], c.n_used), np.float32)
    if batched(c.gemm, h.shape[0]):  # the logits by sgemm: the kernel's loop took ~3% of a 256-expert prompt
        logits = h @ w.T
        rows(c, h.shape[0], lambda lo, hi: moe.route_logits(logits[lo:hi], c.n_used, c.norm_topk, ids[lo:hi],
                                                            weights[lo:hi]))
    else:
        rows(c, h.shape[0], lambda lo, hi: moe.route(h[lo:hi], w, c.n_used, c.norm_topk, ids[lo:hi], weights[lo:hi]))
    return ids, weights


def expert_groups(ids: np.ndarray, n_expert: int):
    """(order, [(e, lo, hi)]): the (token, pick) slots of ids (n, k), flattened, sorted by
    expert (stable), and each picked expert's range of them: order[lo:hi]."""
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(n_expert + 1))
    return order, [(e, bounds[e], bounds[e + 1]) for e in range(n_expert) if bounds[e] < bounds[e + 1]]


def experts(h, ids, weights, gate, up, down, c):
    """Tokens grouped by expert: each selected expert's matrices are read once for all of
    its tokens. A batched chunk runs every group's gate and up products in one round of
    the workers' tasks and their down products in another (Gemm.linear_groups); otherwise
    group by group (products: one row through the per-row kernels, as the decode step does)."""
    n, k = ids.shape
    y = np.empty((n, k, h.shape[1]), np.float32)
    order, groups = expert_groups(ids, c.n_expert)
    if batched(c.gemm, n):
        tokens, slots = order // k, order % k
        spans = [(lo, hi) for _, lo, hi in groups]
        gate_up = [(gate.expert(e), up.expert(e)) for e, _, _ in groups]
        downs = [(down.expert(e),) for e, _, _ in groups]
        if c.observe is not None:
            for (lo, hi), (g, u) in zip(spans, gate_up):
                c.observe(h[tokens[lo:hi]], (g.name, u.name))
        act = swiglu(c.gemm.linear_groups(h, spans, [[(m.data, m.ggml_type) for m in ms] for ms in gate_up],
                                          tokens), c)
        if c.observe is not None:
            for (lo, hi), (d,) in zip(spans, downs):
                c.observe(act[lo:hi], (d.name,))
        y[tokens, slots] = c.gemm.linear_groups(act, spans, [[(d.data, d.ggml_type)] for d, in downs])[0]
    else:
        for e, lo, hi in groups:
            picks = order[lo:hi]
            tokens, slots = picks // k, picks % k
            act = swiglu(linear2(np.ascontiguousarray(h[tokens]), gate.expert(e), up.expert(e), c), c)
            y[tokens, slots] = linear(act, down.expert(e), c)
    out = np.empty_like(h)
    rows(c, n, lambda lo, hi: moe.weighted_sum(y[lo:hi], weights[lo:hi], out[lo:hi]))
    return out


def present(a):
    return a is not None


def add_gated(out, y, h, g, c):
    rows(c, out.shape[0], lambda lo, hi: moe.add_gated(out[lo:hi], y[lo:hi], h[lo:hi], g))


def split_heads(qg, c):
    n, half = qg.shape[0], qg.shape[1] // 2
    q, gate = np.empty((n, half), np.float32), np.empty((n, half), np.float32)
    rows(c, n, lambda lo, hi: activations.split_halves(qg[lo:hi], c.head_dim, q[lo:hi], gate[lo:hi]))
    return q, gate


def mul_sigmoid(out, gate, c):
    rows(c, out.shape[0], lambda lo, hi: activations.sigmoid_mul(out[lo:hi], gate[lo:hi]))


def split_ba(ba, c):
    n = ba.shape[0]
    beta, alpha = np.empty((n, c.v_heads), np.float32), np.empty((n, c.v_heads), np.float32)
    activations.split_halves(ba, c.v_heads // c.n_group, beta, alpha)
    return beta, alpha


def conv(qkv, w, il, c):
    """The causal conv runs along the tokens: one call (parallel over tokens inside)."""
    out = np.empty_like(qkv)
    deltanet.conv_chunk(qkv, c.conv_state[il], w, out)
    return out


def delta_rule(qkv, alpha, beta, dt, a, il, c):
    """The recurrence runs along the tokens, in parallel over value heads (inside)."""
    n, kd, vd = qkv.shape[0], c.n_group * c.d_state, c.v_heads * c.v_dim
    g, b = np.empty((n, c.v_heads), np.float32), np.empty((n, c.v_heads), np.float32)
    deltanet.gates(alpha, beta, dt, a, g, b)
    q = np.ascontiguousarray(qkv[:, :kd]).reshape(n, c.n_group, c.d_state)
    k = np.ascontiguousarray(qkv[:, kd:2 * kd]).reshape(n, c.n_group, c.d_state)
    v = np.ascontiguousarray(qkv[:, 2 * kd:2 * kd + vd]).reshape(n, c.v_heads, c.v_dim)
    out = np.empty((n, c.v_heads, c.v_dim), np.float32)
    PROMPT_RULE(q, k, v, g, b, c.ssm_state[il], out, c.v_tiled, c.eps)
    return out.reshape(n, vd)


def gated_norm(out, w, z, c):
    n = out.shape[0]
    o, zz = out.reshape(n, c.v_heads, c.v_dim), z.reshape(n, c.v_heads, c.v_dim)
    rows(c, n, lambda lo, hi: deltanet.gated_norm(o[lo:hi], w, zz[lo:hi], c.eps, o[lo:hi]))


# The prompt's delta rule: the token loop, which equals the decode step bit for bit and ran
# faster than the chunked form (deltanet.gdn_chunk, HF's) at Qwen3.5-0.8B's head sizes
# (docs/performance.md): the state stays in cache, and the chunked form does more arithmetic.
PROMPT_RULE = deltanet.gdn_tokens


OPS = dict(rms_norm=rms_norm, linear3=linear3, linear2=linear2, linear=linear, add_bias=add_bias,
           head_norm=head_norm, rope=rope, attend=attend, swiglu=swiglu, route=route, experts=experts,
           present=present, add_gated=add_gated, split_heads=split_heads, mul_sigmoid=mul_sigmoid,
           split_ba=split_ba, conv=conv, delta_rule=delta_rule, gated_norm=gated_norm)
