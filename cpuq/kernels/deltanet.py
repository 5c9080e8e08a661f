"""Gated DeltaNet kernels (the linear-attention layers of qwen35, qwen35moe, qwen3next), as
HF transformers' Qwen3_5GatedDeltaNet computes them: the causal depthwise conv1d + silu over
the mixed q/k/v channels with its rolling state (`conv_step`, `conv_chunk`), the decay and
update gates (`gates`), the gated delta rule over the recurrent state (`gdn_step` one token,
`gdn_tokens` token by token, `gdn_chunk` the chunked parallel form) and the gated RMSNorm of
its output (`gated_norm`).

Layouts (float32, C-contiguous; every output is written into a caller's array):
- a token's projected row `mixed` (C,) = [q (nk*dk), k (nk*dk), v (nv*dv)];
- conv weight w (C, K), HF's conv1d.weight squeezed; conv state (K-1, C), row 0 the oldest
  of the previous K-1 inputs (zeros before the first token);
- recurrent state (nv, dk, dv): state[h, i, j] is HF's last_recurrent_state[b, h, i, j].
Value head h reads query/key head h % nk when `tiled` (llama.cpp's converter reorders the V
heads of qwen35/qwen35moe files so), h // (nv // nk) when not (HF's order, qwen3next files).

q and k are L2-normalized as HF's l2norm does, x * rsqrt(sum(x^2) + eps) (eps 1e-6 in HF),
and q is then scaled by 1/sqrt(dk). No kernel here uses fastmath: every reduction is laid
out along the contiguous last axis, so it vectorizes without reordering sums.

Imports numpy and numba only.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attention import _expf

_CHUNK = 64  # HF's torch_chunk_gated_delta_rule chunk size


@njit(cache=True, inline="always")
def _silu(x):
    """silu with attention._expf (within 3 ulp), which a loop over channels vectorizes
    (np.exp is a libm call per element: most of a prompt's conv time)."""
    return x / (np.float32(1.0) + _expf(-x))


@njit(cache=True, inline="always")
def _softplus(x):
    """torch's F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x))."""
    return x if x > np.float32(20.0) else np.log1p(np.exp(x))


# Below e^-60 a decay factor is flushed to 0: what it scales is then under 2^-80 of any
# output (far below float32 rounding), and the chunked form's products stay out of the
# subnormal range, where x86 float arithmetic is some hundred times slower.
_FLUSH = np.float32(-60.0)


@njit(cache=True, inline="always")
def _decay(x):
    """exp(x) for a log decay x <= 0, or 0 below _FLUSH."""
    return np.exp(x) if x > _FLUSH else np.float32(0.0)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(x, y, d):
    """x[:d] . y[:d]; reordered so it vectorizes (only the chunked form, which is no bit
    for bit match of anything, uses it)."""
    acc = np.float32(0.0)
    for i in range(d):
        acc += x[i] * y[i]
    return acc


@njit(cache=True)
def conv_step(x, state, w, out):
    """x (C,) f32 one token; state (K-1, C) f32 the previous K-1 inputs (row 0 the oldest);
    w (C, K) f32 -> out (C,) f32 = silu(sum over j of w[:, j] * [state; x][j]); state then
    holds the last K-1 inputs (shifted by one row, x appended)."""
    c_n = min(x.shape[0], out.shape[0], w.shape[0], state.shape[1])
    k_n = min(w.shape[1], state.shape[0] + 1)
    r = state.shape[0] - (k_n - 1)  # first state row the kernel reads
    wo = w.shape[1] - k_n  # first tap it uses (both 0 when state has K-1 rows)
    for c in range(c_n):
        acc = np.float32(0.0)
        for j in range(k_n - 1):
            acc += w[c, wo + j] * state[r + j, c]
        acc += w[c, wo + k_n - 1] * x[c]
        out[c] = acc
    for c in range(c_n):  # a loop of its own, so that it vectorizes
        out[c] = _silu(out[c])
    for j in range(state.shape[0] - 1):
        for c in range(c_n):
            state[j, c] = state[j + 1, c]
    if state.shape[0] > 0:
        for c in range(c_n):
            state[state.shape[0] - 1, c] = x[c]


@njit(cache=True, parallel=True)
def conv_chunk(x, state, w, out):
    """x (n, C) f32 n tokens; state (K-1, C) f32; w (C, K) f32 -> out (n, C) f32, each row
    as conv_step gives it (the same sums in the same order); state then holds the last K-1
    of [state; x] (also when n < K-1). Parallel over tokens."""
    n = min(x.shape[0], out.shape[0])
    c_n = min(x.shape[1], out.shape[1], w.shape[0], state.shape[1])
    km1 = state.shape[0]
    k_n = min(w.shape[1], km1 + 1)
    wt = np.empty((k_n, c_n), np.float32)  # w's taps as rows, so the channel loops vectorize
    for c in range(c_n):
        for j in range(k_n):
            wt[j, c] = w[c, w.shape[1] - k_n + j]
    for t in prange(n):
        o = out[t]
        for c in range(c_n):
            o[c] = np.float32(0.0)
        for j in range(k_n):
            p = t - (k_n - 1) + j  # the input this tap reads: x row p, or state row km1 + p
            wj = wt[j]
            if p >= 0:
                src = x[p]
                for c in range(c_n):
                    o[c] += wj[c] * src[c]
            else:
                src = state[km1 + p]
                for c in range(c_n):
                    o[c] += wj[c] * src[c]
        for c in range(c_n):
            o[c] = _silu(o[c])
    # the new state: the last km1 rows of [state; x], read before any row is overwritten
    keep = max(km1 - n, 0)
    for j in range(keep):
        for c in range(c_n):
            state[j, c] = state[j + n, c]
    for j in range(keep, km1):
        p = n - km1 + j
        for c in range(c_n):
            state[j, c] = x[p, c]


@njit(cache=True)
def gates(a, b, dt_bias, ssm_a, g, beta):
    """a, b (n, nv) f32 the alpha and beta projections; dt_bias (nv,) f32; ssm_a (nv,) f32,
    -exp(A_log) as GGUF stores it -> g (n, nv) f32 = ssm_a * softplus(a + dt_bias), the log
    of the per-token decay, and beta (n, nv) f32 = sigmoid(b)."""
    n = min(a.shape[0], b.shape[0], g.shape[0], beta.shape[0])
    nv = min(a.shape[1], b.shape[1], dt_bias.shape[0], ssm_a.shape[0], g.shape[1], beta.shape[1])
    for t in range(n):
        for h in range(nv):
            g[t, h] = ssm_a[h] * _softplus(a[t, h] + dt_bias[h])
            beta[t, h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[t, h]))


