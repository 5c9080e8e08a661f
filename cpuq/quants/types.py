"""The GGML tensor types cpuq knows, each named once: its id in ggml's `enum ggml_type` (as
stored in a GGUF tensor info), the values per block and the bytes per block (ggml-common.h's
block structs). This is the role gguf-py's `GGML_QUANT_SIZES` plays; every other table in
cpuq is keyed by these ids and reads its sizes here: the codecs (cpuq.quants.TYPES), the CPU
kernels' dispatch (kernels.matmul, matvec, blocks, qgemm) and the CUDA structs
(kernels.cuda). tests/quants/test_types.py checks that they all agree with this table and
this table with gguf-py.

A row says that the type exists, not that cpuq reads or writes it: Q2_K, Q3_K, IQ4_NL and
IQ4_XS are listed ahead of their codecs, and cpuq refuses them until one is registered.

Adding a type:
  1. here: its id constant and its row (name, id, block size, bytes per block);
  2. its codec: the encoder (quants/legacy.py or kquants.py), the row decoder and the
     dequantizer (quants/decode.py), registered in cpuq.quants._CODECS. quantize,
     dequantize and reading or writing GGUF files then handle it;
  3. to run models with it: its row decoder in kernels.matmul (decode_row's branch and
     _ROW_DECODERS). Products then decode it row by row.
Faster paths are optional tables keyed by the id, each falling back to decode_row where
the type is missing: blocks.BLOCK_IR (vector decode and float dot products; then it joins
matvec.BLOCK_TYPES), blocks.BLOCK_INTS / BLOCK_K_INTS (int16 dot products), qgemm.UNPACK_IR
(int8 prompt products), cuda.TYPE_STRUCTS (the GPU).

Imports the standard library only, so that tools and checks can read the table without
Numba.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    """A GGML tensor type: `block_size` values are stored in `type_size` bytes."""
    name: str
    id: int  # ggml's enum value, as stored in GGUF tensor infos
    block_size: int
    type_size: int

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


# ggml.h's enum ggml_type. Plain ints, not an IntEnum: Numba kernels compare type ids with
# these as compile-time integer constants.
F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
IQ4_NL = 20
IQ4_XS = 23
BF16 = 30

# Bytes per block as ggml-common.h's structs add up (fp16 scales are 2 bytes).
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType("F32", F32, 1, 4),
    GGMLType("F16", F16, 1, 2),
    GGMLType("BF16", BF16, 1, 2),
    GGMLType("Q4_0", Q4_0, 32, 2 + 16),                        # d | 32 nibbles
    GGMLType("Q4_1", Q4_1, 32, 2 + 2 + 16),                    # d | m | 32 nibbles
    GGMLType("Q5_0", Q5_0, 32, 2 + 4 + 16),                    # d | 32 fifth bits | nibbles
    GGMLType("Q5_1", Q5_1, 32, 2 + 2 + 4 + 16),                # d | m | fifth bits | nibbles
    GGMLType("Q8_0", Q8_0, 32, 2 + 32),                        # d | 32 int8
    GGMLType("Q2_K", Q2_K, 256, 16 + 64 + 2 + 2),              # scales | 2-bit quants | d | dmin
    GGMLType("Q3_K", Q3_K, 256, 32 + 64 + 12 + 2),             # high bits | 2-bit quants | scales | d
    GGMLType("Q4_K", Q4_K, 256, 2 + 2 + 12 + 128),             # d | dmin | scales | nibbles
    GGMLType("Q5_K", Q5_K, 256, 2 + 2 + 12 + 32 + 128),        # d | dmin | scales | fifth bits | nibbles
    GGMLType("Q6_K", Q6_K, 256, 128 + 64 + 16 + 2),            # low nibbles | high 2 bits | int8 scales | d
    GGMLType("IQ4_NL", IQ4_NL, 32, 2 + 16),                    # d | 32 nibbles (non-linear levels)
    GGMLType("IQ4_XS", IQ4_XS, 256, 2 + 2 + 4 + 128),          # d | high scale bits | low scale bits | nibbles
)}
_BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# The codecs' block geometry as plain ints (a Numba kernel reads a global as a constant): the
# legacy types share one block size, the K-types another.
QK = GGML_TYPES[Q8_0].block_size
QK_K = GGML_TYPES[Q4_K].block_size
Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES = (
    GGML_TYPES[t].type_size for t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K))


def by_id(type_id: int) -> GGMLType:
    """The row for a ggml type id; KeyError for an id not in the table."""
    return GGML_TYPES[int(type_id)]


def by_name(name: str) -> GGMLType:
    """The row for a type name, case-insensitive ("q4_k", "Q4_K"); KeyError for others."""
    return _BY_NAME[str(name).upper()]
