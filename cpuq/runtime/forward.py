"""The forward pass over a KV cache: embed, the blocks of the model file
(cpuq.models), the final norm and the output projection; and `Paths.run`, the one place
that chooses how a call's tokens run:

- step: one token through every block in one Numba call (the model's stages bound to
  kernels.step), when its matrices are block types lying in the file's mapping;
- tokens: a few tokens (fewer than gemm.step_tokens), one step each, which beats the
  chunk products there;
- chunk: the model's stages bound to runtime.chunk, n tokens at once (threaded from
  gemm.min_tokens on); also the path of F16/F32 files and of an observer;
- gpu: after the CPU's blocks, the offloaded ones (runtime.gpu), when there are any.

Activations are float32; weights are read as quantized blocks by cpuq.kernels.

Imports numpy, cpuq.arch, cpuq.models, cpuq.kernels, and runtime.chunk, gemm, stages,
weights (and takes a runtime.gpu.GpuOffload without importing it).
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np

from ..arch import ModelConfig
from ..kernels.matmul import get_rows
from ..kernels.matvec import BLOCK_TYPES, NONE_TYPE
from ..kernels.rope import rope_tables
from ..kernels.step import StepContext, StepPack
from ..models import family
from . import stages
from .chunk import ChunkContext, Observer, products, rms_norm
from .gemm import Gemm
from .warmup import write_marker
from .weights import Weights


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
        # A hybrid's Gated DeltaNet states (kernels.step.StepContext's layouts), fixed in size
        # whatever the context; only the DeltaNet blocks' pages are ever touched.
        self.recurrent = tuple(i for i in range(cfg.n_layer) if cfg.is_recurrent(i))
        if self.recurrent:
            self.conv = _untouched_zeros((cfg.n_layer, cfg.ssm_d_conv - 1, cfg.ssm_conv_dim), np.float32)
            self.ssm = _untouched_zeros((cfg.n_layer, cfg.ssm_dt_rank, cfg.ssm_d_state, cfg.ssm_head_v_dim),
                                        np.float32)
        else:
            self.conv, self.ssm = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0, 0), np.float32)
        # position -> the DeltaNet states after it (a recurrent state cannot be rolled back as
        # keys and values can: see rewind), the most recent SNAPSHOTS of them
        self.snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    SNAPSHOTS = 4

    def clear(self) -> None:
        self.n_past = 0
        self.snapshots.clear()
        for il in self.recurrent:
            self.conv[il] = 0.0
            self.ssm[il] = 0.0

    def snapshot(self) -> None:
        """Keep the DeltaNet states at n_past, so that rewind can come back here."""
        if self.recurrent and self.n_past not in self.snapshots:
            if len(self.snapshots) >= self.SNAPSHOTS:
                del self.snapshots[min(self.snapshots)]
            idx = list(self.recurrent)
            self.snapshots[self.n_past] = (self.conv[idx], self.ssm[idx])

    def rewind(self, n: int) -> int:
        """Go back to holding positions 0 .. n-1 (n <= n_past) and return how many it holds:
        n with a KV cache alone; for a hybrid, the latest snapshot at or before n (0, cleared,
        if none), since its recurrent state cannot drop tokens."""
        if not self.recurrent or n == self.n_past:
            self.n_past = min(n, self.n_past)
            return self.n_past
        at = max((p for p in self.snapshots if p <= n), default=0)
        if at == 0:
            self.clear()
            return 0
        conv, ssm = self.snapshots[at]
        for j, il in enumerate(self.recurrent):
            self.conv[il] = conv[j]
            self.ssm[il] = ssm[j]
        for p in [p for p in self.snapshots if p > at]:
            del self.snapshots[p]
        self.n_past = at
        return at


def _untouched_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in private anonymous memory that the kernel maps 4 KiB at a time on first
    touch. Not np.zeros: numpy asks for transparent huge pages on large arrays, and where
    the kernel's THP defrag setting is "madvise" (a common default) a first touch of each
    2 MiB page may wait for memory compaction, a large share of a short prompt's time."""
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
        return cls(cfg.rot_dim, cfg.rope_theta, cfg.arch != "llama", 1.0 / factor, yarn, attn_factor)

    def tables(self, positions: np.ndarray, freq_factors: np.ndarray | None):
        return rope_tables(positions, self.n_rot, self.base, self.freq_scale, freq_factors, self.yarn,
                           self.attn_factor)



