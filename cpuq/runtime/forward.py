"""The transformer forward pass (Qwen2, Qwen3, Llama) over a KV cache, written top to
bottom like HF's modeling files: embed, then per layer attention and MLP blocks with
pre-norm residuals, then the final norm and the output projection.

Activations are float32; weights are read as quantized blocks by cpuq.kernels. A call
processes a batch of consecutive tokens (a prompt chunk or one generated token).

Imports numpy, cpuq.arch, cpuq.kernels, cpuq.runtime.gemm and cpuq.runtime.weights (and
takes a runtime.gpu.GpuOffload without importing it).
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..arch import ModelConfig
from ..kernels.activations import swiglu
from ..kernels.attention import attention, store_kv
from ..kernels.matmul import get_rows, matmul
from ..kernels.matvec import BLOCK_TYPES, matvec_many
from ..kernels.norms import rms_norm
from ..kernels.rope import apply_rope, rope_tables
from ..kernels.step import attention_step, blocks_step, mlp_step
from .gemm import Gemm
from .weights import Layer, Matrix, Weights


class KVCache:
    """Keys and values of every layer for positions 0 .. n_past-1 in kernels.attention's
    layouts, blocks of BLOCK positions: keys (n_layer, n_blocks, n_head_kv, head_dim,
    BLOCK), values (n_layer, n_blocks, n_head_kv, BLOCK, head_dim). kv_type "f16" (fp16
    as uint16 bits, kernels.halves; llama.cpp's default cache type) reads and holds half of
    "f32". Untouched pages are mapped lazily, so memory grows with the positions used, not
    with n_ctx (see _untouched_zeros)."""

    BLOCK = 64
    TYPES = {"f16": np.uint16, "f32": np.float32}

    def __init__(self, cfg: ModelConfig, n_ctx: int, kv_type: str = "f16"):
        n_blocks = -(-n_ctx // self.BLOCK)
        dtype = self.TYPES[kv_type]
        self.k = _untouched_zeros((cfg.n_layer, n_blocks, cfg.n_head_kv, cfg.head_dim, self.BLOCK), dtype)
        self.v = _untouched_zeros((cfg.n_layer, n_blocks, cfg.n_head_kv, self.BLOCK, cfg.head_dim), dtype)
        self.n_ctx = n_ctx
        self.n_past = 0
        self.gpu = None  # the offloaded blocks' part (runtime.gpu.GpuCache), when there are any

    def clear(self) -> None:
        self.n_past = 0


def _untouched_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in private anonymous memory that the kernel maps 4 KiB at a time on first
    touch. Not np.zeros: numpy asks for transparent huge pages on large arrays, and where
    the kernel's THP defrag setting is "madvise" (a common default) a first touch of each
    2 MiB page may wait for memory compaction: ~9 ms per layer's first store measured
    here, up to a third of a 32-token prompt's time."""
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype, count).reshape(shape)


@dataclass(frozen=True)
class Rope:
    """What rope_tables needs besides positions, from the config."""
    n_rot: int
    base: float
    neox: bool
    freq_scale: float
    yarn: tuple[float, float, float, int] | None
    attn_factor: float

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Rope":
        rope = dict(cfg.rope_scaling or ())
        kind = rope.get("rope_type")
        factor = float(rope.get("factor", 1.0)) if kind in ("linear", "yarn") else 1.0
        yarn = None
        attn_factor = 1.0
        if kind == "yarn":
            # llama.cpp: yarn_ext_factor < 0 means 1.0 for YaRN (llama-context.cpp); beta 32 / 1.
            ext = float(rope.get("extrapolation_factor", -1.0))
            yarn = (1.0 if ext < 0 else ext, float(rope.get("beta_fast", 32.0)), float(rope.get("beta_slow", 1.0)),
                    int(rope["original_max_position_embeddings"]))
            attn_factor = float(rope.get("attention_factor", 1.0))
        return cls(cfg.head_dim, cfg.rope_theta, cfg.arch != "llama", 1.0 / factor, yarn, attn_factor)

    def tables(self, positions: np.ndarray, freq_factors: np.ndarray | None):
        return rope_tables(positions, self.n_rot, self.base, self.freq_scale, freq_factors, self.yarn,
                           self.attn_factor)


def _batched(gemm: Gemm | None, n: int) -> bool:
    """Whether n rows go through gemm's workers (a prompt chunk of at least gemm.min_tokens)."""
    return gemm is not None and n >= gemm.min_tokens


Observer = Callable[[np.ndarray, tuple[str, ...]], None]


