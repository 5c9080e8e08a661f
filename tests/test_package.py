"""`import cpuq` stays light (it is part of every model load's time to first token), and
the public names keep pointing at the API."""
from __future__ import annotations

import subprocess
import sys


def test_import_loads_neither_the_converter_nor_the_runtime():
    code = ("import sys, cpuq; print(sorted(m for m in sys.modules "
            "if m.startswith(('cpuq.convert.', 'cpuq.runtime', 'cpuq.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_convert_stays_the_function_after_its_package_modules_are_imported():
    code = ("import cpuq, cpuq.convert.pipeline, cpuq.convert.scaling; "
            "print(callable(cpuq.convert), cpuq.convert.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "cpuq"]
