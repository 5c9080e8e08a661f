"""K-quant encoders: float32 rows -> Q4_K, Q5_K, Q6_K blocks, byte for byte as llama.cpp's
`ggml_quantize_chunk` writes them.

Without an importance matrix llama.cpp runs quantize_row_q*_K_ref, with one
quantize_row_q*_K_impl; so do these (Q4_K and Q5_K share one encoder, as they differ only
in level count, search parameters and bit packing):

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
array shapes. Imports only numpy, numba, cpuq.quants.search and cpuq.quants.types.
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
from .types import Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, QK_K

f32 = np.float32


_JIT = dict(cache=True, fastmath=False, error_model="numpy")

# Values per unit of parallel work. The searches run across all the groups of a unit at once
# (one SIMD lane each), which pays off from about a hundred groups; short rows are therefore
# taken several at a time. Groups never straddle rows, so this changes no result.
TILE_VALUES = 4096
_NO_IMPORTANCE = np.empty(0, np.float32)


@njit(**_JIT)
def _put_f16(ob, b, offset, bits):
    """Little-endian fp16 bits at byte `offset` of block ob[b]."""
    ob[b, offset] = bits & 0xFF
    ob[b, offset + 1] = bits >> 8


@njit(**_JIT)
def _as_blocks(x, out, type_size):
    """x: (n,) and out: (m,) as (blocks, 256) values and (blocks, type_size) bytes.

    Loops then index them with plain loop counters (plus constants): numba checks every
    signed index for wrap-around, and only for such indexes can LLVM drop the check and
    use contiguous vector loads; a view per block would instead cost reference counting."""
    nb = min(x.shape[0] // QK_K, out.shape[0] // type_size)
    return x[:nb * QK_K].reshape(nb, QK_K), out[:nb * type_size].reshape(nb, type_size)


@njit(**_JIT)
def _to_groups(x, n, xt):
    """x: (n * groups,) -> xt: (n, groups), xt[i, g] = x[n*g + i]."""
    groups = xt.shape[1]
    xg = x[:groups * n].reshape(groups, n)
    for g in range(groups):
        for i in range(n):
            xt[i, g] = xg[g, i]


# ---------------------------------------------------------------------------------------------
# Q4_K and Q5_K: scales and mins

@njit(**_JIT)
def _pack_scale_min(ob, b, ls, lm, j):
    """Store 6-bit scale ls and min lm of sub-block j in scales[12] (bytes 4..15) of block
    ob[b], llama.cpp's way: sub-blocks 0-3 in the low 6 bits of bytes 0-7, sub-blocks 4-7 as
    nibbles in bytes 8-11 with their top 2 bits in the high bits of bytes 0-7 (written after
    those)."""
    if j < 4:
        ob[b, 4 + j] = ls & 0xFF
        ob[b, 8 + j] = lm & 0xFF
    else:
        ob[b, 8 + j] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        ob[b, j] |= ((ls >> 4) << 6) & 0xFF
        ob[b, 4 + j] |= ((lm >> 4) << 6) & 0xFF


@njit(**_JIT)
def _unpack_scale_min(ob, b, j):
    """(scale, min) of sub-block j read back from the scales of block ob[b], as
    get_scale_min_k4."""
    if j < 4:
        return np.int64(ob[b, 4 + j] & 63), np.int64(ob[b, 8 + j] & 63)
    return (np.int64((ob[b, 8 + j] & 0xF) | ((ob[b, j] >> 6) << 4)),
            np.int64((ob[b, 8 + j] >> 4) | ((ob[b, 4 + j] >> 6) << 4)))


@njit(**_JIT)
def _pack_q4_k_levels(L, ob):
    """4-bit levels L: (blocks, 256) into qs[128] (bytes 16..143) of each Q4_K block: byte i
    of each 32-byte run holds value i of a 64-value chunk in its low nibble and value 32+i
    in its high nibble."""
    for b in range(L.shape[0]):
        for chunk in range(4):
            for i in range(32):
                ob[b, 16 + 32 * chunk + i] = L[b, 64 * chunk + i] | (L[b, 64 * chunk + 32 + i] << 4)


@njit(**_JIT)
def _pack_q5_k_levels(L, ob):
    """5-bit levels L: (blocks, 256) into qh[32] (bytes 16..47) and qs[128] (48..175) of each
    Q5_K block: nibbles as Q4_K, the fifth bit of value 64p+i in bit 2p of qh[i], of value
    64p+32+i in bit 2p+1."""
    for b in range(L.shape[0]):
        for i in range(32):
            ob[b, 16 + i] = 0
        for pair in range(4):
            for i in range(32):
                lo = np.int64(L[b, 64 * pair + i])
                hi = np.int64(L[b, 64 * pair + 32 + i])
                ob[b, 16 + i] |= ((lo >> 4) << (2 * pair)) | ((hi >> 4) << (2 * pair + 1))
                ob[b, 48 + 32 * pair + i] = (lo & 0xF) | ((hi & 0xF) << 4)


@njit(**_JIT)
def _encode_q45_k(x, cols, importance, nmax, out):
    """Whole rows of Q4_K (nmax 15) or Q5_K (nmax 31): x: (rows*cols,) f32 row after row,
    importance: (cols,) f32 or empty -> out: (rows*cols/256 * 144 or 176,) uint8.
    The two types differ only in the number of levels, the trial scales of the _ref search,
    one clamp, and how levels are packed."""
    xb, ob = _as_blocks(x, out, Q4_K_BYTES if nmax == 15 else Q5_K_BYTES)
    nb = xb.shape[0]
    groups = nb * 8
    # a whole number of super-blocks per row keeps every importance index below cols
    weighted = importance.shape[0] >= cols > 0 and cols % QK_K == 0
    xt = np.empty((32, groups), np.float32)
    wt = np.empty((32, groups), np.float32)
    Lt = np.empty((32, groups), np.uint8)
    scales = np.empty(groups, np.float32)
    mins = np.empty(groups, np.float32)
    L = np.empty((nb, QK_K), np.uint8)
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
                sigma2[b] += xb[b, k] * xb[b, k]
        for b in range(nb):
            sigma2[b] = f32(2.0) * sigma2[b] / f32(QK_K)
        groups_per_row = cols // 32
        imp = importance[:cols].reshape(groups_per_row, 32)
        for g in range(groups):
            s2 = sigma2[g // 8]
            c = g % groups_per_row
            for i in range(32):
                wt[i, g] = imp[c, i] * np.sqrt(s2 + xt[i, g] * xt[i, g])
        rmin, rdelta, nstep = f32(-0.9), f32(0.05), 36
    make_qkx_quants(xt, wt, nmax, rmin, rdelta, nstep, Lt, scales, mins)

    sub_w = np.zeros(8, np.float32)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    for b in range(nb):
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
                _pack_scale_min(ob, b, ls, lm, j)
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
                _pack_scale_min(ob, b, ls, lm, j)
            d_bits = fp32_to_fp16_bits(d_block)
            dmin_bits = fp32_to_fp16_bits(m_block)
        _put_f16(ob, b, 0, d_bits)
        _put_f16(ob, b, 2, dmin_bits)

        d_super = fp16_bits_to_fp32(d_bits)
        dmin_super = fp16_bits_to_fp32(dmin_bits)
        for j in range(8):
            ls, lm = _unpack_scale_min(ob, b, j)
            d = d_super * f32(ls)
            if d == f32(0.0):
                # llama.cpp keeps the search's levels for a sub-block whose scale rounds to 0
                for i in range(32):
                    L[b, 32 * j + i] = Lt[i, 8 * b + j]
                continue
            dm = dmin_super * f32(lm)
            for i in range(32):
                L[b, 32 * j + i] = max(0, min(nmax, nearest_int((xb[b, 32 * j + i] + dm) / d)))
    if nmax == 15:
        _pack_q4_k_levels(L, ob)
    else:
        _pack_q5_k_levels(L, ob)


# ---------------------------------------------------------------------------------------------
# Q6_K

@njit(**_JIT)
def _encode_q6_k(x, cols, importance, out):
    """Whole rows of Q6_K: x: (rows*cols,) f32 row after row, importance: (cols,) f32 or
    empty -> out: (rows*cols/256 * 210,) uint8."""
    xb, ob = _as_blocks(x, out, Q6_K_BYTES)
    nb = xb.shape[0]
    groups = nb * 16
    # a whole number of super-blocks per row keeps every importance index below cols
    weighted = importance.shape[0] >= cols > 0 and cols % QK_K == 0
    xt = np.empty((16, groups), np.float32)
    wt = np.empty((16, groups), np.float32)
    Lt = np.empty((16, groups), np.uint8)
    scales = np.empty(groups, np.float32)
    L = np.empty(QK_K, np.int64)
    _to_groups(x, 16, xt)
    if weighted:
        # _impl passes the raw imatrix as make_qx_quants' weights
        groups_per_row = cols // 16
        imp = importance[:cols].reshape(groups_per_row, 16)
        for g in range(groups):
            c = g % groups_per_row
            for i in range(16):
                wt[i, g] = imp[c, i]
    else:
        # _ref passes qw=NULL, which there means weights x^2
        for i in range(16):
            for g in range(groups):
                wt[i, g] = xt[i, g] * xt[i, g]
    make_qx_quants(xt, wt, 32, Lt, scales)

    for b in range(nb):
        max_scale = f32(0.0)
        max_abs_scale = f32(0.0)
        for ib in range(16):
            s = scales[16 * b + ib]
            if abs(s) > max_abs_scale:
                max_abs_scale = abs(s)
                max_scale = s
        if max_abs_scale < GROUP_MAX_EPS:
            for k in range(Q6_K_BYTES):
                ob[b, k] = 0
            continue
        iscale = f32(-128.0) / max_scale
        d_bits = fp32_to_fp16_bits(f32(1.0) / iscale)
        _put_f16(ob, b, 208, d_bits)
        d_super = fp16_bits_to_fp32(d_bits)
        for ib in range(16):
            q = min(127, nearest_int(iscale * scales[16 * b + ib])) & 0xFF
            ob[b, 192 + ib] = q
            q = q - 256 if q > 127 else q  # read back as the int8 it is stored as
            d = d_super * f32(q)
            if d == f32(0.0):
                for i in range(16):
                    L[16 * ib + i] = Lt[i, 16 * b + ib]
                continue
            for i in range(16):
                L[16 * ib + i] = max(-32, min(31, nearest_int(xb[b, 16 * ib + i] / d))) + 32
        for half in range(2):  # each 128 values: 64 bytes of low nibbles, 32 of high bit pairs
            for i in range(32):
                l0 = L[128 * half + i]
                l1 = L[128 * half + i + 32]
                l2 = L[128 * half + i + 64]
                l3 = L[128 * half + i + 96]
                ob[b, 64 * half + i] = (l0 & 0xF) | ((l2 & 0xF) << 4)
                ob[b, 64 * half + i + 32] = (l1 & 0xF) | ((l3 & 0xF) << 4)
                ob[b, 128 + 32 * half + i] = (l0 >> 4) | ((l1 >> 4) << 2) | ((l2 >> 4) << 4) | ((l3 >> 4) << 6)


# ---------------------------------------------------------------------------------------------
# Row-parallel kernels and the public functions

@njit(**_JIT)
def _tiles(rows, cols):
    """(rows per tile, number of tiles) for work units of about TILE_VALUES values."""
    per_tile = max(1, TILE_VALUES // cols)
    return per_tile, (rows + per_tile - 1) // per_tile


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q45_k(x, importance, nmax, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        _encode_q45_k(x[r0:r1].reshape(-1), cols, importance, nmax, out[r0:r1].reshape(-1))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q6_k(x, importance, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
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
