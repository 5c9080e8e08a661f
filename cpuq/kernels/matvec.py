"""Matrix-vector products for one token (decode), reading the quantized blocks in place.

out[r] = sum_k W[r, k] * x[k] for w: uint8 (m, row_bytes) rows of one GGML type and x: (k,)
f32. Each row is one call of blocks.dot_row_q (the block unpacking and the multiply-adds
in LLVM vector IR, accumulators in registers), rows spread over the threads.

x in integers: for the types decode spends its time in (Q8_0, Q5_0, Q4_K, Q6_K), on x86
hosts, x is rounded once per product to int16 per span of 256 elements (of 32 when k is
not a multiple of 256; scale = max|x| / 32767) and each block's integers are multiplied
with it by pmaddwd: half the vector instructions of converting every weight to float.
K-quant blocks (Q4_K, Q6_K) are read as 16-bit words, whose
masks and shifts give the even and odd elements of two groups with no shuffles (x is
copied once per product into that order, blocks.X_ORDERS), and sum in int32 (vpdpwssd
with AVX512-VNNI), each group's products times its small scale. The rounding error is
2^-16 of a span's largest |x| at most, ~2e-5 of a product's range measured (llama.cpp
rounds x to int8: 2^-8). Other types, and other hosts, multiply in float32.
Up to three matrices that multiply the same x (q, k, v; gate, up) share one parallel
region: a decode step runs ~100 of them, and each costs a thread wake-up and a dispatch.
Values are decoded exactly as quants.decode does; the sum's order differs, as any BLAS's.

Types without a block kernel (F32, F16, BF16) go through matmul.matmul.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit, prange

from ..quants.types import GGML_TYPES, Q8_0
from .blocks import BLOCK_IR, dot_row_q, order_x
from .matmul import matmul, n_blocks

BLOCK_TYPES = tuple(BLOCK_IR)  # the types dot_row_q reads


@njit(cache=True)
def quantize_x(x, xq, dx, xsum):
    """x: (k,) f32 (k a multiple of 32) -> xq: (3, k) int16 and per 32-element group g:
    dx[g], the scale of x[32g:32g+32] ~ xq[0, 32g:32g+32] * dx[g], and xsum[g], the group's
    float sum. Groups are rounded in spans of 256 elements sharing one scale (max |x| / 32767
    over the span) when k is a multiple of 256, else of 32: K-quant blocks then sum their 8
    groups' integer products before converting them once. xq's rows 1 and 2 hold row 0 in
    blocks.X_ORDERS (Q4_K, Q6_K) per whole 256 elements (the rest is not written). A span
    holding NaN/inf gets dx = NaN, so products with it are NaN, as in float."""
    xq0 = xq[0]
    n_groups = min(x.shape[0] // 32, dx.shape[0], xsum.shape[0], xq0.shape[0] // 32)
    span = 8 if x.shape[0] % 256 == 0 else 1
    for g in range(n_groups):
        total = np.float32(0.0)
        for j in range(32):
            total += x[g * 32 + j]
        xsum[g] = total
    one = np.empty(1, np.int32)
    for s0 in range(0, n_groups, span):
        s1 = min(n_groups, s0 + span)
        # loops over slices from 0: a loop from s0 * 32 does not vectorize (Numba's
        # negative-index wraparound); |x| as the float's bits is an exact integer max.
        xs, qs = x[s0 * 32:s1 * 32], xq0[s0 * 32:s1 * 32]
        bits = xs.view(np.int32)
        amax = np.int32(0)
        for j in range(bits.shape[0]):
            a = bits[j] & np.int32(0x7FFFFFFF)
            amax = a if a > amax else amax
        if amax >= np.int32(0x7F800000):  # inf or NaN
            d = np.float32(np.nan)
        else:
            one[0] = amax
            d = one.view(np.float32)[0] / np.float32(32767.0)
        dx[s0:s1] = d
        if not (d > 0.0):  # zero, or NaN
            qs[:] = 0
            continue
        inv = np.float32(1.0) / d
        for j in range(xs.shape[0]):
            v = np.rint(xs[j] * inv)
            v = v if v < np.float32(32767.0) else np.float32(32767.0)
            v = v if v > np.float32(-32767.0) else np.float32(-32767.0)
            qs[j] = np.int16(v)
    if xq.shape[0] == 3:
        order_x(xq[:, :n_groups // 8 * 256])


@njit(cache=True, inline="always")
def _dot(ggml_type, x, xq, dx, xsum, w, r):
    """Row r of w (a type in BLOCK_TYPES) times x, over the whole blocks both hold."""
    return dot_row_q(ggml_type, x, xq, dx, xsum, w, r, n_blocks(ggml_type, x.shape[0], w.shape[1]))


@njit(cache=True, parallel=True)
def matvec3(x, w0, t0, out0, w1, t1, out1, w2, t2, out2):
    """x: (k,) f32; w_i: (m_i, row_bytes_i) uint8 of type t_i in BLOCK_TYPES -> out_i:
    (m_i,) f32 = W_i @ x, for the rows both w_i and out_i hold (m_i may be 0)."""
    m0 = min(w0.shape[0], out0.shape[0])
    m1 = min(w1.shape[0], out1.shape[0])
    m2 = min(w2.shape[0], out2.shape[0])
    n_groups = x.shape[0] // 32
    xq = np.empty((3, n_groups * 32), np.int16)
    dx = np.empty(n_groups, np.float32)
    xsum = np.empty(n_groups, np.float32)
    quantize_x(x, xq, dx, xsum)
    x = x[:n_groups * 32]  # the blocks' bounds come from x: the same for every reading of it
    for r in prange(m0 + m1 + m2):
        if r < m0:
            out0[r] = _dot(t0, x, xq, dx, xsum, w0, r)
        elif r < m0 + m1:
            out1[r - m0] = _dot(t1, x, xq, dx, xsum, w1, r - m0)
        else:
            out2[r - m0 - m1] = _dot(t2, x, xq, dx, xsum, w2, r - m0 - m1)


# an empty matrix (with its type and output) for matvec3's unused places
NONE_TYPE = Q8_0
NONE_W, NONE_OUT = np.zeros((0, GGML_TYPES[NONE_TYPE].type_size), np.uint8), np.zeros(0, np.float32)
NONE_W.setflags(write=False)  # as the mapped weights, and as Numba types a global: one matvec3 signature


def matvec_many(x: np.ndarray, weights: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
    """x: (k,) f32; weights: up to three (w uint8 (m_i, row_bytes_i), ggml_type_i) ->
    [(m_i,) f32 = W_i @ x], the block types in one parallel region."""
    x = np.ascontiguousarray(x)  # quantize_x reads x's bits
    outs = [np.empty(w.shape[0], np.float32) for w, _ in weights]
    fused = [(w, t, o) for (w, t), o in zip(weights, outs) if t in BLOCK_TYPES]
    for (w, t), o in zip(weights, outs):
        if t not in BLOCK_TYPES:
            matmul(x.reshape(1, -1), w, t, o.reshape(1, -1))
    if fused:
        fused += [(NONE_W, NONE_TYPE, NONE_OUT)] * (3 - len(fused))
        (w0, t0, o0), (w1, t1, o1), (w2, t2, o2) = fused
        matvec3(x, w0, t0, o0, w1, t1, o1, w2, t2, o2)
    return outs


def matvec(x: np.ndarray, w: np.ndarray, ggml_type: int, out: np.ndarray) -> None:
    """x: (k,) f32, w: (m, row_bytes) uint8 of `ggml_type` -> out: (m,) f32."""
    out[:] = matvec_many(x, [(w, ggml_type)])[0]