def step_pack(w: Weights, cfg: ModelConfig, buf: np.ndarray | None) -> StepPack | None:
    """The blocks' tensors as a kernels.step.StepPack, or None (the token then takes the
    chunk path) unless every matrix is of a block type (matvec.BLOCK_TYPES) lying whole in
    buf (the file's uint8 mapping), and each tensor is in all blocks that can have it or in
    none (a hybrid's DeltaNet and attention blocks differ; see models.Tensor.in_layer)."""
    if buf is None or not w.layers:
        return None
    tensors = family(cfg).TENSORS
    matrices = [t.field for t in tensors if t.is_matrix]
    base, size = buf.__array_interface__["data"][0], buf.nbytes
    at = np.zeros((len(w.layers), len(matrices), 3), np.int64)
    types = np.full((len(w.layers), len(matrices)), NONE_TYPE, np.int64)
    for j, t in enumerate(t for t in tensors if t.is_matrix):
        ms = [getattr(layer, t.field) for layer in w.layers]
        if all(m is None for m in ms):
            continue  # at (0, 0, 0): an empty matrix
        for il, m in enumerate(ms):
            if m is None:
                if t.in_layer(cfg, il):
                    return None
                continue  # the other kind of block's: empty there
            off = m.data.__array_interface__["data"][0] - base
            if (m.ggml_type not in BLOCK_TYPES or not m.data.flags.c_contiguous or off < 0
                    or off + m.data.nbytes > size):
                return None
            at[il, j] = off, m.data.shape[0], m.data.shape[1]
            types[il, j] = m.ggml_type
    vectors = []
    for t in tensors:
        if t.is_matrix:
            continue
        vs = [getattr(layer, t.field) for layer in w.layers]
        held = [v for il, v in enumerate(vs) if t.in_layer(cfg, il)]
        if all(v is None for v in vs):
            vectors.append(np.zeros((len(vs),) + (0,) * len(t.shape), np.float32))
        elif any(v is None for v in held) or len({v.shape for v in held}) != 1:
            return None
        else:  # zeros in the blocks of the other kind, which never read them
            vectors.append(np.stack([np.zeros_like(held[0]) if v is None else v for v in vs]).astype(np.float32))
    return StepPack(buf, at, types, tuple(vectors))


