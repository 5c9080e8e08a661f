"""Bit-exactness against llama.cpp without llama.cpp: tests/golden/quants.npz holds
`ggml_quantize_chunk`'s bytes (written by tools/make_golden.py from llama.cpp 0.3.36's
ggml) for every block type x {normal, heavy-tailed, zero/constant blocks, trained weights}
x {no imatrix, imatrix}. Tolerance: none — bytes must be equal."""
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf import GGMLQuantizationType as G

import cpuq

GOLDEN = np.load(Path(__file__).parent / "golden" / "quants.npz")
CASES = sorted(k for k in GOLDEN.files if k.startswith("q/"))


def first_diff_block(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    flat = np.flatnonzero(a.reshape(-1) != b.reshape(-1))
    if flat.size == 0:
        return "equal"
    row_bytes = a.shape[1]
    r, byte = divmod(int(flat[0]), row_bytes)
    return f"{flat.size} bytes differ; first in row {r}, block {byte // type_size}, byte {byte % type_size}"


@pytest.mark.parametrize("case", CASES)
def test_quantize_matches_llama_cpp(case):
    _, kind, name, mode = case.split("/")
    x = GOLDEN[f"x/{kind}"]
    imp = GOLDEN["importance"] if mode == "imatrix" else None
    ours = cpuq.quantize(x, name, importance=imp)
    ref = GOLDEN[case]
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref), first_diff_block(ours, ref, cpuq.get_qtype(name).type_size)


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("/plain")])
def test_dequantize_matches_gguf_py(case):
    _, kind, name, _ = case.split("/")
    blocks = GOLDEN[case]
    cols = GOLDEN[f"x/{kind}"].shape[1]
    ours = cpuq.dequantize(blocks, name, (blocks.shape[0], cols))
    ref = gguf_dequantize(blocks, G[name])
    assert np.array_equal(ours, ref)
