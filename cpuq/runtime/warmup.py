"""A cold start's second core: the one-token step's kernels compiled in a child process
while this one compiles the prompt's.

Numba compiles on one thread. With an empty cache (the first run after an install or an
upgrade) a chat's first answer waits for two sets of kernels in turn: the prompt chunk's
(qgemm, the BLAS attention) and the one-token step's (the model file's
stages bound to kernels.step), each compiling for many seconds. So at load, when the cache lacks this
kind of model's step kernels, a child process (`python -m cpuq.runtime.warmup FILE
KV_TYPE MARKER`) loads the same file and runs one token through it, on the other core: the
same calls, so the same Numba signatures, compiled into the same cache. The parent's first
one-token forward pass waits for the child, then loads them from the cache.

The child writes MARKER (<NUMBA_CACHE_DIR>/cpuq-warm/<key>) when done; the key covers what
differs between models in the step kernels' argument types (the cache type; for files
whose blocks cannot run as the compiled decode step, each tensor's), so a warm cache starts
no child. CPUQ_JIT_HELPER=0 turns it off.

Imports the standard library, numba, cpuq.models and cpuq.kernels.matvec; the child
imports runtime.model.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ENV = "CPUQ_JIT_HELPER"
WAIT_S = 600  # a child still compiling after this is killed, and the parent compiles for itself


def marker_path(weights, cfg, kv_type: str, packed: bool) -> Path | None:
    """Where the child marks this kind of model's step kernels as compiled, or None when
    there is no cache directory to write to. packed: the model has a kernels.step.StepPack,
    so its blocks run as the model file's compiled `blocks`, whose argument types do not
    depend on the file (its weight types are run-time integers, its vectors stacked arrays)."""
    import numba

    from ..kernels.matvec import BLOCK_TYPES
    from ..models import family
    cache = numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        return None
    model = family(cfg)
    parts = [kv_type, numba.__version__, sys.version, model.__name__,
             "block" if weights.output.ggml_type in BLOCK_TYPES else str(weights.output.ggml_type)]
    if packed:
        parts.append("blocks")
    else:  # the chunk path's kernels and their signatures follow the tensors
        for layer in weights.layers:
            for t in model.TENSORS:
                a = getattr(layer, t.field)
                if a is None:
                    parts.append("-")
                elif t.is_matrix:
                    parts.append(f"{a.ggml_type}:{numba.typeof(a.data)}")
                else:
                    parts.append(str(numba.typeof(a)))
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(cache) / "cpuq-warm" / key


def cold_marker(weights, cfg, kv_type: str, packed: bool) -> Path | None:
    """The marker, when this kind of model's step kernels are not yet in Numba's cache (as
    far as the marker tells); None when they are or there is no cache directory."""
    marker = marker_path(weights, cfg, kv_type, packed)
    return marker if marker is not None and not marker.exists() else None


def write_marker(marker: Path, path) -> None:
    """Mark the step kernels as compiled (by the child, or by a process that compiled them
    itself with the child turned off). Best effort: an unwritable cache only means the
    next run says "first run" again."""
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{path}\n")
        os.replace(tmp, marker)  # whole or absent, whatever stops us
    except OSError:
        pass


class StepCompiler:
    """The child process, while it runs. wait() before the first one-token forward pass;
    stop() when the model closes (it is also stopped when the parent exits)."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc

    @classmethod
    def start(cls, path: Path, weights, cfg, kv_type: str, packed: bool) -> "StepCompiler | None":
        """The child for the model at `path`, or None: turned off, a warm cache, no writable
        cache directory, or no way to start a process."""
        if os.environ.get(ENV, "1") == "0":
            return None
        marker = marker_path(weights, cfg, kv_type, packed)
        if marker is None or marker.exists():
            return None
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(marker.parent, os.W_OK):
                return None
            package_root = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ, NUMBA_CACHE_DIR=str(marker.parent.parent), NUMBA_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
                       **{ENV: "0"})
            # Its own session: a Ctrl-C that stops a chat reply must not stop the compiling.
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(path), kv_type, str(marker)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        except (OSError, ValueError):
            return None
        return cls(proc)

    def wait(self) -> None:
        """Until the child has finished (whatever its outcome: the parent compiles what it
        did not leave in the cache)."""
        try:
            self._proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.stop()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def main(argv: list[str]) -> int:
    path, kv_type, marker = argv
    from .model import Model
    with Model(path, n_ctx=8, n_threads=1, kv_type=kv_type) as model:
        model.logits([0])  # token 0 exists in every vocabulary
    write_marker(Path(marker), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
