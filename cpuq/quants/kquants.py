"""K-quant encoders: float32 rows -> Q4_K, Q5_K, Q6_K blocks, byte for byte as llama.cpp's
`ggml_quantize_chunk` writes them.

Without an importance matrix llama.cpp runs quantize_row_q*_K_ref, with one
quantize_row_q*_K_impl; so do these, one row kernel per type and path:

  Q4_K / Q5_K  per 32 values a scale and a min (make_qkx_quants), then the 8 scales and
               8 mins of a 256-super-block quantized to 6 bits against two fp16 super-scales
               (the max, or make_qp_quants when weighted); finally every value re-quantized
               against the stored scales.
  Q6_K         per 16 values a symmetric scale (make_qx_quants), the 16 scales quantized to
               int8 against one fp16 super-scale, values re-quantized.

Block layouts (ggml-common.h), bytes per 256 values:
  Q4_K 144: d f16 | dmin f16 | scales[12] | qs[128]
  Q5_K 176: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
  Q6_K 210: ql[128] | qh[64] | scales[16] int8 | d f16

x: C-contiguous f32 (rows, cols), cols a multiple of 256; importance: f32 (cols,) or None.
The public wrapper in cpuq.quants validates both; loop bounds here still come from the
array shapes. Imports only numpy, numba and cpuq.quants.search.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .search import (
    GROUP_MAX_EPS,
    fp16_bits_to_fp32,
    fp32_to_fp16_bits,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
)

f32 = np.float32

QK_K = 256
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2
Q5_K_BYTES = 2 + 2 + 12 + QK_K // 8 + QK_K // 2
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2

_JIT = dict(cache=True, fastmath=False, error_model="numpy")

# Values per unit of parallel work. The searches run across all the groups of a unit at once
# (one SIMD lane each), which pays off from about a hundred groups; short rows are therefore
# taken several at a time. Groups never straddle rows, so this changes no result.
TILE_VALUES = 4096
_NO_IMPORTANCE = np.empty(0, np.float32)


@njit(**_JIT)
def _put_f16(dst, offset, bits):
    dst[offset] = bits & 0xFF
    dst[offset + 1] = bits >> 8


@njit(**_JIT)
def _to_groups(x, n, xt):
    """x: (n * groups,) -> xt: (n, groups), xt[i, g] = x[n*g + i]."""
    groups = xt.shape[1]
    for g in range(groups):
        for i in range(n):
            xt[i, g] = x[n * g + i]


# ---------------------------------------------------------------------------------------------
# Q4_K and Q5_K: scales and mins

@njit(**_JIT)
def _pack_scale_min(sc, ls, lm, j):
    """Store 6-bit scale ls and min lm of sub-block j in the 12-byte `sc`, llama.cpp's way:
    sub-blocks 0-3 in the low 6 bits of bytes 0-7, sub-blocks 4-7 as nibbles in bytes 8-11
    with their top 2 bits in the high bits of bytes 0-7 (written after those)."""
    if j < 4:
        sc[j] = ls & 0xFF
        sc[j + 4] = lm & 0xFF
    else:
        sc[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        sc[j - 4] |= ((ls >> 4) << 6) & 0xFF
        sc[j] |= ((lm >> 4) << 6) & 0xFF


@njit(**_JIT)
def _unpack_scale_min(sc, j):
    """(scale, min) of sub-block j read back from the 12 bytes, as get_scale_min_k4."""
    if j < 4:
        return np.int64(sc[j] & 63), np.int64(sc[j + 4] & 63)
    return (np.int64((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)),
            np.int64((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)))


@njit(**_JIT)
def _pack_q4_k_levels(L, nb, out):
    """4-bit levels (nb*256,) into qs[128] of each Q4_K block: byte i of each 32-byte run
    holds value i of a 64-value chunk in its low nibble and value 32+i in its high nibble."""
    for b in range(nb):
        o = b * Q4_K_BYTES + 16
        for k in range(0, QK_K, 64):
            base = QK_K * b + k
            for i in range(32):
                out[o + k // 2 + i] = L[base + i] | (L[base + i + 32] << 4)


@njit(**_JIT)
def _pack_q5_k_levels(L, nb, out):
    """5-bit levels (nb*256,) into qh[32] and qs[128] of each Q5_K block: nibbles as Q4_K,
    the fifth bit of value 64p+i in bit 2p of qh[i], of value 64p+32+i in bit 2p+1."""
    for b in range(nb):
        qh = b * Q5_K_BYTES + 16
        qs = qh + 32
        for i in range(32):
            out[qh + i] = 0
        for pair in range(4):
            base = QK_K * b + 64 * pair
            for i in range(32):
                lo = np.int64(L[base + i])
                hi = np.int64(L[base + i + 32])
                bits = 0
                if lo > 15:
                    lo -= 16
                    bits |= 1 << (2 * pair)
                if hi > 15:
                    hi -= 16
                    bits |= 2 << (2 * pair)
                out[qh + i] |= bits
                out[qs + 32 * pair + i] = lo | (hi << 4)


@njit(**_JIT)
def _encode_q45_k(x, cols, importance, nmax, out):
    """Whole rows of Q4_K (nmax 15) or Q5_K (nmax 31): x: (rows*cols,) f32 row after row,
    importance: (cols,) f32 or empty -> out: (rows*cols/256 * 144 or 176,) uint8.
    The two types differ only in the number of levels, the trial scales of the _ref search,
    one clamp, and how levels are packed."""
    row_bytes_per_block = Q4_K_BYTES if nmax == 15 else Q5_K_BYTES
    nb = min(x.shape[0] // QK_K, out.shape[0] // row_bytes_per_block)
    groups = nb * 8
    weighted = importance.shape[0] >= cols > 0
    xt = np.empty((32, groups), np.float32)
    wt = np.empty((32, groups), np.float32)
    Lt = np.empty((32, groups), np.uint8)
    scales = np.empty(groups, np.float32)
    mins = np.empty(groups, np.float32)
    L = np.empty(nb * QK_K, np.uint8)
    _to_groups(x, 32, xt)

    if not weighted:
        # quantize_row_q*_K_ref: weights av_x + |x|, av_x the rms of the 32-value sub-block
        sum_x2 = np.zeros(groups, np.float32)
        for i in range(32):
            for g in range(groups):
                sum_x2[g] += xt[i, g] * xt[i, g]
        for g in range(groups):
            av_x = np.sqrt(sum_x2[g] / f32(32))
            for i in range(32):
                wt[i, g] = av_x + abs(xt[i, g])
        # the trial scales of quantize_row_q4_K_ref / q5_K_ref
        rmin, rdelta, nstep = (f32(-1.0), f32(0.1), 20) if nmax == 15 else (f32(-0.5), f32(0.1), 15)
    else:
        # quantize_row_q*_K_impl: weights imatrix * sqrt(sigma2 + x^2), sigma2 from the
        # whole 256-value super-block, summed in element order
        sigma2 = np.zeros(nb, np.float32)
        for k in range(QK_K):
            for b in range(nb):
                v = x[QK_K * b + k]
                sigma2[b] += v * v
        for b in range(nb):
            sigma2[b] = f32(2.0) * sigma2[b] / f32(QK_K)
        for g in range(groups):
            s2 = sigma2[g // 8]
            column = (32 * g) % cols
            for i in range(32):
                wt[i, g] = importance[column + i] * np.sqrt(s2 + xt[i, g] * xt[i, g])
        rmin, rdelta, nstep = f32(-0.9), f32(0.05), 36
    make_qkx_quants(xt, wt, nmax, rmin, rdelta, nstep, Lt, scales, mins)

    sub_w = np.zeros(8, np.float32)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    for b in range(nb):
        o = b * row_bytes_per_block
        sc = out[o + 4:o + 16]
        if not weighted:
            max_scale = f32(0.0)
            max_min = f32(0.0)
            for j in range(8):
                if scales[8 * b + j] > max_scale:
                    max_scale = scales[8 * b + j]
                if mins[8 * b + j] > max_min:
                    max_min = mins[8 * b + j]
            inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
            inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
            for j in range(8):
                # C stores nearest_int's result in a uint8 before clamping it
                ls = min(63, nearest_int(inv_scale * scales[8 * b + j]) & 0xFF)
                lm = min(63, nearest_int(inv_min * mins[8 * b + j]) & 0xFF)
                _pack_scale_min(sc, ls, lm, j)
            d_bits = fp32_to_fp16_bits(max_scale / f32(63.0))
            dmin_bits = fp32_to_fp16_bits(max_min / f32(63.0))
        else:
            for j in range(8):
                s = f32(0.0)
                for i in range(32):
                    s += wt[i, 8 * b + j]
                sub_w[j] = s
            d_block = make_qp_quants(scales[8 * b:8 * b + 8], sub_w, 63, Ls)
            m_block = make_qp_quants(mins[8 * b:8 * b + 8], sub_w, 63, Lm)
            for j in range(8):
                ls = np.int64(Ls[j])
                lm = np.int64(Lm[j])
                if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
                    ls = min(63, ls)
                    lm = min(63, lm)
                _pack_scale_min(sc, ls, lm, j)
            d_bits = fp32_to_fp16_bits(d_block)
            dmin_bits = fp32_to_fp16_bits(m_block)
        _put_f16(out, o, d_bits)
        _put_f16(out, o + 2, dmin_bits)

        d_super = fp16_bits_to_fp32(d_bits)
        dmin_super = fp16_bits_to_fp32(dmin_bits)
        for j in range(8):
            ls, lm = _unpack_scale_min(sc, j)
            d = d_super * f32(ls)
            base = QK_K * b + 32 * j
            if d == f32(0.0):
                # llama.cpp keeps the search's levels for a sub-block whose scale rounds to 0
                for i in range(32):
                    L[base + i] = Lt[i, 8 * b + j]
                continue
            dm = dmin_super * f32(lm)
            for i in range(32):
                L[base + i] = max(0, min(nmax, nearest_int((x[base + i] + dm) / d)))
    if nmax == 15:
        _pack_q4_k_levels(L, nb, out)
    else:
        _pack_q5_k_levels(L, nb, out)


# ---------------------------------------------------------------------------------------------
# Q6_K

@njit(**_JIT)
def _encode_q6_k(x, cols, importance, out):
    """Whole rows of Q6_K: x: (rows*cols,) f32 row after row, importance: (cols,) f32 or
    empty -> out: (rows*cols/256 * 210,) uint8."""
    nb = min(x.shape[0] // QK_K, out.shape[0] // Q6_K_BYTES)
    groups = nb * 16
    weighted = importance.shape[0] >= cols > 0
    xt = np.empty((16, groups), np.float32)
    wt = np.empty((16, groups), np.float32)
    Lt = np.empty((16, groups), np.uint8)
    scales = np.empty(groups, np.float32)
    L = np.empty(QK_K, np.int64)
    _to_groups(x, 16, xt)
    for g in range(groups):
        column = (16 * g) % cols if weighted else 0
        for i in range(16):
            # _impl passes the raw imatrix as make_qx_quants' weights; _ref passes NULL,
            # which there means x^2
            wt[i, g] = importance[column + i] if weighted else xt[i, g] * xt[i, g]
    make_qx_quants(xt, wt, 32, Lt, scales)

    for b in range(nb):
        o = b * Q6_K_BYTES
        max_scale = f32(0.0)
        max_abs_scale = f32(0.0)
        for ib in range(16):
            s = scales[16 * b + ib]
            if abs(s) > max_abs_scale:
                max_abs_scale = abs(s)
                max_scale = s
        if max_abs_scale < GROUP_MAX_EPS:
            for k in range(Q6_K_BYTES):
                out[o + k] = 0
            continue
        iscale = f32(-128.0) / max_scale
        d_bits = fp32_to_fp16_bits(f32(1.0) / iscale)
        _put_f16(out, o + 208, d_bits)
        d_super = fp16_bits_to_fp32(d_bits)
        for ib in range(16):
            q = min(127, nearest_int(iscale * scales[16 * b + ib])) & 0xFF
            out[o + 192 + ib] = q
            q = q - 256 if q > 127 else q  # read back as the int8 it is stored as
            d = d_super * f32(q)
            if d == f32(0.0):
                for i in range(16):
                    L[16 * ib + i] = Lt[i, 16 * b + ib]
                continue
            for i in range(16):
                L[16 * ib + i] = max(-32, min(31, nearest_int(x[QK_K * b + 16 * ib + i] / d))) + 32
        for half in range(2):  # each 128 values: 64 bytes of low nibbles, 32 of high bit pairs
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            k = 128 * half
            for i in range(32):
                l0 = L[k + i]
                l1 = L[k + i + 32]
                l2 = L[k + i + 64]
                l3 = L[k + i + 96]
                out[ql + i] = (l0 & 0xF) | ((l2 & 0xF) << 4)
                out[ql + i + 32] = (l1 & 0xF) | ((l3 & 0xF) << 4)
                out[qh + i] = (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6)


# ---------------------------------------------------------------------------------------------
# Row-parallel kernels and the public functions

@njit(**_JIT)
def _rows_per_tile(cols):
    return max(1, TILE_VALUES // cols)


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q45_k(x, importance, nmax, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    per_tile = _rows_per_tile(cols)
    for t in prange((rows + per_tile - 1) // per_tile):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        _encode_q45_k(x[r0:r1].reshape(-1), cols, importance, nmax, out[r0:r1].reshape(-1))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q6_k(x, importance, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    per_tile = _rows_per_tile(cols)
    for t in prange((rows + per_tile - 1) // per_tile):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        _encode_q6_k(x[r0:r1].reshape(-1), cols, importance, out[r0:r1].reshape(-1))


def _alloc(x, type_size):
    return np.empty((x.shape[0], x.shape[1] // QK_K * type_size), np.uint8)


def _importance_or_empty(importance):
    return _NO_IMPORTANCE if importance is None else importance


def quantize_q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/256 * 144) Q4_K, as llama.cpp's quantize_q4_K."""
    out = _alloc(x, Q4_K_BYTES)
    _quantize_rows_q45_k(x, _importance_or_empty(importance), 15, out)
    return out


def quantize_q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/256 * 176) Q5_K, as llama.cpp's quantize_q5_K."""
    out = _alloc(x, Q5_K_BYTES)
    _quantize_rows_q45_k(x, _importance_or_empty(importance), 31, out)
    return out


def quantize_q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/256 * 210) Q6_K, as llama.cpp's quantize_q6_K."""
    out = _alloc(x, Q6_K_BYTES)
    _quantize_rows_q6_k(x, _importance_or_empty(importance), out)
    return out
