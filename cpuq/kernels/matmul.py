"""Products with quantized weight matrices, read block by block from the file's bytes.

A weight matrix is w: uint8 (m, row_bytes), m rows of k values in GGML type `ggml_type`
(the id in the GGUF tensor info). Each kernel decodes a tile of weight rows into a small
float32 buffer (the quants.decode row decoders, which stay inside their arrays whatever
the bytes hold) and multiplies it with every activation row, so a prompt of n tokens
reads the weights once, not n times.

The float32 dot products allow reassociation (fastmath 'reassoc' + 'contract', so they
vectorize); that changes the order of a sum, as any BLAS does, and nothing else: no
assumption about NaN or inf is made.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quants import decode as D
from ..quants.types import BF16, F16, F32, GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .blocks import BLOCK_IR, decode_row_fast
from .halves import f16_to_f32

# Elements and bytes per block (types.GGML_TYPES), indexed by type id, for the types with
# IR kernels (blocks.BLOCK_IR), 1 elsewhere; Numba freezes these arrays into the kernels as
# constants. 32 entries hold every id up to BF16's (30); a larger id in BLOCK_IR fails here.
BLOCK_ELEMS = np.ones(32, np.int64)
BLOCK_BYTES = np.ones(32, np.int64)
for _t in BLOCK_IR:
    BLOCK_ELEMS[_t], BLOCK_BYTES[_t] = GGML_TYPES[_t].block_size, GGML_TYPES[_t].type_size
BLOCK_IR_TYPES = tuple(BLOCK_IR)

_DOT = {"reassoc", "contract"}
ROWS_PER_TILE = 16


@njit(cache=True)
def _decode_row_f32(src, dst):
    n = min(src.shape[0] // 4, dst.shape[0])
    vals = src[:4 * n].view(np.float32)
    for i in range(n):
        dst[i] = vals[i]


@njit(cache=True)
def _decode_row_f16(src, dst):
    """As quants.decode.decode_row_f16, through the fpext intrinsic (vcvtph2ps with F16C;
    the codec's integer conversion per element made F16 decode 10x slower than Q8_0's)."""
    n = min(src.shape[0] // 2, dst.shape[0])
    halves = src[:2 * n].view(np.uint16)
    for i in range(n):
        dst[i] = f16_to_f32(halves[i])


@njit(cache=True)
def decode_row(ggml_type, src, dst):
    """src: (row_bytes,) uint8, one row of `ggml_type` -> dst: (k,) f32. An unknown type
    leaves dst untouched (callers check the type where the file is loaded)."""
    if ggml_type == Q4_K:
        D.decode_row_q4_k(src, dst)
    elif ggml_type == Q6_K:
        D.decode_row_q6_k(src, dst)
    elif ggml_type == Q8_0:
        D.decode_row_q8_0(src, dst)
    elif ggml_type == Q5_0:
        D.decode_row_q5_0(src, dst)
    elif ggml_type == Q5_K:
        D.decode_row_q5_k(src, dst)
    elif ggml_type == Q4_0:
        D.decode_row_q4_0(src, dst)
    elif ggml_type == Q4_1:
        D.decode_row_q4_1(src, dst)
    elif ggml_type == Q5_1:
        D.decode_row_q5_1(src, dst)
    elif ggml_type == F16:
        _decode_row_f16(src, dst)
    elif ggml_type == BF16:
        D.decode_row_bf16(src, dst)
    elif ggml_type == F32:
        _decode_row_f32(src, dst)


@njit(cache=True, fastmath=_DOT, inline="always")
def _dot(a, b, k):
    acc = np.float32(0.0)
    for j in range(k):
        acc += a[j] * b[j]
    return acc


@njit(cache=True, parallel=True, fastmath=_DOT)
def matmul(x, w, ggml_type, out):
    """x: (n, k) f32, w: (m, row_bytes) uint8 rows of `ggml_type` -> out: (n, m) f32 = x @ W.T.
    Bounds come from the smaller of each pair of shapes."""
    n = min(x.shape[0], out.shape[0])
    k = x.shape[1]
    m = min(w.shape[0], out.shape[1])
    n_tiles = (m + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    for t in prange(n_tiles):
        r0 = t * ROWS_PER_TILE
        r1 = min(m, r0 + ROWS_PER_TILE)
        buf = np.zeros((ROWS_PER_TILE, k), np.float32)
        for r in range(r0, r1):
            decode_row(ggml_type, w[r], buf[r - r0])
        for i in range(n):
            xi = x[i]
            for r in range(r0, r1):
                out[i, r] = _dot(xi, buf[r - r0], k)


# decode_row's branches as a table, keyed by types.GGML_TYPES ids: get_rows calls them, and
# they are the types the CPU runtime reads (SUPPORTED).
_ROW_DECODERS = {Q4_K: D.decode_row_q4_k, Q6_K: D.decode_row_q6_k, Q8_0: D.decode_row_q8_0, Q5_0: D.decode_row_q5_0,
                 Q5_K: D.decode_row_q5_k, Q4_0: D.decode_row_q4_0, Q4_1: D.decode_row_q4_1, Q5_1: D.decode_row_q5_1,
                 F16: _decode_row_f16, BF16: D.decode_row_bf16, F32: _decode_row_f32}
SUPPORTED = tuple(sorted(_ROW_DECODERS))


def get_rows(w, ggml_type, ids, out):
    """w: (m, row_bytes) uint8, ids: (n,) int64 row numbers -> out: (n, k) f32, out[i] = W[ids[i]].
    An id outside [0, m), or a type decode_row does not know, gives a row of zeros (callers
    validate token ids first).
    A Python loop over the one type's row decoder, not a Numba kernel switching on the type:
    that compiled all 11 decoders on a cold start for one embedding lookup per call, and
    the loop's cost is a negligible share of a prompt chunk."""
    decode = _ROW_DECODERS.get(int(ggml_type))
    m = w.shape[0]
    for i in range(min(ids.shape[0], out.shape[0])):
        r = int(ids[i])
        if decode is not None and 0 <= r < m:
            decode(w[r], out[i])
        else:
            out[i] = 0.0


@njit(cache=True, inline="always")
def n_blocks(ggml_type, k, row_bytes):
    """Whole blocks of a block type that both k values and a row_bytes row hold."""
    t = min(max(ggml_type, 0), BLOCK_ELEMS.shape[0] - 1)
    return min(k // BLOCK_ELEMS[t], row_bytes // BLOCK_BYTES[t])


@njit(cache=True, nogil=True)
def dequantize_rows(w, ggml_type, r0, out):
    """w: (m, row_bytes) uint8 rows of `ggml_type` -> out: (n, k) f32 = rows r0 .. r0+n-1
    (as many as both hold), decoded as quants.decode does, on the calling thread without
    the GIL (callers run several at once). The block types go through
    blocks.decode_row_fast (vector IR, switching on the type per row), the float types
    through decode_row."""
    n = max(0, min(out.shape[0], w.shape[0] - r0))
    nb = n_blocks(ggml_type, out.shape[1], w.shape[1])
    if ggml_type in BLOCK_IR_TYPES:
        for i in range(n):
            decode_row_fast(ggml_type, w, r0 + i, out[i], nb)
    else:
        for i in range(n):
            decode_row(ggml_type, w[r0 + i], out[i])
