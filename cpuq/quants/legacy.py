"""Legacy-type encoders: float32 rows -> Q8_0, Q4_0, Q4_1, Q5_0 blocks of 32 values, byte for
byte as llama.cpp's `ggml_quantize_chunk` writes them.

Without an importance matrix llama.cpp runs quantize_row_*_ref (scale from the block's
extreme value, levels by truncating x/d + offset); with one, quantize_row_*_impl (a weighted
scale search: make_qx_quants for Q4_0/Q5_0, make_qkx_quants for Q4_1, weights
imatrix * sqrt(sigma2 + x^2) with sigma2 the mean square of the whole row). Q8_0 always
takes the _ref path: llama.cpp ignores the imatrix for it, and so does quantize_q8_0.

Block layouts (ggml-common.h), bytes per 32 values:
  Q8_0 34: d f16 | qs[32] int8
  Q4_0 18: d f16 | qs[16]                (value j in the low nibble of byte j, j+16 in the high)
  Q4_1 20: d f16 | m f16 | qs[16]
  Q5_0 22: d f16 | qh u32 (bit j: 5th bit of value j) | qs[16]

x: C-contiguous f32 (rows, cols), cols a multiple of 32; importance: f32 (cols,) or None.
The public wrapper in cpuq.quants validates both; loop bounds here still come from the
array shapes. Imports only numpy, numba and cpuq.quants.search.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .search import fp32_to_fp16_bits, make_qkx_quants, make_qx_quants, round_half_away

f32 = np.float32

QK = 32
Q8_0_BYTES = 2 + QK
Q4_0_BYTES = 2 + QK // 2
Q4_1_BYTES = 2 + 2 + QK // 2
Q5_0_BYTES = 2 + 4 + QK // 2

_JIT = dict(cache=True, fastmath=False, error_model="numpy")
_NO_IMPORTANCE = np.empty(0, np.float32)
_FLT_MAX = f32(3.4028234663852886e38)

# Values per unit of parallel work: the weighted searches run across all blocks of a unit at
# once (one SIMD lane each), so short rows are taken several at a time. Blocks never straddle
# rows, and sigma2 stays per row, so this changes no result.
TILE_VALUES = 4096


@njit(**_JIT)
def _put_f16(dst, offset, bits):
    dst[offset] = bits & 0xFF
    dst[offset + 1] = bits >> 8


@njit(**_JIT)
def _as_int8(v):
    """C's (int8_t) of a float: truncate toward zero, keep the low 8 bits (as x86 does)."""
    q = np.int64(v) & 0xFF
    return q - 256 if q > 127 else q