@njit(cache=True, inline="always")
def _key_head(h, nk, nv, tiled):
    """The query/key head value head h reads."""
    if tiled:
        return h % nk
    return min(h // max(nv // nk, 1), nk - 1)


@njit(cache=True, inline="always")
def _l2_normed(x, d, eps, scale, out):
    """out[:d] = x[:d] * rsqrt(sum(x[:d]^2) + eps) * scale, HF's l2norm then the query
    scaling (each product rounded as torch rounds it); the sum in float64, so its order
    does not matter."""
    acc = 0.0
    for i in range(d):
        v = np.float64(x[i])
        acc += v * v
    inv = np.float32(1.0 / np.sqrt(acc + eps))
    for i in range(d):
        out[i] = (x[i] * inv) * scale


@njit(cache=True, inline="always")
def _head_token(q, k, v, g, beta, s, out, kv, dk, dv):
    """One token of one value head: q, k (dk,) normalized (q scaled), v (dv,); s (>= dk,
    >= dv) the head's state, updated in place; out (dv,); kv (dv,) scratch. HF's
    torch_recurrent_gated_delta_rule: s *= exp(g); delta = (v - k^T s) * beta;
    s += k delta^T; out = q^T s. Two passes over s: read, then read and write."""
    decay = np.exp(g)
    for j in range(dv):
        kv[j] = np.float32(0.0)
    for i in range(dk):
        ki = k[i]
        for j in range(dv):
            kv[j] += (s[i, j] * decay) * ki
    for j in range(dv):
        kv[j] = (v[j] - kv[j]) * beta
        out[j] = np.float32(0.0)
    for i in range(dk):
        ki, qi = k[i], q[i]
        for j in range(dv):
            x = s[i, j] * decay + ki * kv[j]
            s[i, j] = x
            out[j] += x * qi


@njit(cache=True, parallel=True)
def gdn_step(q, k, v, g, beta, state, out, tiled, eps):
    """One token of the gated delta rule: q, k (nk, dk) f32 the conv output (not yet
    normalized), v (nv, dv) f32, g, beta (nv,) f32 (from `gates`); state (nv, dk, dv) f32,
    updated in place -> out (nv, dv) f32. Parallel over value heads; the state is read twice
    and written once."""
    nk, dk = min(q.shape[0], k.shape[0]), min(q.shape[1], k.shape[1], state.shape[1])
    nv = min(v.shape[0], g.shape[0], beta.shape[0], state.shape[0], out.shape[0])
    dv = min(v.shape[1], state.shape[2], out.shape[1])
    scale = np.float32(1.0 / np.sqrt(np.float64(dk)))
    qs, ks, kvs = np.empty((nv, dk), np.float32), np.empty((nv, dk), np.float32), np.empty((nv, dv), np.float32)
    for h in prange(nv):
        qn, kn, kv = qs[h], ks[h], kvs[h]
        kh = _key_head(h, nk, nv, tiled)
        _l2_normed(q[kh], dk, eps, scale, qn)
        _l2_normed(k[kh], dk, eps, np.float32(1.0), kn)
        _head_token(qn, kn, v[h], g[h], beta[h], state[h], out[h], kv, dk, dv)


# Columns of a head's state per task of gdn_tokens: the recurrence never mixes columns (each
# column j of S only needs its own k^T S[:, j]), so a (d_k, 64) block (32 KB at d_k 128)
# stays in L1 for all n tokens, where whole rows would stream 64 KB of state through L2
# twice a token; 64 columns give each row's multiply-adds 4 independent vectors where 32
# gave 2 (32 value heads of 128, 512 tokens, 1 thread: 72 -> 60 ms; 128 columns: slower).
_COLUMNS = 64


@njit(cache=True, parallel=True)
def gdn_tokens(q, k, v, g, beta, state, out, tiled, eps):
    """n tokens of the gated delta rule in the recurrent form, token by token (gdn_step's
    arithmetic, so equal to n gdn_step calls bit for bit): q, k (n, nk, dk), v (n, nv, dv),
    g, beta (n, nv) f32; state (nv, dk, dv) f32, continued and left final -> out (n, nv, dv)
    f32. Parallel over (value head, block of _COLUMNS state columns): each task keeps its
    block in L1 through all n tokens."""
    n = min(q.shape[0], k.shape[0], v.shape[0], g.shape[0], beta.shape[0], out.shape[0])
    nk, dk = min(q.shape[1], k.shape[1]), min(q.shape[2], k.shape[2], state.shape[1])
    nv = min(v.shape[1], g.shape[1], beta.shape[1], state.shape[0], out.shape[1])
    dv = min(v.shape[2], state.shape[2], out.shape[2])
    scale = np.float32(1.0 / np.sqrt(np.float64(dk)))
    qn, kn = np.empty((n, nk, dk), np.float32), np.empty((n, nk, dk), np.float32)
    for t in prange(n):  # each key head's normalized q and k once, for every value head it serves
        for h in range(nk):
            _l2_normed(q[t, h], dk, eps, scale, qn[t, h])
            _l2_normed(k[t, h], dk, eps, np.float32(1.0), kn[t, h])
    blocks = (dv + _COLUMNS - 1) // _COLUMNS
    for task in prange(nv * blocks):
        h, j0 = task // blocks, (task % blocks) * _COLUMNS
        w = min(_COLUMNS, dv - j0)
        kh = _key_head(h, nk, nv, tiled)
        s = state[h]
        blk = np.empty((dk, _COLUMNS), np.float32)
        for i in range(dk):
            for j in range(w):
                blk[i, j] = s[i, j0 + j]
        kv = np.empty(_COLUMNS, np.float32)
        o = np.empty(_COLUMNS, np.float32)
        for t in range(n):  # gdn_step's per-head arithmetic, on w of the head's columns
            _head_token(qn[t, kh], kn[t, kh], v[t, h, j0:], g[t, h], beta[t, h], blk, o, kv, dk, w)
            ot = out[t, h]
            for j in range(w):
                ot[j0 + j] = o[j]
        for i in range(dk):
            for j in range(w):
                s[i, j0 + j] = blk[i, j]


@njit(cache=True, parallel=True)
def gdn_chunk(q, k, v, g, beta, state, out, tiled, eps):
    """n tokens of the gated delta rule in the chunked parallel form (HF's
    torch_chunk_gated_delta_rule, chunks of 64 tokens); arguments as gdn_tokens'. Per chunk
    and value head: the unit lower-triangular system (I + tril(beta k k^T * decay)) is solved
    by forward substitution for the chunk's new values and decayed keys, the chunk's outputs
    are its queries against the incoming state plus the causal in-chunk attention, and the
    state takes the chunk's update in one pass. Parallel over value heads. The same function
    as gdn_tokens within float32 rounding, with about 1.4x its arithmetic (at dk = dv = 128),
    so the token loop is the faster prompt path here (Qwen3.5-0.8B's heads, 512 tokens,
    2 threads: 25 ms against 18 ms)."""
    n = min(q.shape[0], k.shape[0], v.shape[0], g.shape[0], beta.shape[0], out.shape[0])
    nk, dk = min(q.shape[1], k.shape[1]), min(q.shape[2], k.shape[2], state.shape[1])
    nv = min(v.shape[1], g.shape[1], beta.shape[1], state.shape[0], out.shape[1])
    dv = min(v.shape[2], state.shape[2], out.shape[2])
    scale = np.float32(1.0 / np.sqrt(np.float64(dk)))
    L = _CHUNK
    for h in prange(nv):
        kh = _key_head(h, nk, nv, tiled)
        s = state[h]
        qc = np.empty((L, dk), np.float32)     # normalized, scaled queries
        kc = np.empty((L, dk), np.float32)     # normalized keys
        a = np.zeros((L, L), np.float32)       # strictly lower: beta_t k_t.k_s exp(cum_t - cum_s)
        att = np.zeros((L, L), np.float32)     # lower with diagonal: q_t.k_s exp(cum_t - cum_s)
        u = np.empty((L, dv), np.float32)      # new values, then v_new
        wk = np.empty((L, dk), np.float32)     # decayed keys through the solve (k_cumdecay)
        cum = np.empty(L, np.float32)
        acc = np.empty(dv, np.float32)
        acc2 = np.empty(dv, np.float32)
        for t0 in range(0, n, L):
            m = min(L, n - t0)
            c = 0.0  # the in-chunk cumulative log decay, summed in float64 as torch's cumsum is
            for t in range(m):
                _l2_normed(q[t0 + t, kh], dk, eps, scale, qc[t])
                _l2_normed(k[t0 + t, kh], dk, eps, np.float32(1.0), kc[t])
                c += g[t0 + t, h]
                cum[t] = np.float32(c)
            # the lower triangles of a and att
            for t in range(m):
                bt = beta[t0 + t, h]
                for s_ in range(t + 1):
                    d = _decay(cum[t] - cum[s_])
                    a[t, s_] = (bt * _dot(kc[t], kc[s_], dk)) * d
                    att[t, s_] = _dot(qc[t], kc[s_], dk) * d
            # forward substitution: rows of (I + tril(a, -1))^-1 [beta v | beta exp(cum) k]
            for t in range(m):
                bt = beta[t0 + t, h]
                ec = _decay(cum[t])
                for j in range(dv):
                    u[t, j] = v[t0 + t, h, j] * bt
                for i in range(dk):
                    wk[t, i] = (kc[t, i] * bt) * ec
                for s_ in range(t):
                    x = a[t, s_]
                    for j in range(dv):
                        u[t, j] -= x * u[s_, j]
                    # row t of wk is exp(cum_t) times O(1) terms: flushed with it, not
                    # summed from products that would each be subnormal
                    if ec != np.float32(0.0):
                        for i in range(dk):
                            wk[t, i] -= x * wk[s_, i]
            # v_new = u - wk @ s, and the chunk's queries against the incoming state
            for t in range(m):
                ec = _decay(cum[t])
                for j in range(dv):
                    acc[j] = np.float32(0.0)
                    acc2[j] = np.float32(0.0)
                for i in range(dk):
                    x, y = wk[t, i], qc[t, i] * ec
                    for j in range(dv):
                        acc[j] += x * s[i, j]
                        acc2[j] += y * s[i, j]
                for j in range(dv):
                    u[t, j] -= acc[j]
                    out[t0 + t, h, j] = acc2[j]
            # plus the causal in-chunk attention over v_new
            for t in range(m):
                for j in range(dv):
                    acc[j] = np.float32(0.0)
                for s_ in range(t + 1):
                    x = att[t, s_]
                    for j in range(dv):
                        acc[j] += x * u[s_, j]
                for j in range(dv):
                    out[t0 + t, h, j] += acc[j]
            # the state: s * exp(cum_last) + sum over t of (k_t exp(cum_last - cum_t)) v_new_t^T
            last = cum[m - 1]
            el = _decay(last)
            for t in range(m):
                cum[t] = _decay(last - cum[t])
            for i in range(dk):
                for j in range(dv):
                    acc[j] = np.float32(0.0)
                for t in range(m):
                    x = kc[t, i] * cum[t]
                    for j in range(dv):
                        acc[j] += x * u[t, j]
                for j in range(dv):
                    s[i, j] = s[i, j] * el + acc[j]


@njit(cache=True, nogil=True)
def gated_norm(o, w, z, eps, out):
    """o, z (n, nv, dv) or (nv, dv) f32; w (dv,) f32 -> out (same shape) = each head's row
    o / sqrt(mean(o^2) + eps) * w * silu(z), HF's Qwen3_5RMSNormGated (w as stored, no +1).
    The mean square is summed in float64, as kernels.norms.rms_norm does. out may be o.
    Serial, as the other row kernels: a prompt splits its rows over gemm's workers, and a
    token's 16-48 heads are too little work for a parallel region."""
    dv = min(o.shape[-1], z.shape[-1], out.shape[-1], w.shape[0])
    rows = min(o.size // max(o.shape[-1], 1), z.size // max(z.shape[-1], 1), out.size // max(out.shape[-1], 1))
    o2 = o.reshape((o.size // max(o.shape[-1], 1), o.shape[-1]))
    z2 = z.reshape((z.size // max(z.shape[-1], 1), z.shape[-1]))
    out2 = out.reshape((out.size // max(out.shape[-1], 1), out.shape[-1]))
    for r in range(rows):
        acc = 0.0
        for j in range(dv):
            x = np.float64(o2[r, j])
            acc += x * x
        inv = np.float32(1.0 / np.sqrt(acc / max(dv, 1) + eps))
        for j in range(dv):
            out2[r, j] = (w[j] * (o2[r, j] * inv)) * _silu(z2[r, j])
