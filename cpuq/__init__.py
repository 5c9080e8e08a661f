"""cpuq: a CPU-first GGUF quantizer and LLM runtime (NumPy + Numba).

Public API (see README): quantize, dequantize, open_gguf, summarize, convert, load.
"""
from .errors import CpuqError, FormatError, InputError, UnsupportedError
from .quants import TYPES, QType, dequantize, get_qtype, quantize
from .gguf_io import GGUFFile, GGUFStreamWriter, open_gguf
from .info import summarize
from .convert.pipeline import convert  # noqa: E402  (the function shadows the subpackage name)

__version__ = "0.1.0"


def load(path, n_ctx: int = 4096, n_threads: int | None = None, gpu_layers: int = 0):
    """Load a GGUF model to run: see cpuq.runtime.model.load."""
    from .runtime.model import load as _load  # the runtime imports only when used
    return _load(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers)


def __getattr__(name: str):
    if name == "Model":  # the runtime imports only when used
        from .runtime.model import Model
        return Model
    raise AttributeError(f"module 'cpuq' has no attribute {name!r}")

__all__ = [
    "CpuqError", "FormatError", "InputError", "UnsupportedError",
    "TYPES", "QType", "quantize", "dequantize", "get_qtype",
    "GGUFFile", "GGUFStreamWriter", "open_gguf", "summarize", "convert", "load", "Model",
]
