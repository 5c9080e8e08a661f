"""Numba's compiled-kernel cache lives in the user's cache directory, keyed by the kernel
sources, and works when the installed package cannot be written to; a cached kernel loads
without Numba's compiler set-up (cpuq.jit.lean_cache_loads)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numba

import cpuq
from cpuq import jit

# A kernel that is small to compile: dequantize a Q8_0 row (cache=True, cpuq.quants.decode).
_RUN = ("import numpy as np, cpuq; w = np.ones((1, 64), np.float32); "
        "print(cpuq.dequantize(cpuq.quantize(w, 'q8_0'), 'q8_0', (1, 64)).sum())")


def _run(site: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(cache), NUMBA_DEBUG_CACHE="1")
    return subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=600,
                          cwd=site)


def test_cache_in_user_dir_with_read_only_package(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(Path(cpuq.__file__).parent, site / "cpuq",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for p in [site, *site.rglob("*")]:  # read-only for everyone (root still could write; checked below)
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        first = _run(site, tmp_path / "cache")
        assert first.returncode == 0, first.stderr[-2000:]
        assert first.stdout.split()[-1] == "63.996094"  # 64 x 1.0 through Q8_0 (d = 1/127 in f16)
        assert "index saved to" in first.stdout  # compiled, then cached ...
        saved = list((tmp_path / "cache" / "cpuq" / "numba").rglob("*.nbi"))
        assert saved, "no cache index under the user cache directory"
        assert not [p for p in site.rglob("*") if p.suffix in (".nbi", ".nbc")], "cache written into the package"
        second = _run(site, tmp_path / "cache")
        assert second.returncode == 0, second.stderr[-2000:]
        assert "data loaded from" in second.stdout and "index saved to" not in second.stdout  # ... and reused
    finally:
        for p in [site, *site.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_cache_dir_follows_the_kernel_sources(tmp_path):
    """Editing a kernel file (here: appending a comment) moves the cache to a new directory."""
    site = tmp_path / "site"
    shutil.copytree(Path(cpuq.__file__).parent, site / "cpuq", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import os, cpuq; print(os.environ['NUMBA_CACHE_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def cache_dir():
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=site)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    before = cache_dir()
    assert before.startswith(str(tmp_path / "cache" / "cpuq" / "numba"))
    assert cache_dir() == before
    with open(site / "cpuq" / "kernels" / "attention.py", "a") as f:
        f.write("\n# edited\n")
    assert cache_dir() != before


# After a cached kernel of cpuq's has run: did Numba set up its compiler (the registries
# import numba.np.linalg)? Then another package's cached function (loaded as Numba does),
# then a new function that needs the registries (compiled).
_LEAN = _RUN + """
import sys
print("registries loaded:", "numba.np.linalg" in sys.modules)
import other
print(other.twice(np.ones(3)).sum())
print("after another package's function:", "numba.np.linalg" in sys.modules)
from numba import njit
@njit
def f(a):
    return np.cumsum(a)[-1] + len({1: 2.0})
print(f(np.ones(4)))
"""
_OTHER = """from numba import njit


@njit(cache=True)
def twice(a):
    return a * 2
"""


def test_cached_kernel_loads_without_compiler_setup(tmp_path):
    (tmp_path / "other.py").write_text(_OTHER)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), NUMBA_DEBUG_CACHE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p))

    def run():
        r = subprocess.run([sys.executable, "-c", _LEAN], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    first = run()  # compiles (an empty cache): the compiler sets itself up
    assert "index saved to" in first and "registries loaded: True" in first
    second = run()
    before, after = second.split("registries loaded")
    assert "data loaded from" in before and "index saved to" not in before
    # Numba's own load_overload refreshes them (~0.2 s); releases outside _LEAN_NUMBA still do
    lean = jit._LEAN_NUMBA[0] <= tuple(int(p) for p in numba.__version__.split(".")[:2]) <= jit._LEAN_NUMBA[1]
    assert after.startswith(f": {not lean}")
    assert "63.996094" in before and "6.0" in after.splitlines()  # the other package's function, loaded
    assert "after another package's function: True" in after  # ... as Numba does
    assert after.splitlines()[-1] == "5.0"  # ones(4) summed, plus a dict of one item