def forward(w: Weights, cfg: ModelConfig, rope: Rope, tokens: np.ndarray, cache: KVCache,
            logits_from: int, gemm: Gemm | None = None, observe: Observer | None = None, gpu=None,
            steps: StepPack | None = None) -> np.ndarray:
    """Run `tokens` (n,) int64 at positions cache.n_past .. +n-1, append their keys and
    values to the cache, and return the logits after tokens logits_from .. n-1 of this call,
    (n - logits_from, n_vocab) (n - 1: the last token's only; n: none, (0, n_vocab); the
    output matrix, the largest, multiplies only those rows). The caller checks the tokens
    are < n_vocab and fit in the cache. gemm: run a long chunk's products through its
    workers (inside gemm.session()). observe(x, names): called with the input x (n, k) of
    every matrix product in the blocks and the names of the matrices that multiply it (what
    llama.cpp's importance matrix collects; not the output matrix's). gpu: a
    runtime.gpu.GpuOffload that runs the blocks from gpu.first_layer on (cache.gpu holds
    their keys and values) and, if it has it, the output matrix. steps: w's StepPack, which
    one token (with no observer) runs through in one Numba call."""
    n = tokens.shape[0]
    start = cache.n_past
    x = np.empty((n, cfg.n_embd), np.float32)
    get_rows(w.token_embd.data, w.token_embd.ggml_type, tokens, x)
    cos, sin = rope.tables(np.arange(start, start + n), w.rope_freqs)
    n_cpu = len(w.layers) if gpu is None else gpu.first_layer
    scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
    model = family(cfg)
    experts = (cfg.n_expert, cfg.n_expert_used, cfg.spec.norm_topk)
    deltanet = (cache.conv, cache.ssm, cfg.ssm_n_group, cfg.ssm_d_state, cfg.ssm_dt_rank, cfg.ssm_head_v_dim,
                cfg.spec.v_tiled)
    c = ChunkContext(cfg.rms_eps, cos, sin, rope.neox, cache.k, cache.v, start, scale, cfg.head_dim, gemm, observe,
                     *experts, *deltanet)
    if n_cpu == 0:
        pass  # every block on the GPU
    elif n == 1 and observe is None and steps is not None:
        stages.decode_step(model).blocks(x, n_cpu, steps, StepContext(cfg.rms_eps, cos, sin, rope.neox, cache.k,
                                                                      cache.v, start, scale, cfg.head_dim, *experts,
                                                                      *deltanet))
    else:
        block = stages.prompt_chunk(model).block
        for il, layer in enumerate(w.layers[:n_cpu]):
            block(x, layer, il, c)
    if gpu is None:
        x = x[min(max(logits_from, 0), n):]
    else:  # rows logits_from.. come back: the logits, or the hidden state for the CPU's output matrix
        x = gpu.forward(x, cache.gpu, start, logits_from)
    cache.n_past = start + n
    if gpu is not None and gpu.with_output:
        return x
    if x.shape[0] == 0:
        return np.empty((0, w.output.rows), np.float32)
    c.observe = None  # the importance matrix leaves out the output matrix
    return products(rms_norm(x, w.output_norm, c), c, w.output)[0]


class Paths:
    """How a model's calls run: Paths.run chooses the path (see the module's docstring)
    for each call. step_compiler: runtime.warmup's child compiling the step's kernels,
    waited for before the first one-token call."""

    def __init__(self, w: Weights, cfg: ModelConfig, rope: Rope, gemm: Gemm, gpu=None,
                 steps: StepPack | None = None, step_compiler=None):
        self.w, self.cfg, self.rope, self.gemm, self.gpu, self.steps = w, cfg, rope, gemm, gpu, steps
        self.step_compiler = step_compiler
        # (marker, file): written once this process has compiled the one-token step's kernels
        self.compiled_marker = None

    def choose(self, n: int, observe: Observer | None) -> str:
        """'tokens', 'step' or 'chunk' for n tokens (the GPU's blocks follow any of them)."""
        # token by token below gemm.step_tokens (measured on the CPU, so not with GPU offload)
        if 1 < n < self.gemm.step_tokens and observe is None and self.gpu is None:
            return "tokens"
        if n == 1 and observe is None and self.steps is not None:
            return "step"
        return "chunk"

    def run(self, tokens: np.ndarray, cache: KVCache, logits_from: int, observe: Observer | None = None):
        """forward() for tokens (n,) int64 through the chosen path."""
        path = self.choose(tokens.size, observe)
        if path == "tokens":
            return np.concatenate([self.run(tokens[i:i + 1], cache, 0 if i >= logits_from else 1)
                                   for i in range(tokens.size)])
        if tokens.size == 1 and self.step_compiler is not None:  # its kernels from the cache, not compiled again
            self.step_compiler.wait()
            self.step_compiler = None
        args = (self.w, self.cfg, self.rope, tokens, cache, logits_from)
        if tokens.size < self.gemm.min_tokens:
            out = forward(*args, observe=observe, gpu=self.gpu, steps=self.steps if path == "step" else None)
            if tokens.size == 1 and self.compiled_marker is not None:
                write_marker(*self.compiled_marker)
                self.compiled_marker = None
            return out
        with self.gemm.session():
            return forward(*args, self.gemm, observe, self.gpu)
