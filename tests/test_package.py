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



def test_gpu_fallback_warning_is_exported_and_is_the_one_the_runtime_warns_with():
    # Documented (docs/gpu.md) as a UserWarning that callers can filter, e.g.
    # warnings.simplefilter("error", cpuq.GpuFallbackWarning), without importing the runtime;
    # tests/runtime/test_gpu.py checks that the runtime warns with it when there is no GPU.
    import cpuq
    import cpuq.errors
    import cpuq.runtime.model

    assert "GpuFallbackWarning" in cpuq.__all__
    assert cpuq.GpuFallbackWarning is cpuq.errors.GpuFallbackWarning is cpuq.runtime.model.GpuFallbackWarning
    assert issubclass(cpuq.GpuFallbackWarning, UserWarning)
    assert not issubclass(cpuq.GpuFallbackWarning, cpuq.CpuqError)  # a warning: the model still runs
