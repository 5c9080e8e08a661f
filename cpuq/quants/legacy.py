"""Legacy-type encoders: float32 rows -> Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 blocks of 32 values,
byte for byte as llama.cpp's `ggml_quantize_chunk` writes them.

Without an importance matrix llama.cpp runs quantize_row_*_ref (scale from the block's
extreme value, levels by truncating x/d + offset); with one, quantize_row_*_impl (a weighted
scale search: make_qx_quants for Q4_0/Q5_0, make_qkx_quants for Q4_1/Q5_1, weights
imatrix * sqrt(sigma2 + x^2) with sigma2 the mean square of the whole row). Q8_0 always
takes the _ref path: llama.cpp ignores the imatrix for it, and so does quantize_q8_0.

Block layouts (ggml-common.h), bytes per 32 values:
  Q8_0 34: d f16 | qs[32] int8
  Q4_0 18: d f16 | qs[16]                (value j in the low nibble of byte j, j+16 in the high)
  Q4_1 20: d f16 | m f16 | qs[16]
  Q5_0 22: d f16 | qh u32 (bit j: 5th bit of value j) | qs[16]
  Q5_1 24: d f16 | m f16 | qh u32 (as Q5_0) | qs[16]

x: C-contiguous f32 (rows, cols), cols a multiple of 32; importance: f32 (cols,) or None.
The public wrapper in cpuq.quants validates both; loop bounds here still come from the
array shapes. Imports only numpy, numba, cpuq.quants.search and cpuq.quants.types.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .search import (
    f32_bits,
    f32_from_bits,
    fp32_to_fp16_bits,
    make_qkx_quants,
    make_qx_quants,
    round_half_away,
)
from .types import Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, QK

f32 = np.float32


_JIT = dict(cache=True, fastmath=False, error_model="numpy")
_NO_IMPORTANCE = np.empty(0, np.float32)

# Values per unit of parallel work: the weighted searches run across all blocks of a unit at
# once (one SIMD lane each), so short rows are taken several at a time. Blocks never straddle
# rows, and sigma2 stays per row, so this changes no result.
TILE_VALUES = 4096


@njit(**_JIT)
def _put_f16(ob, b, offset, bits):
    """Little-endian fp16 bits at byte `offset` of block ob[b]."""
    ob[b, offset] = bits & 0xFF
    ob[b, offset + 1] = bits >> 8


@njit(**_JIT)
def _as_int8(v):
    """C's (int8_t) of a float as x86 computes it: truncate toward zero, keep the low 8 bits.
    Here v is either small or, when a block's scale is subnormal, +-inf or nan; for those x86
    gives the "integer indefinite" value (low byte 0), and so does this."""
    q = np.int64(v) & 0xFF
    return q - 256 if q > 127 else q


@njit(**_JIT)
def _as_blocks(x, out, type_size):
    """x: (n,) and out: (m,) as (blocks, 32) values and (blocks, type_size) bytes.

    Loops then index them with plain loop counters: numba checks every signed index for
    wrap-around, and only for a bare counter (or one plus a constant) can LLVM drop that
    check and use contiguous vector loads; a view per block would instead cost reference
    counting on every block."""
    nb = min(x.shape[0] // QK, out.shape[0] // type_size)
    return x[:nb * QK].reshape(nb, QK), out[:nb * type_size].reshape(nb, type_size)


# ---------------------------------------------------------------------------------------------
# _ref paths

@njit(**_JIT)
def _ref_q8_0(x, out):
    xb, ob = _as_blocks(x, out, Q8_0_BYTES)
    for b in range(xb.shape[0]):
        # max |x| via the bits: for non-negative floats they order as the values do, and an
        # integer max reduction vectorizes (the result does not depend on the order)
        amax_bits = np.int64(0)
        for j in range(QK):
            amax_bits = max(amax_bits, np.int64(f32_bits(xb[b, j])) & 0x7FFFFFFF)
        d = f32_from_bits(amax_bits) / f32(127.0)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(ob, b, 0, fp32_to_fp16_bits(d))
        for j in range(QK):
            ob[b, 2 + j] = np.int64(round_half_away(xb[b, j] * inv_d)) & 0xFF


@njit(inline="always", **_JIT)  # LLVM will not inline it once vectorized; numba will
def _signed_peak(xb, b):
    """The first value of largest magnitude in block xb[b] (+0.0 if all are zero), as C's
    `if (amax < fabsf(v))` scan finds it. The scan is done as an integer max over keys
    (|x| bits, then earlier index), which vectorizes where the float compare chain cannot."""
    best = np.int64(0)
    for j in range(QK):
        best = max(best, ((np.int64(f32_bits(xb[b, j])) & 0x7FFFFFFF) << 5) | (QK - 1 - j))
    if best >> 5 == 0:
        return f32(0.0)
    return xb[b, QK - 1 - (best & (QK - 1))]


@njit(**_JIT)
def _ordered(v):
    """An integer that orders finite float32s as < does, with -0.0 and +0.0 equal."""
    bits = np.int64(f32_bits(v))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


@njit(inline="always", **_JIT)
def _block_range(xb, b):
    """(min, max) of block xb[b] as C's `if (v < min) min = v; if (v > max) max = v;` finds
    them. That scan keeps the first of equal values, which matters only for the sign of a
    zero min; integer keys (value, then index) find the same elements and vectorize."""
    lo_key = np.int64(1) << 62
    hi_key = -(np.int64(1) << 62)
    for j in range(QK):
        key = _ordered(xb[b, j]) << 5
        lo_key = min(lo_key, key | j)
        hi_key = max(hi_key, key | (QK - 1 - j))
    return xb[b, lo_key & (QK - 1)], xb[b, QK - 1 - (hi_key & (QK - 1))]


@njit(**_JIT)
def _ref_q4_1(x, out):
    xb, ob = _as_blocks(x, out, Q4_1_BYTES)
    for b in range(xb.shape[0]):
        lo, hi = _block_range(xb, b)
        d = (hi - lo) / f32(15.0)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(ob, b, 0, fp32_to_fp16_bits(d))
        _put_f16(ob, b, 2, fp32_to_fp16_bits(lo))
        for j in range(QK // 2):
            q0 = min(15, _as_int8((xb[b, j] - lo) * inv_d + f32(0.5))) & 0xFF
            q1 = min(15, _as_int8((xb[b, j + 16] - lo) * inv_d + f32(0.5))) & 0xFF
            ob[b, 4 + j] = q0 | (q1 << 4)


@njit(**_JIT)
def _pack_5bit(ob, b, qs_at, j, q0, q1, qh):
    """Low nibbles of levels j and j+16 into qs[j] (block ob[b], qs starting at byte qs_at:
    6 for Q5_0, 8 for Q5_1); returns qh with their 5th bits added."""
    ob[b, qs_at + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(**_JIT)
def _put_u32(ob, b, offset, v):
    for k in range(4):
        ob[b, offset + k] = (v >> (8 * k)) & 0xFF


@njit(**_JIT)
def _ref_q5_1(x, out):
    """Q4_1's scheme with 31 steps. Levels are C's (uint8_t)((x - min)/d + 0.5) with no clamp
    (only their low 5 bits are stored); that cast keeps the same low byte as _as_int8's."""
    xb, ob = _as_blocks(x, out, Q5_1_BYTES)
    for b in range(xb.shape[0]):
        lo, hi = _block_range(xb, b)
        d = (hi - lo) / f32(31.0)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(ob, b, 0, fp32_to_fp16_bits(d))
        _put_f16(ob, b, 2, fp32_to_fp16_bits(lo))
        qh = 0
        for j in range(QK // 2):
            q0 = _as_int8((xb[b, j] - lo) * inv_d + f32(0.5)) & 0xFF
            q1 = _as_int8((xb[b, j + 16] - lo) * inv_d + f32(0.5)) & 0xFF
            qh = _pack_5bit(ob, b, 8, j, q0, q1, qh)
        _put_u32(ob, b, 4, qh)


@njit(**_JIT)
def _ref_symmetric(x, nmax, out):
    """Q4_0 (nmax 8) or Q5_0 (nmax 16): d = -peak / nmax, levels trunc(x/d + nmax + 0.5)."""
    xb, ob = _as_blocks(x, out, Q4_0_BYTES if nmax == 8 else Q5_0_BYTES)
    offset = f32(nmax) + f32(0.5)
    for b in range(xb.shape[0]):
        d = _signed_peak(xb, b) / f32(-nmax)
        inv_d = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        _put_f16(ob, b, 0, fp32_to_fp16_bits(d))
        qh = 0
        for j in range(QK // 2):
            q0 = min(2 * nmax - 1, _as_int8(xb[b, j] * inv_d + offset)) & 0xFF
            q1 = min(2 * nmax - 1, _as_int8(xb[b, j + 16] * inv_d + offset)) & 0xFF
            if nmax == 8:
                ob[b, 2 + j] = q0 | (q1 << 4)
            else:
                qh = _pack_5bit(ob, b, 6, j, q0, q1, qh)
        if nmax == 16:
            _put_u32(ob, b, 2, qh)


# ---------------------------------------------------------------------------------------------
# _impl paths (importance given)

@njit(**_JIT)
def _weighted_groups(x, cols, importance, nb):
    """Blocks as lanes: xt, wt: (32, nb) with wt = imatrix * sqrt(sigma2 + x^2), sigma2 the
    mean square of the block's row, summed in element order as llama.cpp does."""
    n_rows = x.shape[0] // cols
    rows = x[:n_rows * cols].reshape(n_rows, cols)
    sigma2 = np.zeros(n_rows, np.float32)
    for r in range(n_rows):
        sum_x2 = f32(0.0)
        for k in range(cols):
            sum_x2 += rows[r, k] * rows[r, k]
        sigma2[r] = sum_x2 / f32(cols)
    xb = x[:nb * QK].reshape(nb, QK)
    blocks_per_row = cols // QK
    imp = importance[:cols].reshape(blocks_per_row, QK)
    xt = np.empty((QK, nb), np.float32)
    wt = np.empty((QK, nb), np.float32)
    for b in range(nb):
        s2 = sigma2[b // blocks_per_row]
        c = b % blocks_per_row
        for j in range(QK):
            v = xb[b, j]
            xt[j, b] = v
            wt[j, b] = imp[c, j] * np.sqrt(s2 + v * v)
    return xt, wt


@njit(**_JIT)
def _impl_symmetric(x, cols, importance, nmax, out):
    """Q4_0 (nmax 8) or Q5_0 (nmax 16) with an imatrix: make_qx_quants per block."""
    xb, ob = _as_blocks(x, out, Q4_0_BYTES if nmax == 8 else Q5_0_BYTES)
    nb = xb.shape[0]
    xt, wt = _weighted_groups(x, cols, importance, nb)
    L = np.empty((QK, nb), np.uint8)
    scales = np.empty(nb, np.float32)
    make_qx_quants(xt, wt, nmax, L, scales)
    for b in range(nb):
        _put_f16(ob, b, 0, fp32_to_fp16_bits(scales[b]))
        qh = 0
        for j in range(QK // 2):
            if nmax == 8:
                ob[b, 2 + j] = L[j, b] | (L[j + 16, b] << 4)
            else:
                qh = _pack_5bit(ob, b, 6, j, np.int64(L[j, b]), np.int64(L[j + 16, b]), qh)
        if nmax == 16:
            _put_u32(ob, b, 2, qh)


@njit(**_JIT)
def _impl_asymmetric(x, cols, importance, nmax, out):
    """Q4_1 (nmax 15) or Q5_1 (nmax 31) with an imatrix: make_qkx_quants (llama.cpp's
    make_qkx3_quants) per block; the block stores -the_min, the offset itself."""
    xb, ob = _as_blocks(x, out, Q4_1_BYTES if nmax == 15 else Q5_1_BYTES)
    nb = xb.shape[0]
    xt, wt = _weighted_groups(x, cols, importance, nb)
    L = np.empty((QK, nb), np.uint8)
    scales = np.empty(nb, np.float32)
    mins = np.empty(nb, np.float32)
    make_qkx_quants(xt, wt, nmax, f32(-0.9), f32(0.05), 36, L, scales, mins)
    for b in range(nb):
        _put_f16(ob, b, 0, fp32_to_fp16_bits(scales[b]))
        _put_f16(ob, b, 2, fp32_to_fp16_bits(-mins[b]))
        qh = 0
        for j in range(QK // 2):
            if nmax == 15:
                ob[b, 4 + j] = L[j, b] | (L[j + 16, b] << 4)
            else:
                qh = _pack_5bit(ob, b, 8, j, np.int64(L[j, b]), np.int64(L[j + 16, b]), qh)
        if nmax == 31:
            _put_u32(ob, b, 4, qh)


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
    weighted = importance.shape[0] >= cols > 0 and cols % QK == 0  # keeps indexes below cols
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        if weighted:
            _impl_symmetric(x[r0:r1].reshape(-1), cols, importance, nmax, out[r0:r1].reshape(-1))
        else:
            _ref_symmetric(x[r0:r1].reshape(-1), nmax, out[r0:r1].reshape(-1))


@njit(cache=True, fastmath=False, error_model="numpy", parallel=True)
def _quantize_rows_asymmetric(x, importance, nmax, out):
    """Q4_1 (nmax 15) or Q5_1 (nmax 31)."""
    rows, cols = min(x.shape[0], out.shape[0]), x.shape[1]
    weighted = importance.shape[0] >= cols > 0 and cols % QK == 0  # keeps indexes below cols
    per_tile, n_tiles = _tiles(rows, cols)
    for t in prange(n_tiles):
        r0, r1 = t * per_tile, min(rows, (t + 1) * per_tile)
        if weighted:
            _impl_asymmetric(x[r0:r1].reshape(-1), cols, importance, nmax, out[r0:r1].reshape(-1))
        elif nmax == 15:
            _ref_q4_1(x[r0:r1].reshape(-1), out[r0:r1].reshape(-1))
        else:
            _ref_q5_1(x[r0:r1].reshape(-1), out[r0:r1].reshape(-1))


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
    _quantize_rows_asymmetric(x, _NO_IMPORTANCE if importance is None else importance, 15, out)
    return out


def quantize_q5_0(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 22) Q5_0, as llama.cpp's quantize_q5_0."""
    out = _alloc(x, Q5_0_BYTES)
    _quantize_rows_symmetric(x, _NO_IMPORTANCE if importance is None else importance, 16, out)
    return out


def quantize_q5_1(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """f32 (rows, cols) -> uint8 (rows, cols/32 * 24) Q5_1, as llama.cpp's quantize_q5_1."""
    out = _alloc(x, Q5_1_BYTES)
    _quantize_rows_asymmetric(x, _NO_IMPORTANCE if importance is None else importance, 31, out)
    return out
