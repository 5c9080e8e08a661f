"""Matrix-vector products for one token (decode), reading the quantized blocks in place.

out[r] = sum_k W[r, k] * x[k] for w: uint8 (m, row_bytes) rows of one GGML type and x: (k,)
f32. Unlike matmul.py (decode a tile of rows to float32, then dot), each kernel here
multiplies the block values into 32 float32 accumulator lanes as it unpacks them and sums
the lanes once per row: the unpacking and the multiply-adds vectorize together and nothing
round-trips through memory. Values are decoded exactly as quants.decode does; the sum's
order differs (fastmath 'reassoc' + 'contract', no NaN/inf assumptions), as any BLAS's does.

Types without a kernel here go through matmul.matmul.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quants.search import fp16_bits_to_fp32
from .matmul import Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, matmul

_FAST = {"reassoc", "contract"}
ROWS_PER_TILE = 16


@njit(cache=True, inline="always")
def _half(w, r, at):
    return fp16_bits_to_fp32(np.uint32(w[r, at]) | (np.uint32(w[r, at + 1]) << np.uint32(8)))


@njit(cache=True, parallel=True, fastmath=_FAST)
def matvec_q8_0(x, w, out):
    """x: (k,) f32, w: (m, k/32 * 34) Q8_0 -> out: (m,) f32."""
    m = min(w.shape[0], out.shape[0])
    nb = min(x.shape[0] // 32, w.shape[1] // 34)
    for t in prange((m + ROWS_PER_TILE - 1) // ROWS_PER_TILE):
        lanes = np.empty(32, np.float32)
        for r in range(t * ROWS_PER_TILE, min(m, (t + 1) * ROWS_PER_TILE)):
            lanes[:] = 0.0
            for b in range(nb):
                o = b * 34
                d = _half(w, r, o)
                for j in range(32):
                    q = np.int32(w[r, o + 2 + j])
                    q = q - ((q & 128) << 1)  # the byte is an int8
                    lanes[j] += x[b * 32 + j] * (d * np.float32(q))
            out[r] = lanes.sum()


@njit(cache=True, parallel=True, fastmath=_FAST)
def matvec_q5_0(x, w, out):
    """x: (k,) f32, w: (m, k/32 * 22) Q5_0 -> out: (m,) f32."""
    m = min(w.shape[0], out.shape[0])
    nb = min(x.shape[0] // 32, w.shape[1] // 22)
    for t in prange((m + ROWS_PER_TILE - 1) // ROWS_PER_TILE):
        lanes = np.empty(32, np.float32)
        for r in range(t * ROWS_PER_TILE, min(m, (t + 1) * ROWS_PER_TILE)):
            lanes[:] = 0.0
            for b in range(nb):
                o = b * 22
                d = _half(w, r, o)
                # int32, not uint32: numba widens mixed uint32 shifts to 64 bits, which halves speed
                qh = (np.int32(w[r, o + 2]) | (np.int32(w[r, o + 3]) << 8)
                      | (np.int32(w[r, o + 4]) << 16) | (np.int32(w[r, o + 5]) << 24))
                for j in range(16):
                    byte = np.int32(w[r, o + 6 + j])
                    lo = (byte & 0xF) | (((qh >> j) & 1) << 4)
                    hi = (byte >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    lanes[j] += (d * x[b * 32 + j]) * np.float32(lo - 16)
                    lanes[j + 16] += (d * x[b * 32 + j + 16]) * np.float32(hi - 16)
            out[r] = lanes.sum()


@njit(cache=True, parallel=True, fastmath=_FAST)
def matvec_q4_1(x, w, out):
    """x: (k,) f32, w: (m, k/32 * 20) Q4_1 -> out: (m,) f32."""
    m = min(w.shape[0], out.shape[0])
    nb = min(x.shape[0] // 32, w.shape[1] // 20)
    for t in prange((m + ROWS_PER_TILE - 1) // ROWS_PER_TILE):
        lanes = np.empty(32, np.float32)
        for r in range(t * ROWS_PER_TILE, min(m, (t + 1) * ROWS_PER_TILE)):
            lanes[:] = 0.0
            for b in range(nb):
                o = b * 20
                d = _half(w, r, o)
                mn = _half(w, r, o + 2)
                for j in range(16):
                    byte = np.int32(w[r, o + 4 + j])
                    lanes[j] += x[b * 32 + j] * (d * np.float32(byte & 0xF) + mn)
                    lanes[j + 16] += x[b * 32 + j + 16] * (d * np.float32(byte >> 4) + mn)
            out[r] = lanes.sum()


@njit(cache=True, inline="always")
def _k_scale_min(w, r, s, j):
    """6-bit (scale, min) of sub-block j from the 12 packed bytes at w[r, s:s+12] (as
    quants.decode._k_scale_min)."""
    if j < 4:
        scale = np.int32(w[r, s + j]) & 63
        minimum = np.int32(w[r, s + j + 4]) & 63
    else:
        packed = np.int32(w[r, s + j + 4])
        scale = (packed & 0xF) | ((np.int32(w[r, s + j - 4]) >> 6) << 4)
        minimum = (packed >> 4) | ((np.int32(w[r, s + j]) >> 6) << 4)
    return scale, minimum


@njit(cache=True, parallel=True, fastmath=_FAST)
def matvec_q4_k(x, w, out):
    """x: (k,) f32, w: (m, k/256 * 144) Q4_K -> out: (m,) f32."""
    m = min(w.shape[0], out.shape[0])
    nb = min(x.shape[0] // 256, w.shape[1] // 144)
    for t in prange((m + ROWS_PER_TILE - 1) // ROWS_PER_TILE):
        lanes = np.empty(32, np.float32)
        for r in range(t * ROWS_PER_TILE, min(m, (t + 1) * ROWS_PER_TILE)):
            lanes[:] = 0.0
            for b in range(nb):
                o = b * 144
                d = _half(w, r, o)
                dmin = _half(w, r, o + 2)
                for pair in range(4):
                    s0, m0 = _k_scale_min(w, r, o + 4, 2 * pair)
                    s1, m1 = _k_scale_min(w, r, o + 4, 2 * pair + 1)
                    d0, mm0 = d * np.float32(s0), dmin * np.float32(m0)
                    d1, mm1 = d * np.float32(s1), dmin * np.float32(m1)
                    q_at = o + 16 + pair * 32
                    y = b * 256 + pair * 64
                    for l in range(32):
                        byte = np.int32(w[r, q_at + l])
                        lanes[l] += (x[y + l] * (d0 * np.float32(byte & 0xF) - mm0)
                                     + x[y + 32 + l] * (d1 * np.float32(byte >> 4) - mm1))
            out[r] = lanes.sum()


@njit(cache=True, parallel=True, fastmath=_FAST)
def matvec_q6_k(x, w, out):
    """x: (k,) f32, w: (m, k/256 * 210) Q6_K -> out: (m,) f32."""
    m = min(w.shape[0], out.shape[0])
    nb = min(x.shape[0] // 256, w.shape[1] // 210)
    for t in prange((m + ROWS_PER_TILE - 1) // ROWS_PER_TILE):
        lanes = np.empty(32, np.float32)
        for r in range(t * ROWS_PER_TILE, min(m, (t + 1) * ROWS_PER_TILE)):
            lanes[:] = 0.0
            for b in range(nb):
                o = b * 210
                d = _half(w, r, o + 208)
                for half in range(2):
                    ql = o + half * 64
                    qh = o + 128 + half * 32
                    sc = o + 192 + half * 8
                    y = b * 256 + half * 128
                    for g in range(2):  # elements 16g .. 16g+15 of each quarter share a scale
                        s = np.empty(4, np.float32)
                        for quarter in range(4):
                            v = np.int32(w[r, sc + quarter * 2 + g])
                            s[quarter] = d * np.float32(v - ((v & 128) << 1))
                        for i in range(16):
                            l = g * 16 + i
                            a = np.int32(w[r, ql + l])
                            c = np.int32(w[r, ql + 32 + l])
                            h = np.int32(w[r, qh + l])
                            q0 = ((a & 0xF) | ((h & 3) << 4)) - 32
                            q1 = ((c & 0xF) | (((h >> 2) & 3) << 4)) - 32
                            q2 = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32
                            q3 = ((c >> 4) | (((h >> 6) & 3) << 4)) - 32
                            lanes[l] += (x[y + l] * (s[0] * np.float32(q0)) + x[y + 32 + l] * (s[1] * np.float32(q1))
                                         + x[y + 64 + l] * (s[2] * np.float32(q2))
                                         + x[y + 96 + l] * (s[3] * np.float32(q3)))
            out[r] = lanes.sum()


def matvec(x: np.ndarray, w: np.ndarray, ggml_type: int, out: np.ndarray) -> None:
    """x: (k,) f32, w: (m, row_bytes) uint8 of `ggml_type` -> out: (m,) f32."""
    if ggml_type == Q4_K:
        matvec_q4_k(x, w, out)
    elif ggml_type == Q6_K:
        matvec_q6_k(x, w, out)
    elif ggml_type == Q8_0:
        matvec_q8_0(x, w, out)
    elif ggml_type == Q5_0:
        matvec_q5_0(x, w, out)
    elif ggml_type == Q4_1:
        matvec_q4_1(x, w, out)
    else:
        matmul(x.reshape(1, -1), w, ggml_type, out.reshape(1, -1))
