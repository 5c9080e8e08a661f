"""Matrix-vector products for one token (decode), reading the quantized blocks in place.

out[r] = sum_k W[r, k] * x[k] for w: uint8 (m, row_bytes) rows of one GGML type and x: (k,)
f32. Each row is one call of blocks.dot_row (the block unpacking and the multiply-adds in
LLVM vector IR, 32 float32 accumulator lanes in registers), rows spread over the threads.
Values are decoded exactly as quants.decode does; the sum's order differs, as any BLAS's.

Types without a block kernel (F32, F16, BF16) go through matmul.matmul.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import dot_row
from .matmul import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, matmul


@njit(cache=True, parallel=True)
def _matvec_blocks(x, w, ggml_type, out):
    """x: (k,) f32, w: (m, row_bytes) uint8 of a type in blocks.BLOCK_IR -> out: (m,) f32.
    nb: the whole blocks that both x and a row hold; m: the rows both w and out hold."""
    m = min(w.shape[0], out.shape[0])
    k, row_bytes = x.shape[0], w.shape[1]
    # One literal type per loop: dot_row inlines that type's IR.
    if ggml_type == Q8_0:
        nb = min(k // 32, row_bytes // 34)
        for r in prange(m):
            out[r] = dot_row(8, x, w, r, nb)
    elif ggml_type == Q5_0:
        nb = min(k // 32, row_bytes // 22)
        for r in prange(m):
            out[r] = dot_row(6, x, w, r, nb)
    elif ggml_type == Q4_K:
        nb = min(k // 256, row_bytes // 144)
        for r in prange(m):
            out[r] = dot_row(12, x, w, r, nb)
    elif ggml_type == Q6_K:
        nb = min(k // 256, row_bytes // 210)
        for r in prange(m):
            out[r] = dot_row(14, x, w, r, nb)
    elif ggml_type == Q4_0:
        nb = min(k // 32, row_bytes // 18)
        for r in prange(m):
            out[r] = dot_row(2, x, w, r, nb)
    elif ggml_type == Q4_1:
        nb = min(k // 32, row_bytes // 20)
        for r in prange(m):
            out[r] = dot_row(3, x, w, r, nb)
    elif ggml_type == Q5_1:
        nb = min(k // 32, row_bytes // 24)
        for r in prange(m):
            out[r] = dot_row(7, x, w, r, nb)
    elif ggml_type == Q5_K:
        nb = min(k // 256, row_bytes // 176)
        for r in prange(m):
            out[r] = dot_row(13, x, w, r, nb)


_BLOCK_TYPES = (Q8_0, Q5_0, Q4_K, Q6_K, Q4_0, Q4_1, Q5_1, Q5_K)


def matvec(x: np.ndarray, w: np.ndarray, ggml_type: int, out: np.ndarray) -> None:
    """x: (k,) f32, w: (m, row_bytes) uint8 of `ggml_type` -> out: (m,) f32."""
    if ggml_type in _BLOCK_TYPES:
        _matvec_blocks(x, w, ggml_type, out)
    else:
        matmul(x.reshape(1, -1), w, ggml_type, out.reshape(1, -1))
