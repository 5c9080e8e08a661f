"""ctypes access to llama.cpp's reference quantizer (`ggml_quantize_chunk`).

The library comes from the peer venv that tools/peer_env.sh builds (llama-cpp-python
compiled from its sdist); set CPUQ_PEER_VENV to use another one. Used by the `peer`
tests, the golden-file generator and the benchmarks; cpuq itself never imports it.
"""
from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np

PEER_VENV = Path(os.environ.get("CPUQ_PEER_VENV", Path.home() / ".cache" / "cpuq-peer" / "venv"))


def library_path() -> Path | None:
    hits = glob.glob(str(PEER_VENV / "lib" / "python3*" / "site-packages" / "llama_cpp" / "lib" / "libggml-base.so"))
    return Path(hits[0]) if hits else None


_lib = None


def load() -> ctypes.CDLL:
    """The loaded libggml-base, or FileNotFoundError if the peer venv is not built."""
    global _lib
    if _lib is None:
        path = library_path()
        if path is None:
            raise FileNotFoundError(f"llama.cpp peer library not found under {PEER_VENV}; run tools/peer_env.sh")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _lib = lib
    return _lib


def available() -> bool:
    return library_path() is not None


def quantize(x: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for float32 rows `x` (rows, cols) -> uint8 (rows, row_bytes).

    ctypes releases the GIL during the call, so several Python threads quantizing
    disjoint row ranges run in parallel (that is how llama-quantize splits work too).
    """
    lib = load()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    row_bytes = lib.ggml_row_size(int(ggml_type), cols)
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    imp = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        assert importance.shape == (cols,)
        imp = importance.ctypes.data
    n = lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, cols, imp)
    assert n == out.nbytes, (n, out.nbytes)
    return out


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def dequantize(blocks: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """llama.cpp's reference decoder (type_traits.to_float) for uint8 (rows, row_bytes)."""
    lib = load()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(int(ggml_type)).contents
    blocks = np.ascontiguousarray(blocks)
    if not traits.to_float:  # F32 has no converter: its bytes are the values
        return blocks.view(np.float32).reshape(blocks.shape[0], cols).copy()
    to_float = _TO_FLOAT(traits.to_float)
    out = np.empty((blocks.shape[0], cols), dtype=np.float32)
    to_float(blocks.ctypes.data, out.ctypes.data, out.size)
    return out
