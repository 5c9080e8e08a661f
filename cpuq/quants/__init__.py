"""Block codecs: the table of the tensor types cpuq reads and writes (a codec registered
against each row of types.GGML_TYPES it handles), and the public `quantize` / `dequantize`
that validate their input and dispatch through it.

Encoders live in legacy.py (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and kquants.py (Q4_K, Q5_K,
Q6_K), sharing the scale searches in search.py; decoders for every type live in
decode.py. All are Numba kernels over plain arrays. This package imports only
numpy, numba, gguf-py and cpuq.errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as _G
from gguf.quants import quantize as _gguf_quantize

from ..errors import InputError, UnsupportedError
from . import decode, kquants, legacy
from .types import BF16, F16, F32, GGML_TYPES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, GGMLType

Encoder = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]
Decoder = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class QType:
    """A GGML tensor type (its row of types.GGML_TYPES) with the codec cpuq has for it."""
    ggml: GGMLType
    encode: Encoder
    decode: Decoder
    uses_importance: bool  # whether llama.cpp's quantizer reads an imatrix for it

    @property
    def name(self) -> str:
        return self.ggml.name

    @property
    def ggml_type(self) -> int:
        """ggml's enum value, as stored in GGUF tensor infos."""
        return self.ggml.id

    @property
    def block_size(self) -> int:
        return self.ggml.block_size

    @property
    def type_size(self) -> int:
        return self.ggml.type_size

    def row_bytes(self, cols: int) -> int:
        return self.ggml.row_bytes(cols)

    @property
    def bits_per_weight(self) -> float:
        return self.ggml.bits_per_weight


def _f32_encode(x, importance=None):
    return x.astype(np.float32).view(np.uint8)


def _f16_encode(x, importance=None):
    return x.astype(np.float16).view(np.uint8)  # round-to-nearest-even, as ggml_fp32_to_fp16_row


def _f32_decode(data, cols):
    return data.view(np.float32).reshape(-1, cols).copy()


def _bf16_encode(x, importance=None):
    # gguf-py's BF16 rounding (nearest-even, NaN kept quiet) is the same as ggml's _ref.
    return _gguf_quantize(x, _G.BF16).view(np.uint8)


# The codec of every type cpuq reads and writes: (type id, encoder, decoder, whether
# llama.cpp's quantizer reads an imatrix for it). Names and sizes come from types.GGML_TYPES.
_CODECS = (
    (F32, _f32_encode, _f32_decode, False),
    (F16, _f16_encode, decode.dequantize_f16, False),
    (BF16, _bf16_encode, decode.dequantize_bf16, False),
    (Q8_0, legacy.quantize_q8_0, decode.dequantize_q8_0, False),
    (Q4_0, legacy.quantize_q4_0, decode.dequantize_q4_0, True),
    (Q4_1, legacy.quantize_q4_1, decode.dequantize_q4_1, True),
    (Q5_0, legacy.quantize_q5_0, decode.dequantize_q5_0, True),
    (Q5_1, legacy.quantize_q5_1, decode.dequantize_q5_1, True),
    (Q4_K, kquants.quantize_q4_k, decode.dequantize_q4_k, True),
    (Q5_K, kquants.quantize_q5_k, decode.dequantize_q5_k, True),
    (Q6_K, kquants.quantize_q6_k, decode.dequantize_q6_k, True),
)
TYPES: dict[str, QType] = {GGML_TYPES[i].name: QType(GGML_TYPES[i], enc, dec, imp) for i, enc, dec, imp in _CODECS}
_BY_ID = {t.ggml_type: t for t in TYPES.values()}


def get_qtype(qtype: str | QType) -> QType:
    """The table row for a type name ("q4_k", "Q8_0", ... case-insensitive)."""
    if isinstance(qtype, QType):
        return qtype
    t = TYPES.get(str(qtype).upper())
    if t is None:
        supported = ', '.join(TYPES).lower()
        if any(g.name == str(qtype).upper() for g in GGML_TYPES.values()):  # listed ahead of its codec
            raise UnsupportedError(f"tensor type '{qtype}' is not supported (supported: {supported})")
        raise UnsupportedError(f"unknown tensor type '{qtype}' (supported: {supported})")
    return t


def qtype_from_id(type_id: int) -> QType:
    """The table row for a ggml type id as found in a GGUF tensor info."""
    t = _BY_ID.get(int(type_id))
    if t is None:
        try:  # a type without a codec yet, or one cpuq's table does not list
            name = GGML_TYPES[int(type_id)].name if int(type_id) in GGML_TYPES else _G(type_id).name
        except ValueError:
            raise UnsupportedError(f"unknown tensor type id {type_id}") from None
        raise UnsupportedError(f"tensor type {name} (id {type_id}) is not supported "
                               f"(supported: {', '.join(TYPES)})")
    return t


def _as_rows(x: np.ndarray, t: QType, what: str) -> np.ndarray:
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise InputError(f"{what}: expected a 2-D (rows, cols) array, got shape {x.shape}")
    if x.shape[1] % t.block_size:
        raise InputError(f"{what}: row length {x.shape[1]} is not a multiple of {t.name}'s block size {t.block_size}")
    return x


def quantize(x: np.ndarray, qtype: str | QType, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) in GGML's block layout.

    Bytes equal llama.cpp's `ggml_quantize_chunk` for the same input and imatrix.
    `importance` is a per-column weight (llama.cpp's imatrix entry for this tensor);
    types whose llama.cpp quantizer ignores it (Q8_0, float types) ignore it too.
    Non-finite values are refused with InputError for block types (llama.cpp's
    output for them is undefined); F32/F16/BF16 store them as they are.
    """
    t = get_qtype(qtype)
    x = _as_rows(np.asarray(x), t, f"quantize to {t.name}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if t.block_size > 1:
        bad = ~np.isfinite(x)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InputError(f"quantize to {t.name}: value {x[r, c]} at row {r}, column {c} is not finite")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != x.shape[1]:
            raise InputError(f"quantize to {t.name}: importance has {importance.shape[0]} entries, "
                             f"rows have {x.shape[1]} columns")
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise InputError(f"quantize to {t.name}: importance values must be finite and >= 0")
        if not t.uses_importance:
            importance = None
    out = t.encode(x, importance)
    return out.reshape(x.shape[0], t.row_bytes(x.shape[1]))


def dequantize(data: np.ndarray, qtype: str | QType, shape: tuple[int, ...]) -> np.ndarray:
    """GGML blocks -> float32 array of `shape` (last axis = row length)."""
    t = get_qtype(qtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"dequantize {t.name}: bad shape {shape}")
    cols = shape[-1]
    if cols % t.block_size:
        raise InputError(f"dequantize {t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    data = np.asarray(data)
    need = rows * t.row_bytes(cols)
    if data.nbytes != need:
        raise InputError(f"dequantize {t.name}: {data.nbytes} bytes given, shape {shape} needs {need}")
    blocks = np.ascontiguousarray(data).reshape(-1).view(np.uint8).reshape(rows, t.row_bytes(cols))
    return t.decode(blocks, cols).reshape(shape)
