"""cpuq.quants.types, the one table of GGML tensor types, against gguf-py (a table we did not
write: gguf.constants.GGMLQuantizationType and GGML_QUANT_SIZES), and every table keyed by
it (codecs, CPU kernels, CUDA) against it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import cpuq
from cpuq import UnsupportedError
from cpuq.kernels import blocks, cuda, matmul, matvec, qgemm
from cpuq.quants import TYPES, decode, kquants, legacy, qtype_from_id, types
from cpuq.quants.types import GGML_TYPES, GGMLType

CODEC_IDS = {t.ggml_type for t in TYPES.values()}


def gguf_mismatches(table: dict[int, GGMLType]) -> list[str]:
    """What in `table` disagrees with gguf-py: ids, names, block sizes, bytes per block."""
    bad = []
    for type_id, t in table.items():
        if type_id != t.id:
            bad.append(f"{t.name}: keyed by {type_id}, id {t.id}")
        if t.name not in GGMLQuantizationType.__members__:
            bad.append(f"{t.name}: not a gguf-py type")
            continue
        theirs = GGMLQuantizationType[t.name]
        if int(theirs) != t.id:
            bad.append(f"{t.name}: id {t.id}, gguf-py {int(theirs)}")
        if GGML_QUANT_SIZES[theirs] != (t.block_size, t.type_size):
            bad.append(f"{t.name}: (block size, bytes) {(t.block_size, t.type_size)}, gguf-py {GGML_QUANT_SIZES[theirs]}")
    return bad


def test_table_agrees_with_gguf_py():
    assert gguf_mismatches(GGML_TYPES) == []
    # the types cpuq reads today, and the ones listed ahead of their codecs
    assert {t.name for t in GGML_TYPES.values()} == {
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
        "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"}


@pytest.mark.parametrize("field, value", [("id", 11), ("block_size", 32), ("type_size", 145), ("name", "Q4_KM")])
def test_a_wrong_entry_is_caught(field, value):
    q4_k = GGML_TYPES[types.Q4_K]
    wrong = dict(GGML_TYPES)
    wrong[types.Q4_K] = GGMLType(**{**vars(q4_k), field: value})
    found = gguf_mismatches(wrong)
    assert found and all(m.startswith(("Q4_K:", "Q4_KM:")) for m in found)


def test_constants_name_the_rows():
    assert len({t.name for t in GGML_TYPES.values()}) == len(GGML_TYPES)
    for type_id, t in GGML_TYPES.items():
        assert getattr(types, t.name) == type_id == t.id
        assert type(getattr(types, t.name)) is int  # plain ints: Numba folds them as constants
        assert types.by_id(type_id) is t and types.by_name(t.name.lower()) is t
    with pytest.raises(KeyError):
        types.by_id(16)
    with pytest.raises(KeyError):
        types.by_name("IQ2_XXS")


def test_table_imports_no_numba():
    # Loaded from its file: `import cpuq` itself imports Numba.
    path = Path(types.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cpuq_types', {str(path)!r})\n"
            "m = sys.modules['cpuq_types'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.GGML_TYPES[m.Q4_K].type_size == 144\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('numba', 'numpy', 'llvmlite', 'cpuq')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_codecs_are_registered_against_the_table():
    for name, t in TYPES.items():
        assert t.ggml is GGML_TYPES[t.ggml_type] and t.name == name
        assert (t.block_size, t.type_size) == (t.ggml.block_size, t.ggml.type_size)
        assert qtype_from_id(t.ggml_type) is t and cpuq.get_qtype(name.lower()) is t


@pytest.mark.parametrize("type_id", sorted(set(GGML_TYPES) - {t.ggml_type for t in TYPES.values()}))
def test_types_without_a_codec_are_refused(type_id):
    name = GGML_TYPES[type_id].name
    with pytest.raises(UnsupportedError, match=f"^tensor type {name} \\(id {type_id}\\) is not supported"):
        qtype_from_id(type_id)
    with pytest.raises(UnsupportedError, match=f"^tensor type '{name.lower()}' is not supported"):
        cpuq.get_qtype(name.lower())


def test_codec_sizes_come_from_the_table():
    legacy_types = [types.Q8_0, types.Q4_0, types.Q4_1, types.Q5_0, types.Q5_1]
    k_types = [types.Q4_K, types.Q5_K, types.Q6_K]
    for module in (decode, legacy):
        assert all(GGML_TYPES[t].block_size == module.QK for t in legacy_types)
        for t in legacy_types:
            assert getattr(module, f"{GGML_TYPES[t].name}_BYTES") == GGML_TYPES[t].type_size
    for module in (decode, kquants):
        assert all(GGML_TYPES[t].block_size == module.QK_K for t in k_types)
        for t in k_types:
            assert getattr(module, f"{GGML_TYPES[t].name}_BYTES") == GGML_TYPES[t].type_size


def test_cpu_kernel_tables_agree_with_the_table():
    assert set(matmul.SUPPORTED) == set(matmul._ROW_DECODERS) <= CODEC_IDS
    ir_types = set(blocks.BLOCK_IR)
    assert ir_types <= set(matmul.SUPPORTED)
    assert set(matvec.BLOCK_TYPES) == ir_types == set(matmul.BLOCK_IR_TYPES)
    assert set(blocks.BLOCK_INTS) | set(blocks.BLOCK_K_INTS) <= ir_types
    assert not set(blocks.BLOCK_INTS) & set(blocks.BLOCK_K_INTS)
    assert set(blocks.X_SETS) == set(blocks.X_ORDERS) == set(blocks.X_ORDER_ROW) == set(blocks.BLOCK_K_INTS)
    for t in blocks.BLOCK_K_INTS:
        assert sorted(blocks.X_ORDERS[t]) == list(range(GGML_TYPES[t].block_size))  # a permutation of one block
    assert set(qgemm.TYPES) == set(qgemm.UNPACK_IR) <= ir_types
    for t in qgemm.TYPES:
        assert GGML_TYPES[t].block_size % qgemm.group_size.py_func(t) == 0
    for t in range(matmul.BLOCK_ELEMS.shape[0]):
        want = (GGML_TYPES[t].block_size, GGML_TYPES[t].type_size) if t in ir_types else (1, 1)
        assert (matmul.BLOCK_ELEMS[t], matmul.BLOCK_BYTES[t]) == want
    assert matvec.NONE_TYPE in matvec.BLOCK_TYPES
    assert matvec.NONE_W.shape == (0, GGML_TYPES[matvec.NONE_TYPE].type_size)


def test_decode_row_handles_exactly_the_supported_types():
    """matmul.decode_row (a Numba branch per type) decodes every SUPPORTED type as the codec
    does, bit for bit, and leaves dst alone for a type of the table without a codec."""
    x = np.random.default_rng(3).standard_normal((1, 256)).astype(np.float32)
    for t in matmul.SUPPORTED:
        qt = qtype_from_id(t)
        row = cpuq.quantize(x, qt)[0]
        dst = np.full(256, np.nan, np.float32)
        matmul.decode_row(t, row, dst)
        assert np.array_equal(dst, cpuq.dequantize(row, qt, (256,))), qt.name
    for t in sorted(set(GGML_TYPES) - set(matmul.SUPPORTED)):
        dst = np.full(256, 7.0, np.float32)
        matmul.decode_row(t, np.zeros(GGML_TYPES[t].type_size, np.uint8), dst)
        assert (dst == 7.0).all(), GGML_TYPES[t].name


def test_cuda_tables_agree_with_the_table_and_the_source():
    assert set(cuda.TYPE_STRUCTS) == set(cuda.TYPE_QK) and set(cuda.TYPE_STRUCTS) <= CODEC_IDS
    for t, struct in cuda.TYPE_STRUCTS.items():
        g = GGML_TYPES[t]
        m = re.search(rf"struct {struct} {{ enum {{ QK = (\d+), BYTES = (\d+) }};", cuda.SOURCE)
        assert m, struct
        qk, nbytes = int(m.group(1)), int(m.group(2))
        assert qk == cuda.TYPE_QK[t] and qk % g.block_size == 0 and qk % 32 == 0
        assert nbytes == qk // g.block_size * g.type_size, struct
