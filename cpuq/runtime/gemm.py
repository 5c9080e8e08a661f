"""Products of a prompt chunk (many tokens) with quantized weight matrices, through BLAS:
each weight tile is decoded to float32 once (kernels.matmul.dequantize_rows) and
multiplied with all tokens by numpy's sgemm.

Why worker threads and a one-thread BLAS: Numba's OpenMP threads spin between parallel
regions (decode depends on that: its ~200 small regions per token would otherwise pay a
wake-up each), and OpenBLAS's own threads spin too; on a machine with few cores the two
pools then steal each other's cores (prefill ran at half speed). So here `n_threads`
Python threads each decode a tile and call sgemm limited to one thread (threadpoolctl,
for the duration of a prompt chunk only); both release the GIL.

Imports numpy, threadpoolctl and cpuq.kernels.matmul; nothing of models or files.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from ..kernels.matmul import dequantize_rows

TILE_BYTES = 8 << 20  # float32 weights per task at most: a few hundred rows or more, as sgemm likes
MIN_TOKENS = 32  # below this, the fused per-row kernels beat decoding tiles (measured, 0.5B shapes)

_controller: ThreadpoolController | None = None


def _blas_controller() -> ThreadpoolController:
    global _controller
    if _controller is None:  # scanning the loaded libraries takes ~10 ms: once per process
        _controller = ThreadpoolController()
    return _controller


class Gemm:
    """A pool of `n_threads` workers for a prompt chunk's forward pass: its matmuls
    (`linear`) and its row-wise kernels (`split`, so that no Numba parallel region, whose
    OpenMP threads would then spin against these workers, runs during the chunk). Use
    `with gemm.session():` around the chunk."""

    def __init__(self, n_threads: int):
        self.n_threads = n_threads
        self._pool = ThreadPoolExecutor(n_threads, thread_name_prefix="cpuq-gemm")

    @contextlib.contextmanager
    def session(self):
        """BLAS limited to one thread per call while inside (each worker runs one)."""
        with _blas_controller().limit(limits=1, user_api="blas"):
            yield self

    def linear(self, x: np.ndarray, weights: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """x: (n, k) f32; weights: (w uint8 (m_i, row_bytes_i), ggml_type_i) with k columns
        -> [(n, m_i) f32 = x @ W_i.T]. The tiles of all matrices share one round of tasks
        (q, k and v, or gate and up, in one go)."""
        n, k = x.shape
        outs = [np.empty((n, w.shape[0]), np.float32) for w, _ in weights]
        tasks = []
        for i, (w, _) in enumerate(weights):  # equal parts, a multiple of n_threads of them
            m = w.shape[0]
            parts = self.n_threads * max(1, -(-m * k * 4 // (self.n_threads * TILE_BYTES)))
            bounds = np.linspace(0, m, min(m, parts) + 1).astype(int)
            tasks += [(i, int(r0), int(r1)) for r0, r1 in zip(bounds[:-1], bounds[1:])]

        def run(task):
            i, r0, r1 = task
            w, ggml_type = weights[i]
            tile = np.empty((r1 - r0, k), np.float32)
            dequantize_rows(w, ggml_type, r0, tile)
            outs[i][:, r0:r1] = x @ tile.T

        for _ in self._pool.map(run, tasks):  # re-raises a worker's exception here
            pass
        return outs

    def split(self, n: int, fn, causal_start: int | None = None) -> None:
        """fn(lo, hi) for n_threads ranges covering rows [0, n), in the workers. With
        causal_start, the rows are attention queries at positions causal_start.., whose
        cost grows with the position: the ranges then have equal total cost."""
        if causal_start is None:
            bounds = np.linspace(0, n, self.n_threads + 1).astype(int)
        else:
            cost = np.cumsum(np.arange(causal_start + 1, causal_start + n + 1, dtype=np.float64))
            cuts = np.searchsorted(cost, cost[-1] * np.arange(1, self.n_threads) / self.n_threads)
            bounds = np.concatenate([[0], cuts, [n]]).astype(int)
        ranges = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        for _ in self._pool.map(lambda r: fn(*r), ranges):
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=True)
