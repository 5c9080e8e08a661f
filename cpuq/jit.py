"""How cpuq uses Numba's on-disk cache of compiled kernels: where it lives
(use_user_cache) and how a cached kernel is loaded (lean_cache_loads).

Imports numba only inside lean_cache_loads: use_user_cache must run before numba reads
its configuration. Imports nothing from cpuq.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Numba releases whose cache loading lean_cache_loads was checked against (numba/core/
# caching.py: Cache.load_overload = target_context.refresh(), then _load_overload).
_LEAN_NUMBA = ((0, 60), (0, 68))


def use_user_cache() -> None:
    """Numba's compiled kernels go to the user's cache directory, not next to the sources
    (site-packages may be read-only): <cache>/cpuq/numba/<hash of the kernel sources>,
    unless NUMBA_CACHE_DIR is set. The hash is over every file that holds Numba code:
    kernels inline functions (and IR) from other files, which Numba's own per-file check
    does not see, so any edit starts a fresh cache."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    import hashlib
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    # kernels/cuda.py holds CUDA C for CuPy, no Numba code: its edits need no recompilation
    # models/: their stages compile into the decode step's kernels
    for src in sorted(p for d in ("quants", "kernels", "models") for p in (here / d).glob("*.py") if p.name != "cuda.py"):
        digest.update(src.name.encode() + src.read_bytes())
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = str(Path(base) / "cpuq" / "numba" / digest.hexdigest()[:16])
    os.environ["NUMBA_CACHE_DIR"] = path
    if "numba" in sys.modules:  # imported before cpuq: its config has read the environment already
        sys.modules["numba"].config.CACHE_DIR = path


def lean_cache_loads() -> bool:
    """Load cached kernels without first setting up Numba's compiler; True if in effect.

    Numba refreshes its typing and lowering registries before it loads a kernel from the
    cache: it imports some 40 modules of its own (linalg, random, typed containers, ...)
    and installs their implementations, ~0.2 s of every process's first kernel call (a
    model's time to first token included), though a cached kernel is machine code that
    needs none of them. Here the load only initializes what that code links against:
    Numba's runtime (NRT: its symbols and atomic functions) and the hash secret symbols
    that numba.cpython.hashing adds on import. Numba's C helpers and math symbols are
    added when its CPU context is created, the threading layer of a parallel kernel by the
    cache entry's own reload hook. A kernel that is not in the cache is compiled as
    before, and the compiler refreshes the registries itself (CompilerBase.__init__).
    Only cpuq's kernels, and only under the Numba releases in _LEAN_NUMBA: other packages'
    cached functions in the same process (which may need what an extension registers) and
    other releases load as Numba does."""
    import numba
    from numba.core import caching
    version = tuple(int(p) for p in numba.__version__.split(".")[:2] if p.isdigit())
    cache = caching.FunctionCache
    if not (_LEAN_NUMBA[0] <= version <= _LEAN_NUMBA[1] and hasattr(cache, "_load_overload")
            and hasattr(cache, "_guard_against_spurious_io_errors")):
        return False
    import numba.cpython.hashing  # noqa: F401  (its _numba_hashsecret_* symbols)
    from numba.core.runtime import nrt

    numba_load_overload = cache.load_overload

    def load_overload(self, sig, target_context):
        if not getattr(self._py_func, "__module__", "").startswith(__package__ + "."):
            return numba_load_overload(self, sig, target_context)
        nrt.rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        # None when the with block swallowed an I/O error, as in Numba's own

    cache.load_overload = load_overload
    return True
