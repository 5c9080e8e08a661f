"""cpuq: a CPU-first GGUF quantizer and LLM runtime (NumPy + Numba).

Public API (see README): quantize, dequantize, open_gguf, summarize, convert, load.
"""
from . import jit as _jit

_jit.use_user_cache()  # before numba is imported
_jit.lean_cache_loads()
from .errors import CpuqError, FormatError, GpuFallbackWarning, InputError, UnsupportedError
from .quants import TYPES, QType, dequantize, get_qtype, quantize
from .gguf_io import GGUFFile, GGUFStreamWriter, open_gguf
from .info import summarize
# The package now (it is only a docstring), so that importing its modules later does not
# set cpuq.convert to the package over the function below.
from . import convert as _convert_package  # noqa: F401

__version__ = "0.1.0"


def _convert(*args, **kwargs):
    # imported when used: the converter's modules took ~30 ms of every `import cpuq`, a
    # model load's time to first token included
    from .convert.pipeline import convert as pipeline_convert
    return pipeline_convert(*args, **kwargs)


def convert(src_dir, dst_path, qtype: str = "q4_k_m", calibration: str | None = None, imatrix=None,
            force: bool = False, progress=None, awq: bool | None = None, *, calibration_ctx: int = 512,
            calibration_chunks: int | None = None, calibration_name: str = "calibration text",
            n_threads: int | None = None, calibration_progress=None):
    """Convert an HF checkpoint folder to a GGUF file (see cpuq.convert.pipeline.convert);
    the one place that chooses the recipe: plain, with an importance matrix, or calibrated.

    calibration: text (a str) to collect an importance matrix over first, through a
    temporary Q8_0 conversion (cpuq.convert.calibration.convert_calibrated), in windows of
    calibration_ctx tokens (at most calibration_chunks), named calibration_name in the
    matrix, run with n_threads; calibration_progress(done, total) after each window.
    imatrix: an importance matrix (cpuq.convert.imatrix.Imatrix or the path of llama.cpp's
    imatrix GGUF file). At most one of the two. awq: scale each block's input channels by
    the matrix as well (cpuq.convert.scaling); default: on with calibration text, off with
    an imatrix (llama-quantize's bytes). progress(done, total, name): bytes of the
    checkpoint read, for every conversion made."""
    if calibration is not None:
        if imatrix is not None:
            raise InputError("give calibration text or an importance matrix, not both")
        if not isinstance(calibration, str):
            raise InputError(f"calibration must be the text itself (a str), not {type(calibration).__name__}")
        from .convert.calibration import convert_calibrated  # runs the runtime: imported only when used
        return convert_calibrated(src_dir, dst_path, qtype, calibration, dataset=calibration_name,
                                  n_ctx=calibration_ctx, n_chunks=calibration_chunks, force=force,
                                  n_threads=n_threads, progress=progress,
                                  calibration_progress=calibration_progress, awq=True if awq is None else awq)
    return _convert(src_dir, dst_path, qtype=qtype, force=force, progress=progress, imatrix=imatrix,
                    awq=bool(awq))


def load(path, n_ctx: int = 4096, n_threads: int | None = None, gpu_layers: int = 0, kv_type: str = "f16",
         cpu_moe: bool = False):
    """Load a GGUF model to run: see cpuq.runtime.model.load."""
    from .runtime.model import load as _load  # the runtime imports only when used
    return _load(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, kv_type=kv_type, cpu_moe=cpu_moe)


def __getattr__(name: str):
    if name == "Model":  # the runtime imports only when used
        from .runtime.model import Model
        return Model
    raise AttributeError(f"module 'cpuq' has no attribute {name!r}")

__all__ = [
    "CpuqError", "FormatError", "InputError", "UnsupportedError", "GpuFallbackWarning",
    "TYPES", "QType", "quantize", "dequantize", "get_qtype",
    "GGUFFile", "GGUFStreamWriter", "open_gguf", "summarize", "convert", "load", "Model",
]
