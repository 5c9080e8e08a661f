"""Products of a prompt chunk (many tokens) with quantized weight matrices. On x86 hosts
with AVX512-VNNI the block types go through kernels.qgemm: the chunk's activations are
rounded to two int8 digits once per matrix input and multiplied with the weights' integers,
~1.7x the multiply-adds per second of float32 (one thread, 512 tokens, k = 1024: Q4_K 87
against 48 GMAC/s). Elsewhere, and for float weights, each weight tile is decoded to
float32 once (kernels.matmul.dequantize_rows) and multiplied with all tokens by numpy's
sgemm.

Why worker threads and a one-thread BLAS: Numba's OpenMP threads spin between parallel
regions (decode depends on that: its ~200 small regions per token would otherwise pay a
wake-up each), and OpenBLAS's own threads spin too; on a machine with few cores the two
pools then steal each other's cores (prefill ran at half speed). So here `n_threads`
Python threads (the calling thread and n_threads - 1 workers) each decode a tile and call
sgemm limited to one thread (threadpoolctl, for the duration of a prompt chunk only); both
release the GIL.

Imports numpy, threadpoolctl and cpuq.kernels; nothing of models or files.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from threadpoolctl import ThreadpoolController

from ..kernels.attention import causal_softmax, gather_kv
from ..kernels.matmul import dequantize_rows
from ..kernels.qgemm import HOST_VNNI, ROWS, TOKENS, TYPES as INT8_TYPES, qgemm_rows, quantize_tokens

TILE_BYTES = 8 << 20  # float32 weights per task at most: a few hundred rows or more, as sgemm likes
# Attention scores per kv head in flight, at most: deep prompt chunks take fewer tokens a part
# (a larger budget only raises the peak RSS; docs/performance.md).
SCORES_BYTES = 4 << 20
# Query tokens per attention part: a part multiplies only the keys its last token sees, so
# the masked-out triangle is mostly skipped.
PART_TOKENS = 64
MIN_TOKENS = 32  # below this, the fused per-row kernels beat decoding tiles (measured, 0.5B shapes)
# The int8 products beat them from 2 tokens on (one token is a decode step).
MIN_TOKENS_INT8 = 2
# With the int8 products, chunks shorter than this run as one-token steps (kernels.step), token
# by token: a chunk's ~300 rounds of worker tasks cost more than a few steps. Elsewhere: not
# measured, not done.
STEP_TOKENS_INT8 = 8
# Up to this many tokens, tile @ x.T plus a transposed copy beats x @ tile.T written in place
# (one-thread sgemm; at longer x the in-place product is faster).
SMALL_BATCH = 128
# Up to this many rows, split's row-wise kernels (norms, RoPE, SwiGLU, quantizing x) run on the
# calling thread: a round of worker tasks costs ~80 us, more than their work on a few rows.
INLINE_ROWS = 32

_controller: ThreadpoolController | None = None


def _blas_controller() -> ThreadpoolController:
    global _controller
    if _controller is None:  # scanning the loaded libraries takes ~10 ms: once per process
        _controller = ThreadpoolController()
    return _controller


def _bounds(m: int, parts: int, unit: int = 1) -> list[int]:
    """Row bounds 0 = b[0] <= ... <= b[-1] = m splitting m rows into at most `parts` near-equal
    ranges of whole `unit`s (the last one may be short). Integers, not np.linspace: that took
    ~30 us a call, and a 32-token chunk makes ~150 of them."""
    units = -(-m // unit)
    parts = max(1, min(units, parts))
    return [min(m, units * j // parts * unit) for j in range(parts + 1)]


def _strip(x: np.ndarray, xq: tuple | None, w: np.ndarray, ggml_type: int, r0: int, r1: int,
           out: np.ndarray) -> None:
    """out[:, r0:r1] = x @ W[r0:r1].T: kernels.qgemm's int8 products where xq (x rounded by
    Gemm._quantize) is given, else the rows decoded to a float32 tile and one-thread sgemm."""
    if xq is not None:
        qgemm_rows(*xq, w, ggml_type, r0, r1, out)
        return
    tile = np.empty((r1 - r0, x.shape[1]), np.float32)
    dequantize_rows(w, ggml_type, r0, tile)
    if x.shape[0] <= SMALL_BATCH:  # W x^T, then its transpose: OpenBLAS packs a few tokens better this way
        out[:, r0:r1] = np.matmul(tile, x.T).T
    else:
        np.matmul(x, tile.T, out=out[:, r0:r1])  # a column block: sgemm writes it in place (ldc)


class Gemm:
    """`n_threads` threads (the caller and a pool) for a prompt chunk's forward pass: its matmuls
    (`linear`) and its row-wise kernels (`split`, so that no Numba parallel region, whose
    OpenMP threads would then spin against these workers, runs during the chunk). Use
    `with gemm.session():` around the chunk."""

    def __init__(self, n_threads: int, int8: bool = HOST_VNNI):
        self.n_threads = n_threads
        self.int8 = int8  # block types through kernels.qgemm (needs AVX512-VNNI)
        self.min_tokens = MIN_TOKENS_INT8 if int8 else MIN_TOKENS  # shorter chunks: the per-row kernels
        self.step_tokens = STEP_TOKENS_INT8 if int8 else 1  # shorter chunks: one-token steps (Model._forward)
        # n_threads - 1 workers: the calling thread takes tasks too (see _each)
        self._pool = ThreadPoolExecutor(max(1, n_threads - 1), thread_name_prefix="cpuq-gemm")

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
        int8 = [self.int8 and k % 32 == 0 and t in INT8_TYPES for _, t in weights]
        xq = self._quantize(x) if any(int8) else None
        tasks = []
        for i, (w, _) in enumerate(weights):  # equal parts, a multiple of n_threads of them
            m = w.shape[0]
            parts = self.n_threads * max(1, -(-m * k * 4 // (self.n_threads * TILE_BYTES)))
            bounds = _bounds(m, parts, ROWS if int8[i] else 1)  # the int8 products take whole strips
            tasks += [(i, r0, r1) for r0, r1 in zip(bounds[:-1], bounds[1:])]

        def run(task):
            i, r0, r1 = task
            _strip(x, xq if int8[i] else None, *weights[i], r0, r1, outs[i])

        self._each(run, tasks)
        return outs

    def linear_groups(self, x: np.ndarray, spans: Sequence[tuple[int, int]],
                      weights: Sequence[Sequence[tuple[np.ndarray, int]]],
                      index: np.ndarray | None = None) -> list[np.ndarray]:
        """x: (n, k) f32 rows in groups (or, with index (n,), row r is x[index[r]]), spans[j]
        = (lo, hi) group j's rows, weights[j] its matrices (the same number for every group,
        slot i of each with the same rows) -> [(n, m_i) f32]: rows lo:hi of out i = the
        group's rows @ weights[j][i].T. A mixture of experts' tokens grouped by expert: one
        round of tasks for all groups, where a round per group (~80 us each) made up a fifth
        of a prompt with 256 experts; x's rows are rounded to int8 once, not once per
        expert that picked them."""
        n, k = (x.shape[0], x.shape[1]) if index is None else (index.shape[0], x.shape[1])
        outs = [np.empty((n, w.shape[0]), np.float32) for w, _ in weights[0]] if weights else []
        int8 = [[self.int8 and k % 32 == 0 and t in INT8_TYPES for _, t in ws] for ws in weights]
        xq = None
        if any(map(any, int8)):
            # TOKENS zero rows past the end: a group's int8 rows are read in whole passes of TOKENS
            xq = self._quantize(x, extra=TOKENS)
            if index is not None:
                pad = np.full(TOKENS, x.shape[0], np.int64)
                xq = tuple(a[np.concatenate([index, pad])] for a in xq)
        if index is not None and not all(map(all, int8)):
            x = x[index]
        tasks = []
        for j, ws in enumerate(weights):
            for i, (w, _) in enumerate(ws):
                m = w.shape[0]
                parts = max(1, -(-m * k * 4 // TILE_BYTES))  # many groups: whole matrices balance the threads
                bounds = _bounds(m, parts, ROWS if int8[j][i] else 1)
                tasks += [(j, i, r0, r1) for r0, r1 in zip(bounds[:-1], bounds[1:])]

        def run(task):
            j, i, r0, r1 = task
            lo, hi = spans[j]
            end = lo + -(-(hi - lo) // TOKENS) * TOKENS  # the group's rows in whole passes of TOKENS
            _strip(x[lo:hi], tuple(a[lo:end] for a in xq) if int8[j][i] else None, *weights[j][i], r0, r1,
                   outs[i][lo:hi])

        self._each(run, tasks)
        return outs

    def _quantize(self, x: np.ndarray, extra: int = 0) -> tuple[np.ndarray, ...]:
        """x (n, k) -> kernels.qgemm's (x8, d8, xs16, xs32), rows padded with zeros to a
        multiple of TOKENS (and `extra` rows more), the rows split over the workers."""
        n, k = x.shape
        n_pad = -(-n // TOKENS) * TOKENS + extra
        xq = (np.empty((n_pad, 2 * k), np.int8), np.empty((n_pad, k // 32), np.float32),
              np.empty((n_pad, k // 16), np.float32), np.empty((n_pad, k // 32), np.float32))
        for a in xq:
            a[n:] = 0
        x8, d8, xs16, xs32 = xq
        self.split(n, lambda lo, hi: quantize_tokens(x[lo:hi], x8[lo:hi, :k], x8[lo:hi, k:], d8[lo:hi],
                                                     xs16[lo:hi], xs32[lo:hi]))
        return xq

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, scale: float,
                  out: np.ndarray) -> None:
        """kernels.attention for a prompt chunk through BLAS: per kv head, the scores of all
        its query heads' rows at once (Q K^T), kernels.attention.causal_softmax, then P V;
        the kv heads spread over the workers, query rows in parts of PART_TOKENS tokens
        (fewer where the scores' memory needs it), each with the keys its tokens see.
        q: (n, n_head, hd) at positions start..; caches in attention's layout."""
        n, n_head, hd = q.shape
        n_head_kv = k_cache.shape[1]
        group = n_head // n_head_kv
        n_keys = start + n
        rows_per_part = group * max(1, min(PART_TOKENS, SCORES_BYTES // (4 * n_keys * group)))

        def run(g):
            keys = np.empty((n_keys, hd), np.float32)
            values = np.empty((n_keys, hd), np.float32)
            gather_kv(k_cache, v_cache, g, n_keys, keys, values)
            qg = q[:, g * group:(g + 1) * group].reshape(n * group, hd) * np.float32(scale)
            og = np.empty((n * group, hd), np.float32)
            for r0 in range(0, n * group, rows_per_part):
                r1 = min(n * group, r0 + rows_per_part)
                seen = start + (r1 - 1) // group + 1  # the part's last token sees no further
                scores = qg[r0:r1] @ keys[:seen].T
                causal_softmax(scores, group, start + 1 + r0 // group)
                np.matmul(scores, values[:seen], out=og[r0:r1])
            out[:, g * group:(g + 1) * group] = og.reshape(n, group, hd)

        self._each(run, range(n_head_kv))

    def split(self, n: int, fn) -> None:
        """fn(lo, hi) for n_threads equal ranges covering rows [0, n), in the workers; up to
        INLINE_ROWS rows, fn(0, n) on the calling thread."""
        if n <= INLINE_ROWS:
            fn(0, n)
            return
        bounds = _bounds(n, self.n_threads)
        ranges = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        self._each(lambda r: fn(*r), ranges)

    def _each(self, fn, items) -> None:
        """fn(item) for every item, on n_threads threads: the workers and the calling
        thread, each taking the next item when done with one. Before, the calling thread
        waited while the workers ran them all: it paid a wake-up to start the round and one
        to see it end (a 32-token chunk has ~300 rounds), and an uneven split of tasks (q
        and k, v of different sizes; Q6_K rows slower than Q4_K) idled a worker. Re-raises
        the first exception, after every running task has stopped."""
        items = list(items)
        if self.n_threads == 1 or len(items) == 1:
            for item in items:
                fn(item)
            return
        queue = iter(items)  # a list iterator's next() is atomic under the GIL
        stop = []  # set on the first exception: the others take no further items

        def drain():
            for item in queue:
                if stop:
                    return
                try:
                    fn(item)
                except BaseException:
                    stop.append(True)
                    raise

        helpers = [self._pool.submit(drain) for _ in range(min(self.n_threads, len(items)) - 1)]
        error = None
        try:
            drain()
        except BaseException as e:
            error = e
        for f in helpers:  # every helper stops before this returns: they write into the caller's arrays
            try:
                f.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
