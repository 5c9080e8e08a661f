"""cpuq: a CPU-first GGUF quantizer and LLM runtime (NumPy + Numba).

Public API (see README): quantize, dequantize, open_gguf, summarize, convert.
"""
from .errors import CpuqError, FormatError, InputError, UnsupportedError
from .quants import TYPES, QType, dequantize, get_qtype, quantize
from .gguf_io import GGUFFile, GGUFStreamWriter, open_gguf
from .info import summarize
from .convert.pipeline import convert  # noqa: E402  (the function shadows the subpackage name)

__version__ = "0.1.0"

__all__ = [
    "CpuqError", "FormatError", "InputError", "UnsupportedError",
    "TYPES", "QType", "quantize", "dequantize", "get_qtype",
    "GGUFFile", "GGUFStreamWriter", "open_gguf", "summarize", "convert",
]