def _linears(x: np.ndarray, gemm: Gemm | None, *ws: Matrix, observe: Observer | None = None) -> list[np.ndarray]:
    """x (n, k) @ W.T for each W (up to three). One token: the fused per-row kernels, all W
    in one parallel region; a long enough prompt chunk: gemm (int8 or BLAS), all W in one round of tasks.
    observe(x, names of the W) first, when given."""
    if observe is not None:
        observe(x, tuple(w.name for w in ws))
    if x.shape[0] == 1:
        return [o.reshape(1, -1) for o in matvec_many(x[0], [(w.data, w.ggml_type) for w in ws])]
    if _batched(gemm, x.shape[0]):
        return gemm.linear(x, [(w.data, w.ggml_type) for w in ws])
    outs = [np.empty((x.shape[0], w.rows), np.float32) for w in ws]
    for w, out in zip(ws, outs):
        matmul(x, w.data, w.ggml_type, out)
    return outs


def _rows(gemm: Gemm | None, n: int, fn) -> None:
    """fn(lo, hi) over rows [0, n): in gemm's workers for a prompt chunk that uses them."""
    if not _batched(gemm, n):
        fn(0, n)
    else:
        gemm.split(n, fn)


def _norm(x: np.ndarray, weight: np.ndarray, eps: float, gemm: Gemm | None = None) -> np.ndarray:
    out = np.empty_like(x)
    _rows(gemm, x.shape[0], lambda lo, hi: rms_norm(x[lo:hi], weight, eps, out[lo:hi]))
    return out


_EMPTY = np.zeros(0, np.float32)  # kernels.step's stand-in for a bias or q/k norm the model lacks


def _one_step(x, observe: Observer | None, *ws: Matrix) -> bool:
    """Whether kernels.step runs this stage: one token, no observer, block types only."""
    return x.shape[0] == 1 and observe is None and all(w.ggml_type in BLOCK_TYPES for w in ws)


@dataclass(frozen=True)
class StepPack:
    """Every block's one-token arguments as arrays, for kernels.step.blocks_step (one Numba
    call per token for all blocks): the matrices as (byte offset, rows, row bytes) in the
    file's mapping with their type ids, the vectors stacked per block ((n_layer, 0) for what
    the model lacks)."""
    buf: np.ndarray
    at: np.ndarray
    types: np.ndarray
    vectors: tuple[np.ndarray, ...]  # attn_norm, bq, bk, bv, q_norm, k_norm, ffn_norm

    @classmethod
    def build(cls, w: Weights, buf: np.ndarray | None) -> "StepPack | None":
        """None unless every block's matrices are BLOCK_TYPES rows lying whole inside buf
        (the file's uint8 mapping), and each vector is present in all blocks or in none."""
        if buf is None or not w.layers:
            return None
        base, size = buf.__array_interface__["data"][0], buf.nbytes
        at = np.zeros((len(w.layers), 7, 3), np.int64)
        types = np.zeros((len(w.layers), 7), np.int64)
        for il, layer in enumerate(w.layers):
            for j, m in enumerate((layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down)):
                off = m.data.__array_interface__["data"][0] - base
                if (m.ggml_type not in BLOCK_TYPES or not m.data.flags.c_contiguous or off < 0
                        or off + m.data.nbytes > size):
                    return None
                at[il, j] = off, m.data.shape[0], m.data.shape[1]
                types[il, j] = m.ggml_type
        vectors = []
        for name in ("attn_norm", "bq", "bk", "bv", "q_norm", "k_norm", "ffn_norm"):
            vs = [getattr(layer, name) for layer in w.layers]
            if all(v is None for v in vs):
                vectors.append(np.zeros((len(vs), 0), np.float32))
            elif any(v is None for v in vs) or len({v.shape for v in vs}) != 1:
                return None
            else:
                vectors.append(np.stack(vs).astype(np.float32))
        return cls(buf, at, types, tuple(vectors))


def attention_block(x, layer: Layer, il: int, cfg: ModelConfig, cache: KVCache, start: int, cos, sin, neox,
                    gemm: Gemm | None, observe: Observer | None = None):
    n = x.shape[0]
    hd = cfg.head_dim
    scale = np.float32(1.0 / math.sqrt(hd))
    if _one_step(x, observe, layer.wq, layer.wk, layer.wv, layer.wo):  # the same kernels in one Numba call
        e = lambda a: _EMPTY if a is None else a  # noqa: E731
        return attention_step(x[0], layer.attn_norm, cfg.rms_eps, layer.wq.data, layer.wq.ggml_type, e(layer.bq),
                              layer.wk.data, layer.wk.ggml_type, e(layer.bk), layer.wv.data, layer.wv.ggml_type,
                              e(layer.bv), e(layer.q_norm), e(layer.k_norm), cos, sin, neox, cache.k[il], cache.v[il],
                              start, scale, layer.wo.data, layer.wo.ggml_type, cfg.n_head, cfg.n_head_kv, hd)[None]
    h = _norm(x, layer.attn_norm, cfg.rms_eps, gemm)
    q, k, v = _linears(h, gemm, layer.wq, layer.wk, layer.wv, observe=observe)
    for t, bias in ((q, layer.bq), (k, layer.bk), (v, layer.bv)):
        if bias is not None:
            t += bias
    q = q.reshape(n, cfg.n_head, hd)
    k = k.reshape(n, cfg.n_head_kv, hd)
    v = v.reshape(n, cfg.n_head_kv, hd)

    def qk_rows(lo, hi):
        if layer.q_norm is not None:  # qwen3: RMSNorm over each head before rope
            rms_norm(q[lo:hi].reshape(-1, hd), layer.q_norm, cfg.rms_eps, q[lo:hi].reshape(-1, hd))
            rms_norm(k[lo:hi].reshape(-1, hd), layer.k_norm, cfg.rms_eps, k[lo:hi].reshape(-1, hd))
        apply_rope(q[lo:hi], cos[lo:hi], sin[lo:hi], neox)
        apply_rope(k[lo:hi], cos[lo:hi], sin[lo:hi], neox)

    _rows(gemm, n, qk_rows)
    store_kv(cache.k[il], cache.v[il], k, v, start)
    out = np.empty_like(q)
    if not _batched(gemm, n):
        attention(q, cache.k[il], cache.v[il], start, scale, out)
    else:
        gemm.attention(q, cache.k[il], cache.v[il], start, scale, out)
    return _linears(out.reshape(n, -1), gemm, layer.wo, observe=observe)[0]


