"""Dequantizers: GGML block bytes -> float32, as Numba kernels, for Q8_0 Q4_0 Q4_1 Q5_0
Q5_1 Q4_K Q5_K Q6_K F16 BF16.

Three layers per type, from the inside out:
  decode_row_<type>(src, dst)        serial: one row, src uint8 (row_bytes,) -> dst f32 (cols,);
                                     callable from other Numba kernels (the runtime's prefill tiles)
  dequantize_<type>_into(data, out)  parallel over rows: data uint8 (rows, row_bytes) -> out f32
                                     (rows, cols), preallocated (a row range is a slice of both)
  dequantize_<type>(data, cols)      allocates the output and checks the shapes agree

Results equal gguf-py's numpy dequantizers bit for bit, including the order of the float32
operations, so that NaN/inf scales give the same NaN/inf. Every loop bound comes from the
array shapes (the smaller of what src holds and what dst holds), so no bytes, however
malformed, make a kernel touch memory outside its arrays.

Imports only numpy, numba, cpuq.quants.search (the float bit helpers) and cpuq.quants.types
(the block sizes); nothing else from cpuq.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .search import f32_from_bits as _f32_from_bits
from .search import fp16_bits_to_fp32 as half_bits_to_float
from .types import (BF16, F16, GGML_TYPES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q5_K_BYTES,
                    Q6_K_BYTES, Q8_0_BYTES, QK, QK_K)



# ---------------------------------------------------------------------------------------------
# fp16 -> fp32 (search.fp16_bits_to_fp32, exact on the bits: Numba has no float16 on the CPU).

@njit(cache=True, inline="always")
def _half_at(src, offset):
    """The little-endian fp16 at src[offset:offset + 2], as float32."""
    return half_bits_to_float(np.uint32(src[offset]) | (np.uint32(src[offset + 1]) << np.uint32(8)))


@njit(cache=True, inline="always")
def _u32_at(src, offset):
    """The little-endian uint32 at src[offset:offset + 4]."""
    return (np.uint32(src[offset]) | (np.uint32(src[offset + 1]) << np.uint32(8))
            | (np.uint32(src[offset + 2]) << np.uint32(16)) | (np.uint32(src[offset + 3]) << np.uint32(24)))


# ---------------------------------------------------------------------------------------------
# Row decoders. In every one, n_blocks is the number of whole blocks that both src and dst
# have room for, so the offsets below stay inside both arrays.

@njit(cache=True)
def decode_row_q8_0(src, dst):
    """src: (k/32 * 34,) uint8 Q8_0 blocks [d f16 | 32 x int8] -> dst: (k,) f32, x = q * d."""
    n_blocks = min(src.shape[0] // Q8_0_BYTES, dst.shape[0] // QK)
    for b in range(n_blocks):
        o = b * Q8_0_BYTES
        y = b * QK
        d = _half_at(src, o)
        for j in range(QK):
            q = np.int32(src[o + 2 + j])
            q = q - 256 if q >= 128 else q  # the byte is an int8
            dst[y + j] = np.float32(q) * d


@njit(cache=True)
def decode_row_q4_0(src, dst):
    """src: (k/32 * 18,) uint8 Q4_0 blocks [d f16 | 16 bytes: element j in the low nibble of
    byte j, element j+16 in the high nibble] -> dst: (k,) f32, x = d * (q - 8)."""
    n_blocks = min(src.shape[0] // Q4_0_BYTES, dst.shape[0] // QK)
    for b in range(n_blocks):
        o = b * Q4_0_BYTES
        y = b * QK
        d = _half_at(src, o)
        for j in range(QK // 2):
            byte = np.int32(src[o + 2 + j])
            dst[y + j] = d * np.float32((byte & 0xF) - 8)
            dst[y + j + QK // 2] = d * np.float32((byte >> 4) - 8)


@njit(cache=True)
def decode_row_q4_1(src, dst):
    """src: (k/32 * 20,) uint8 Q4_1 blocks [d f16 | m f16 | 16 bytes of nibbles as Q4_0]
    -> dst: (k,) f32, x = d * q + m."""
    n_blocks = min(src.shape[0] // Q4_1_BYTES, dst.shape[0] // QK)
    for b in range(n_blocks):
        o = b * Q4_1_BYTES
        y = b * QK
        d = _half_at(src, o)
        m = _half_at(src, o + 2)
        for j in range(QK // 2):
            byte = np.int32(src[o + 4 + j])
            # two roundings (no fused multiply-add), as in gguf-py and llama.cpp
            dst[y + j] = d * np.float32(byte & 0xF) + m
            dst[y + j + QK // 2] = d * np.float32(byte >> 4) + m


@njit(cache=True)
def decode_row_q5_0(src, dst):
    """src: (k/32 * 22,) uint8 Q5_0 blocks [d f16 | qh: 32 fifth bits, little-endian u32, bit i
    for element i | 16 bytes of low nibbles as Q4_0] -> dst: (k,) f32, x = d * (q - 16)."""
    n_blocks = min(src.shape[0] // Q5_0_BYTES, dst.shape[0] // QK)
    for b in range(n_blocks):
        o = b * Q5_0_BYTES
        y = b * QK
        d = _half_at(src, o)
        qh = _u32_at(src, o + 2)
        for j in range(QK // 2):
            byte = np.int32(src[o + 6 + j])
            high_lo = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
            high_hi = np.int32((qh >> np.uint32(j + QK // 2)) & np.uint32(1)) << 4
            dst[y + j] = d * np.float32(((byte & 0xF) | high_lo) - 16)
            dst[y + j + QK // 2] = d * np.float32(((byte >> 4) | high_hi) - 16)


@njit(cache=True)
def decode_row_q5_1(src, dst):
    """src: (k/32 * 24,) uint8 Q5_1 blocks [d f16 | m f16 | qh u32 as Q5_0 | 16 bytes of low
    nibbles as Q4_0] -> dst: (k,) f32, x = d * q + m."""
    n_blocks = min(src.shape[0] // Q5_1_BYTES, dst.shape[0] // QK)
    for b in range(n_blocks):
        o = b * Q5_1_BYTES
        y = b * QK
        d = _half_at(src, o)
        m = _half_at(src, o + 2)
        qh = _u32_at(src, o + 4)
        for j in range(QK // 2):
            byte = np.int32(src[o + 8 + j])
            high_lo = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
            high_hi = np.int32((qh >> np.uint32(j + QK // 2)) & np.uint32(1)) << 4
            # two roundings (no fused multiply-add), as in gguf-py and llama.cpp
            dst[y + j] = d * np.float32((byte & 0xF) | high_lo) + m
            dst[y + j + QK // 2] = d * np.float32((byte >> 4) | high_hi) + m


@njit(cache=True, inline="always")
def _k_scale_min(src, s, j):
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at src[s:s+12]:
    sub-blocks 0-3 sit in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    4-7 put their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the spare
    top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    if j < 4:
        scale = np.int32(src[s + j]) & 63
        minimum = np.int32(src[s + j + 4]) & 63
    else:
        packed = np.int32(src[s + j + 4])
        scale = (packed & 0xF) | ((np.int32(src[s + j - 4]) >> 6) << 4)
        minimum = (packed >> 4) | ((np.int32(src[s + j]) >> 6) << 4)
    return scale, minimum


@njit(cache=True)
def decode_row_q4_k(src, dst):
    """src: (k/256 * 144,) uint8 Q4_K super-blocks [d f16 | dmin f16 | 12 bytes of 6-bit
    scales and mins for 8 sub-blocks of 32 | 128 bytes: byte l of chunk c (32 bytes) holds
    sub-block 2c in its low nibble and 2c+1 in its high nibble]
    -> dst: (k,) f32, x = (d * scale) * q - dmin * min."""
    n_blocks = min(src.shape[0] // Q4_K_BYTES, dst.shape[0] // QK_K)
    for b in range(n_blocks):
        o = b * Q4_K_BYTES
        y = b * QK_K
        d = _half_at(src, o)
        dmin = _half_at(src, o + 2)
        qs = o + 16
        for sub in range(8):
            scale, minimum = _k_scale_min(src, o + 4, sub)
            d_sub = d * np.float32(scale)
            m_sub = dmin * np.float32(minimum)
            q_at = qs + (sub >> 1) * 32
            shift = (sub & 1) * 4
            y_at = y + sub * 32
            for l in range(32):
                q = (np.int32(src[q_at + l]) >> shift) & 0xF
                dst[y_at + l] = d_sub * np.float32(q) - m_sub


@njit(cache=True)
def decode_row_q5_k(src, dst):
    """src: (k/256 * 176,) uint8 Q5_K super-blocks [d f16 | dmin f16 | 12 bytes of scales and
    mins as Q4_K | qh: 32 bytes, bit s of byte l is the fifth bit of element l of sub-block s
    | 128 bytes of low nibbles as Q4_K] -> dst: (k,) f32, x = (d * scale) * q - dmin * min."""
    n_blocks = min(src.shape[0] // Q5_K_BYTES, dst.shape[0] // QK_K)
    for b in range(n_blocks):
        o = b * Q5_K_BYTES
        y = b * QK_K
        d = _half_at(src, o)
        dmin = _half_at(src, o + 2)
        qh = o + 16
        qs = o + 48
        for sub in range(8):
            scale, minimum = _k_scale_min(src, o + 4, sub)
            d_sub = d * np.float32(scale)
            m_sub = dmin * np.float32(minimum)
            q_at = qs + (sub >> 1) * 32
            shift = (sub & 1) * 4
            y_at = y + sub * 32
            for l in range(32):
                q = ((np.int32(src[q_at + l]) >> shift) & 0xF) | (((np.int32(src[qh + l]) >> sub) & 1) << 4)
                dst[y_at + l] = d_sub * np.float32(q) - m_sub


@njit(cache=True)
def decode_row_q6_k(src, dst):
    """src: (k/256 * 210,) uint8 Q6_K super-blocks [ql: 128 bytes of low nibbles | qh: 64 bytes
    of 2-bit high parts | 16 int8 scales, one per 16 elements | d f16]. Each half (128
    elements) uses 64 ql bytes and 32 qh bytes; its quarter t (32 elements) takes element l
    from ql byte 32*(t%2) + l, nibble t//2, and qh byte l, bits 2t..2t+1.
    -> dst: (k,) f32, x = (d * scale) * (q - 32)."""
    n_blocks = min(src.shape[0] // Q6_K_BYTES, dst.shape[0] // QK_K)
    for b in range(n_blocks):
        o = b * Q6_K_BYTES
        y = b * QK_K
        d = _half_at(src, o + 208)
        for half in range(2):
            ql = o + half * 64
            qh = o + 128 + half * 32
            for quarter in range(4):
                lo_at = ql + (quarter & 1) * 32
                lo_shift = (quarter >> 1) * 4
                hi_shift = quarter * 2
                y_at = y + half * 128 + quarter * 32
                for group in range(2):
                    scale = np.int32(src[o + 192 + half * 8 + quarter * 2 + group])
                    scale = scale - 256 if scale >= 128 else scale  # the byte is an int8
                    d_group = d * np.float32(scale)
                    for i in range(16):
                        l = group * 16 + i
                        q = (((np.int32(src[lo_at + l]) >> lo_shift) & 0xF)
                             | (((np.int32(src[qh + l]) >> hi_shift) & 3) << 4))
                        dst[y_at + l] = d_group * np.float32(q - 32)


@njit(cache=True)
def decode_row_f16(src, dst):
    """src: (2k,) uint8, little-endian IEEE halves -> dst: (k,) f32."""
    n = min(src.shape[0] // 2, dst.shape[0])
    for i in range(n):
        dst[i] = _half_at(src, 2 * i)


@njit(cache=True)
def decode_row_bf16(src, dst):
    """src: (2k,) uint8, little-endian bfloat16 -> dst: (k,) f32 (the top half of its bits)."""
    n = min(src.shape[0] // 2, dst.shape[0])
    for i in range(n):
        bits = (np.uint32(src[2 * i]) << np.uint32(16)) | (np.uint32(src[2 * i + 1]) << np.uint32(24))
        dst[i] = _f32_from_bits(bits)


# ---------------------------------------------------------------------------------------------
# Parallel drivers, one per type (Numba cannot cache a driver that takes the row decoder as
# an argument or closes over it). The row count is the smaller of the two arrays'.

@njit(cache=True, parallel=True)
def dequantize_q8_0_into(data, out):
    """data: (rows, cols/32 * 34) uint8 Q8_0 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q8_0(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q4_0_into(data, out):
    """data: (rows, cols/32 * 18) uint8 Q4_0 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q4_0(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q4_1_into(data, out):
    """data: (rows, cols/32 * 20) uint8 Q4_1 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q4_1(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q5_0_into(data, out):
    """data: (rows, cols/32 * 22) uint8 Q5_0 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q5_0(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q5_1_into(data, out):
    """data: (rows, cols/32 * 24) uint8 Q5_1 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q5_1(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q4_k_into(data, out):
    """data: (rows, cols/256 * 144) uint8 Q4_K -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q4_k(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q5_k_into(data, out):
    """data: (rows, cols/256 * 176) uint8 Q5_K -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q5_k(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_q6_k_into(data, out):
    """data: (rows, cols/256 * 210) uint8 Q6_K -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_q6_k(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_f16_into(data, out):
    """data: (rows, cols * 2) uint8 F16 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_f16(data[r], out[r])


@njit(cache=True, parallel=True)
def dequantize_bf16_into(data, out):
    """data: (rows, cols * 2) uint8 BF16 -> out: (rows, cols) f32, written in place."""
    for r in prange(min(data.shape[0], out.shape[0])):
        decode_row_bf16(data[r], out[r])


# ---------------------------------------------------------------------------------------------
# Allocating entry points.

def _dequantize(data: np.ndarray, cols: int, block_size: int, type_size: int, into) -> np.ndarray:
    # The caller has validated the tensor; this guards the one thing the kernels cannot see,
    # that `out` would be left partly unwritten if the shapes disagreed.
    if data.dtype != np.uint8 or data.ndim != 2 or cols % block_size or data.shape[1] != cols // block_size * type_size:
        raise ValueError(f"expected uint8 (rows, {cols // block_size * type_size}) for {cols} columns, "
                         f"got {data.dtype} {data.shape}")
    out = np.empty((data.shape[0], cols), dtype=np.float32)
    into(np.ascontiguousarray(data), out)
    return out


def dequantize_q8_0(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/32 * 34) uint8 Q8_0 -> (rows, cols) f32."""
    return _dequantize(data, cols, QK, Q8_0_BYTES, dequantize_q8_0_into)


def dequantize_q4_0(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/32 * 18) uint8 Q4_0 -> (rows, cols) f32."""
    return _dequantize(data, cols, QK, Q4_0_BYTES, dequantize_q4_0_into)


def dequantize_q4_1(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/32 * 20) uint8 Q4_1 -> (rows, cols) f32."""
    return _dequantize(data, cols, QK, Q4_1_BYTES, dequantize_q4_1_into)


def dequantize_q5_0(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/32 * 22) uint8 Q5_0 -> (rows, cols) f32."""
    return _dequantize(data, cols, QK, Q5_0_BYTES, dequantize_q5_0_into)


def dequantize_q5_1(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/32 * 24) uint8 Q5_1 -> (rows, cols) f32."""
    return _dequantize(data, cols, QK, Q5_1_BYTES, dequantize_q5_1_into)


def dequantize_q4_k(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/256 * 144) uint8 Q4_K -> (rows, cols) f32."""
    return _dequantize(data, cols, QK_K, Q4_K_BYTES, dequantize_q4_k_into)


def dequantize_q5_k(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/256 * 176) uint8 Q5_K -> (rows, cols) f32."""
    return _dequantize(data, cols, QK_K, Q5_K_BYTES, dequantize_q5_k_into)


def dequantize_q6_k(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols/256 * 210) uint8 Q6_K -> (rows, cols) f32."""
    return _dequantize(data, cols, QK_K, Q6_K_BYTES, dequantize_q6_k_into)


def dequantize_f16(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols * 2) uint8 little-endian IEEE halves -> (rows, cols) f32."""
    return _dequantize(data, cols, GGML_TYPES[F16].block_size, GGML_TYPES[F16].type_size, dequantize_f16_into)


def dequantize_bf16(data: np.ndarray, cols: int) -> np.ndarray:
    """data: (rows, cols * 2) uint8 little-endian bfloat16 -> (rows, cols) f32."""
    return _dequantize(data, cols, GGML_TYPES[BF16].block_size, GGML_TYPES[BF16].type_size, dequantize_bf16_into)