@njit(**_JIT)
def _n_blocks(x, out, type_size):
    return min(x.shape[0] // QK, out.shape[0] // type_size)


# ---------------------------------------------------------------------------------------------
# _ref paths

@njit(**_JIT)
def _ref_q8_0(x, out):
    for b in range(_n_blocks(x, out, Q8_0_BYTES)):
        o = b * Q8_0_BYTES
        amax = f32(0.0)
        for j in range(QK):
            a = abs(x[QK * b + j])
            amax = amax if amax > a else a
        d = amax / f32(127.0)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(out, o, fp32_to_fp16_bits(d))
        for j in range(QK):
            out[o + 2 + j] = np.int64(round_half_away(x[QK * b + j] * inv_d)) & 0xFF


@njit(**_JIT)
def _signed_peak(x, start):
    """The first value of largest magnitude in x[start:start+32] (0 if all are 0)."""
    amax = f32(0.0)
    peak = f32(0.0)
    for j in range(QK):
        v = x[start + j]
        if amax < abs(v):
            amax = abs(v)
            peak = v
    return peak


@njit(**_JIT)
def _ref_q4_1(x, out):
    for b in range(_n_blocks(x, out, Q4_1_BYTES)):
        o = b * Q4_1_BYTES
        lo = _FLT_MAX
        hi = -_FLT_MAX
        for j in range(QK):
            v = x[QK * b + j]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        d = (hi - lo) / f32(15.0)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(out, o, fp32_to_fp16_bits(d))
        _put_f16(out, o + 2, fp32_to_fp16_bits(lo))
        for j in range(QK // 2):
            q0 = min(15, _as_int8((x[QK * b + j] - lo) * inv_d + f32(0.5))) & 0xFF
            q1 = min(15, _as_int8((x[QK * b + j + 16] - lo) * inv_d + f32(0.5))) & 0xFF
            out[o + 4 + j] = (q0 | (q1 << 4)) & 0xFF


@njit(**_JIT)
def _pack_q5_0(out, o, j, q0, q1, qh):
    """Low nibbles of levels j and j+16 into qs[j]; returns qh with their 5th bits added."""
    out[o + 6 + j] = ((q0 & 0xF) | ((q1 & 0xF) << 4)) & 0xFF
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(**_JIT)
def _put_u32(dst, offset, v):
    for k in range(4):
        dst[offset + k] = (v >> (8 * k)) & 0xFF


@njit(**_JIT)
def _ref_symmetric(x, nmax, out):
    """Q4_0 (nmax 8) or Q5_0 (nmax 16): d = -peak / nmax, levels trunc(x/d + nmax + 0.5)."""
    type_size = Q4_0_BYTES if nmax == 8 else Q5_0_BYTES
    offset = f32(nmax) + f32(0.5)
    for b in range(_n_blocks(x, out, type_size)):
        o = b * type_size
        d = _signed_peak(x, QK * b) / f32(-nmax)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(out, o, fp32_to_fp16_bits(d))
        qh = 0
        for j in range(QK // 2):
            q0 = min(2 * nmax - 1, _as_int8(x[QK * b + j] * inv_d + offset)) & 0xFF
            q1 = min(2 * nmax - 1, _as_int8(x[QK * b + j + 16] * inv_d + offset)) & 0xFF
            if nmax == 8:
                out[o + 2 + j] = (q0 | (q1 << 4)) & 0xFF
            else:
                qh = _pack_q5_0(out, o, j, q0, q1, qh)
        if nmax == 16:
            _put_u32(out, o + 2, qh)


# ---------------------------------------------------------------------------------------------
# _impl paths (importance given)

@njit(**_JIT)
def _weighted_groups(x, cols, importance, nb):
    """Blocks as lanes: xt, wt: (32, nb) with wt = imatrix * sqrt(sigma2 + x^2), sigma2 the
    mean square of the block's row, summed in element order as llama.cpp does."""
    n_rows = x.shape[0] // cols
    sigma2 = np.zeros(n_rows, np.float32)
    for r in range(n_rows):
        sum_x2 = f32(0.0)
        for k in range(cols * r, cols * (r + 1)):
            sum_x2 += x[k] * x[k]
        sigma2[r] = sum_x2 / f32(cols)
    xt = np.empty((QK, nb), np.float32)
    wt = np.empty((QK, nb), np.float32)
    for b in range(nb):
        s2 = sigma2[(QK * b) // cols]
        column = (QK * b) % cols
        for j in range(QK):
            v = x[QK * b + j]
            xt[j, b] = v
            wt[j, b] = importance[column + j] * np.sqrt(s2 + v * v)
    return xt, wt


@njit(**_JIT)
def _impl_symmetric(x, cols, importance, nmax, out):
    """Q4_0 (nmax 8) or Q5_0 (nmax 16) with an imatrix: make_qx_quants per block."""
    type_size = Q4_0_BYTES if nmax == 8 else Q5_0_BYTES
    nb = _n_blocks(x, out, type_size)
    xt, wt = _weighted_groups(x, cols, importance, nb)
    L = np.empty((QK, nb), np.uint8)
    scales = np.empty(nb, np.float32)
    make_qx_quants(xt, wt, nmax, L, scales)
    for b in range(nb):
        o = b * type_size
        _put_f16(out, o, fp32_to_fp16_bits(scales[b]))
        qh = 0
        for j in range(QK // 2):
            if nmax == 8:
                out[o + 2 + j] = L[j, b] | (L[j + 16, b] << 4)
            else:
                qh = _pack_q5_0(out, o, j, np.int64(L[j, b]), np.int64(L[j + 16, b]), qh)
        if nmax == 16:
            _put_u32(out, o + 2, qh)


@njit(**_JIT)
def _impl_q4_1(x, cols, importance, out):
    """Q4_1 with an imatrix: make_qkx_quants (llama.cpp's make_qkx3_quants) per block."""
    nb = _n_blocks(x, out, Q4_1_BYTES)
    xt, wt = _weighted_groups(x, cols, importance, nb)
    L = np.empty((QK, nb), np.uint8)
    scales = np.empty(nb, np.float32)
    mins = np.empty(nb, np.float32)
    make_qkx_quants(xt, wt, 15, f32(-0.9), f32(0.05), 36, L, scales, mins)
    for b in range(nb):
        o = b * Q4_1_BYTES
        _put_f16(out, o, fp32_to_fp16_bits(scales[b]))
        _put_f16(out, o + 2, fp32_to_fp16_bits(-mins[b]))
        for j in range(QK // 2):
            out[o + 4 + j] = L[j, b] | (L[j + 16, b] << 4)


# ---------------------------------------------------------------------------------------------
# Row-parallel kernels and the public functions

@njit(**_JIT)
def _tiles(rows, cols):
    """(rows per tile, number of tiles) for work units of about TILE_VALUES values."""
    per_tile = max(1, TILE_VALUES // cols)
    return per_tile, (rows + per_tile - 1) // per_tile


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q8_0(x, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        _ref_q8_0(x[r0:r1].reshape(-1), out[r0:r1].reshape(-1))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_symmetric(x, importance, nmax, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    weighted = importance.shape[0] >= cols > 0
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        if weighted:
            _impl_symmetric(x[r0:r1].reshape(-1), cols, importance, nmax, out[r0:r1].reshape(-1))
        else:
            _ref_symmetric(x[r0:r1].reshape(-1), nmax, out[r0:r1].reshape(-1))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_q4_1(x, importance, out):
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    weighted = importance.shape[0] >= cols > 0
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        if weighted:
            _impl_q4_1(x[r0:r1].reshape(-1), cols, importance, out[r0:r1].reshape(-1))
        else:
            _ref_q4_1(x[r0:r1].reshape(-1), out[r0:r1].reshape(-1))


def _alloc(x, type_size):
    return np.empty((x.shape[0], x.shape[1] // QK * type_size), np.uint8)


def quantize_q8_0(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 34) Q8_0. `importance` is ignored, as in
    llama.cpp's quantize_q8_0."""
    out = _alloc(x, Q8_0_BYTES)
    _quantize_rows_q8_0(x, out)
    return out


def quantize_q4_0(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 18) Q4_0, as llama.cpp's quantize_q4_0."""
    out = _alloc(x, Q4_0_BYTES)
    _quantize_rows_symmetric(x, _NO_IMPORTANCE if importance is None else importance, 8, out)
    return out


def quantize_q4_1(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 20) Q4_1, as llama.cpp's quantize_q4_1."""
    out = _alloc(x, Q4_1_BYTES)
    _quantize_rows_q4_1(x, _NO_IMPORTANCE if importance is None else importance, out)
    return out


def quantize_q5_0(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 22) Q5_0, as llama.cpp's quantize_q5_0."""
    out = _alloc(x, Q5_0_BYTES)
    _quantize_rows_symmetric(x, _NO_IMPORTANCE if importance is None else importance, 16, out)
    return out