def mlp_block(x, layer: Layer, cfg: ModelConfig, gemm: Gemm | None, observe: Observer | None = None):
    if _one_step(x, observe, layer.w_gate, layer.w_up, layer.w_down):
        return mlp_step(x[0], layer.ffn_norm, cfg.rms_eps, layer.w_gate.data, layer.w_gate.ggml_type,
                        layer.w_up.data, layer.w_up.ggml_type, layer.w_down.data, layer.w_down.ggml_type)[None]
    h = _norm(x, layer.ffn_norm, cfg.rms_eps, gemm)
    gate, up = _linears(h, gemm, layer.w_gate, layer.w_up, observe=observe)
    _rows(gemm, x.shape[0], lambda lo, hi: swiglu(gate[lo:hi], up[lo:hi], gate[lo:hi]))
    del h, up  # a 512-token chunk's up is 9.5 MiB (Qwen2.5-0.5B): not held through the down product
    return _linears(gate, gemm, layer.w_down, observe=observe)[0]


def forward(w: Weights, cfg: ModelConfig, rope: Rope, tokens: np.ndarray, cache: KVCache,
            logits_from: int, gemm: Gemm | None = None, observe: Observer | None = None, gpu=None,
            steps: StepPack | None = None) -> np.ndarray:
    """Run `tokens` (n,) int64 at positions cache.n_past .. +n-1, append their keys and
    values to the cache, and return the logits after tokens logits_from .. n-1 of this call,
    (n - logits_from, n_vocab) (n - 1: the last token's only; n: none, (0, n_vocab); the
    output matrix, the largest, multiplies only those rows). The caller checks the tokens
    are < n_vocab and fit in the cache. gemm: run prompt chunks' matmuls through its workers
    (inside gemm.session()). observe(x, names): called with the input x (n, k) of every
    matrix product in the blocks and the names of the matrices that multiply it (what
    llama.cpp's importance matrix collects; not the output matrix's). gpu: a
    runtime.gpu.GpuOffload that runs the blocks from gpu.first_layer on (cache.gpu holds
    their keys and values) and, if it has it, the output matrix. steps: w's StepPack, for
    one token's blocks in one kernels.step call."""
    n = tokens.shape[0]
    start = cache.n_past
    x = np.empty((n, cfg.n_embd), np.float32)
    get_rows(w.token_embd.data, w.token_embd.ggml_type, tokens, x)
    cos, sin = rope.tables(np.arange(start, start + n), w.rope_freqs)
    n_cpu = len(w.layers) if gpu is None else gpu.first_layer
    if n == 1 and observe is None and steps is not None:  # the per-block loop below, in one Numba call
        blocks_step(x[0], n_cpu, steps.buf, steps.at, steps.types, *steps.vectors, cfg.rms_eps, cos, sin, rope.neox,
                    cache.k, cache.v, start, np.float32(1.0 / math.sqrt(cfg.head_dim)), cfg.n_head, cfg.n_head_kv,
                    cfg.head_dim)
    else:
        for il, layer in enumerate(w.layers[:n_cpu]):
            x += attention_block(x, layer, il, cfg, cache, start, cos, sin, rope.neox, gemm, observe)
            x += mlp_block(x, layer, cfg, gemm, observe)
    if gpu is None:
        x = x[min(max(logits_from, 0), n):]
    else:  # rows logits_from.. come back: the logits, or the hidden state for the CPU's output matrix
        x = gpu.forward(x, cache.gpu, start, logits_from)
    cache.n_past = start + n
    if gpu is not None and gpu.with_output:
        return x
    if x.shape[0] == 0:
        return np.empty((0, w.output.rows), np.float32)
    return _linears(_norm(x, w.output_norm, cfg.rms_eps, gemm), gemm, w.output)[0]
