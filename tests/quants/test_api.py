"""cpuq.quantize / cpuq.dequantize at the edge: argument checks and their messages."""
import numpy as np
import pytest

import cpuq
from cpuq import InputError, UnsupportedError


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_non_finite_refused_with_position(bad, qtype):
    x = np.ones((3, 256), np.float32)
    x[2, 17] = bad
    with pytest.raises(InputError, match=f"row 2, column 17 is not finite"):
        cpuq.quantize(x, qtype)


def test_float_types_store_non_finite_as_is():
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    for qtype in ("f32", "f16", "bf16"):
        back = cpuq.dequantize(cpuq.quantize(x, qtype), qtype, x.shape)
        assert np.isnan(back[0, 0]) and back[0, 1] == np.inf and back[0, 2] == -np.inf and back[0, 3] == 1.5


@pytest.mark.parametrize("qtype, cols", [("q4_k", 100), ("q4_k", 288), ("q8_0", 33), ("q6_k", 32)])
def test_row_length_not_multiple_of_block(qtype, cols):
    with pytest.raises(InputError, match=f"row length {cols} is not a multiple"):
        cpuq.quantize(np.zeros((2, cols), np.float32), qtype)


def test_importance_checks():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(InputError, match="importance has 255 entries"):
        cpuq.quantize(x, "q4_k", importance=np.ones(255, np.float32))
    with pytest.raises(InputError, match="finite and >= 0"):
        cpuq.quantize(x, "q4_k", importance=-np.ones(256, np.float32))


def test_unknown_type_and_case_insensitive_names():
    # Q3_K is in the types table ahead of its codec: named as a type cpuq does not support yet
    with pytest.raises(UnsupportedError, match="^tensor type 'q3_k' is not supported \\(supported: f32, "):
        cpuq.quantize(np.zeros((1, 256), np.float32), "q3_k")
    with pytest.raises(UnsupportedError, match="^unknown tensor type 'q9_z' \\(supported: f32, "):
        cpuq.quantize(np.zeros((1, 256), np.float32), "q9_z")
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    assert np.array_equal(cpuq.quantize(x, "Q4_K"), cpuq.quantize(x, "q4_k"))


def test_dequantize_byte_count_and_shape():
    q = cpuq.quantize(np.zeros((4, 256), np.float32), "q4_k")
    with pytest.raises(InputError, match="needs 1152"):
        cpuq.dequantize(q[:3], "q4_k", (8, 256))
    with pytest.raises(InputError, match="not a multiple of the block size"):
        cpuq.dequantize(q, "q4_k", (4, 255))
    assert cpuq.dequantize(q, "q4_k", (2, 2, 256)).shape == (2, 2, 256)


def test_one_dimensional_input_is_one_row():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    assert np.array_equal(cpuq.quantize(x, "q8_0"), cpuq.quantize(x[None, :], "q8_0"))
