"""The exceptions cpuq raises on bad input: one class tree, one-line messages.

Every message names the file, tensor or key at fault and what is wrong with it.
The CLI turns any CpuqError into that line on stderr and exit code 2. The one warning,
GpuFallbackWarning, lives here too, so that callers can filter it without importing the runtime.
Imports nothing from cpuq.
"""
import reprlib


def abbreviated(value: object) -> str:
    """A value read from a file, for a message: its repr, abbreviated (a file can hold a
    100 kB string or nesting thousands deep)."""
    return reprlib.repr(value)


class CpuqError(Exception):
    """Base of every error cpuq raises on purpose; the message is one line."""


class FormatError(CpuqError):
    """A file is not what it claims to be (bad magic, lying header, data past the end)."""


class UnsupportedError(CpuqError):
    """A well-formed input that cpuq does not handle (a quant type, an architecture)."""


class InputError(CpuqError):
    """A bad argument from the caller (shape, value, path)."""


class GpuFallbackWarning(UserWarning):
    """gpu_layers was asked for but the model runs on the CPU (no CuPy, no CUDA device, a
    tensor type the GPU kernels lack, or too little GPU memory); the message says which.
    A warning, not an error: the model still runs."""
