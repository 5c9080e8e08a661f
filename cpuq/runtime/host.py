"""What the runtime asks of the host: physical cores, memory, whether Numba's threading
layer takes parallel regions from several threads, and Ctrl-C held over a kernel call.

Imports the standard library and numba only.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import numba


def physical_cores() -> int:
    """Physical cores (what llama.cpp uses by default): distinct (package, core id) pairs
    in /proc/cpuinfo, else os.cpu_count()."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def memory_bytes() -> int | None:
    """RAM plus swap (/proc/meminfo), else RAM (sysconf), else None: what a KV cache
    could ever be given."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.split()}
        return info["MemTotal"] + info.get("SwapTotal", 0)
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


ONE_AT_A_TIME = threading.Lock()  # every Model's forward passes, under Numba's workqueue layer
_layer_is_threadsafe: bool | None = None


def threadsafe_layer() -> bool:
    """Whether Numba's threading layer runs parallel regions launched from several threads
    at once (tbb, omp) rather than aborting the process (workqueue, Numba's fallback where
    neither TBB nor OpenMP is found)."""
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        try:
            from numba.np.ufunc import parallel
            parallel._launch_threads()  # picks the layer, as the first parallel region would
            _layer_is_threadsafe = numba.threading_layer() != "workqueue"
        except Exception:  # noqa: BLE001  (an internal of Numba's moved: assume the worst)
            _layer_is_threadsafe = False
    return _layer_is_threadsafe


@contextmanager
def sigint_deferred():
    """Ctrl-C held until the block ends, then raised as KeyboardInterrupt. Raised inside
    Numba's dispatcher instead (the main thread loads and compiles kernels too: its share
    of a prompt chunk, one-token steps), it can leave Numba's compiler lock taken; the next
    kernel a worker thread loads then waits forever (a chat hung after Ctrl-C in a long
    prompt). Only in the main thread, where Python runs signal handlers, and only over
    Python's own handler (an application's handler is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    hit = []
    signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hit:
        raise KeyboardInterrupt
