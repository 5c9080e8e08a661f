"""GPU offload through CuPy: the last N transformer blocks of a model (and, when all of them
are offloaded and one more is asked for, or N is -1, the output norm and matrix, as
llama.cpp's n_gpu_layers) run on a CUDA GPU; the rest stays on the CPU.

Offloaded matrices are uploaded once in their GGML blocks (not expanded); their KV cache
lives on the GPU. A forward pass crosses the CPU/GPU boundary once each way: the hidden
state after the CPU's blocks goes up, the logits (or the hidden state, for the CPU's
output matrix) come down. One token: every matrix product is kernels.cuda's matvec on the
blocks, and the whole step is one recorded CUDA graph, replayed each token (the position is
read from device memory). The blocks are the model file's stages bound to the GPU ops at
the end of this file. A prompt chunk: each matrix is dequantized to fp16 and multiplied
by cuBLAS (fp16 inputs, float32 accumulation and output).

A mixture of experts (cpuq.models.moe): the router runs on the device and leaves each
token's expert ids there, so a one-token step's expert products (kernels.cuda moe_matvec)
read them without a trip to the host and the step stays one recorded graph. A prompt
chunk brings the ids down, groups its tokens by expert and multiplies each expert's
matrices once for its tokens, as any matrix of the chunk. With cpu_moe (llama.cpp's
--cpu-moe) the expert stacks are not uploaded: the experts op sends the normalized hidden
state and the routing down, runs runtime.chunk's experts on the CPU and sends the result
back, so such a model's one-token steps run op by op, not as a recorded graph.

CuPy is optional: `find_gpu()` says why there is no GPU instead of raising, and nothing
here imports cupy at module level.

Imports numpy, cpuq.arch, cpuq.errors, cpuq.models, cpuq.kernels.cuda and
cpuq.runtime.chunk, stages and weights (and cupy, lazily).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..arch import ModelConfig
from ..errors import UnsupportedError
from ..kernels.cuda import (ATTENTION_CHUNK, ATTENTION_WARPS, MATVEC_WARPS, MOE_MAX_EXPERTS, SOURCE, TYPE_QK,
                            TYPE_STRUCTS, template_names)
from ..models import family
from . import chunk, stages
from .weights import Matrix, Weights

MATVEC_MAX_TOKENS = 8  # up to this many tokens, matrix products read the blocks directly; above, fp16 + cuBLAS
_CUDA_R_16F, _CUDA_R_32F = 2, 0


def find_gpu():
    """(cupy, None) when CuPy imports and sees a CUDA device, else (None, why not) as one line."""
    try:
        import cupy
    except ImportError as e:
        return None, f"CuPy is not installed ({e}; pip install 'cpuq[gpu]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver, and other CuPy set-up errors
        return None, f"CuPy {cupy.__version__} found no CUDA device ({str(e).splitlines()[0]})"
    if n < 1:
        return None, f"CuPy {cupy.__version__} found no CUDA device"
    return cupy, None


def describe_gpu() -> dict:
    """What `cpuq info --gpu` prints: CuPy's version, the CUDA versions and each device, or why none."""
    cp, why = find_gpu()
    if cp is None:
        return {"available": False, "reason": why}
    devices = []
    for i in range(cp.cuda.runtime.getDeviceCount()):
        props = cp.cuda.runtime.getDeviceProperties(i)
        with cp.cuda.Device(i):
            free, total = cp.cuda.runtime.memGetInfo()
        devices.append({"index": i, "name": props["name"].decode(), "compute_capability": f"{props['major']}.{props['minor']}",
                        "memory_total": int(total), "memory_free": int(free)})
    return {"available": True, "cupy": cp.__version__, "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cp.cuda.runtime.driverGetVersion(), "devices": devices}


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    import cupy as cp
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=template_names())


def offloaded(cfg: ModelConfig, gpu_layers: int) -> tuple[int, bool]:
    """(first block on the GPU, whether the output matrix is there too) for gpu_layers N:
    the last N blocks; -1 or more than n_layer: all blocks and the output (llama.cpp's rule)."""
    n = cfg.n_layer + 1 if gpu_layers < 0 else gpu_layers
    return max(cfg.n_layer - n, 0), n > cfg.n_layer


def splits(n_ctx: int) -> int:
    """Key splits of attention in one-token steps: every ATTENTION_CHUNK positions of the
    cache (a recorded step must cover the whole cache; splits past the keys return at once)."""
    return -(-n_ctx // ATTENTION_CHUNK)


@dataclass
class _Matrix:
    data: object      # cupy uint8 (rows, row_bytes); a stack: (n_expert * rows, row_bytes)
    struct: str
    rows: int
    cols: int
    n_expert: int = 0

    def expert(self, e: int) -> "_Matrix":
        """Expert e's matrix of a stack (a view)."""
        return _Matrix(self.data[e * self.rows:(e + 1) * self.rows], self.struct, self.rows, self.cols)


class _Buffers:
    """Activations of an n-token pass (fixed addresses: the decode graph records them)."""

    def __init__(self, cp, cfg: ModelConfig, n: int, n_out: int, n_split: int = 1):
        f32 = cp.float32
        q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        self.x = cp.empty((n, cfg.n_embd), f32)
        self.h = cp.empty((n, cfg.n_embd), f32)
        self.q = cp.empty((n, q_rows), f32)
        self.k = cp.empty((n, kv_rows), f32)
        self.v = cp.empty((n, kv_rows), f32)
        self.att = cp.empty((n, q_rows), f32)
        # linear2's (gate, up) outputs by width: the dense MLP's, or an MoE's shared expert's
        widths = {cfg.n_ff_shexp} if cfg.spec.shared_expert else set() if cfg.spec.moe else {cfg.n_ff}
        self.ffn = {w: (cp.empty((n, w), f32), cp.empty((n, w), f32)) for w in widths}
        if cfg.spec.moe:
            k = cfg.n_expert_used
            self.ids = cp.empty((n, k), cp.int32)            # the router's picks, most probable first
            self.weights = cp.empty((n, k), f32)
            if n <= MATVEC_MAX_TOKENS:  # per (token, pick): GpuOffload.experts' products
                self.exp_gate = cp.empty((n * k, cfg.n_ff_exp), f32)
                self.exp_up = cp.empty((n * k, cfg.n_ff_exp), f32)
            self.exp_out = cp.empty((n * k, cfg.n_embd), f32)
            self.moe_out = cp.empty((n, cfg.n_embd), f32)
            self.shared = cp.empty((n, cfg.n_embd), f32) if cfg.spec.shared_expert else None
        self.logits = cp.empty((n_out, cfg.n_vocab), f32) if n_out else None
        self.n_split = n_split  # attention's key splits (see kernels.cuda attention)
        self.part = cp.empty((n, cfg.n_head, n_split, cfg.head_dim + 2), f32) if n_split > 1 else None


class GpuCache:
    """The offloaded blocks' keys and values, (n_gpu_layers, n_head_kv, n_ctx, head_dim) each,
    the RoPE tables for positions 0 .. n_ctx-1, the position of the next token as a device
    int, and the recorded one-token step (made on first use)."""

    def __init__(self, cp, cfg: ModelConfig, n_layers: int, n_ctx: int, kv_dtype, cos, sin, with_output: bool):
        shape = (n_layers, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = cp.zeros(shape, kv_dtype)
        self.v = cp.zeros(shape, kv_dtype)
        self.cos = cp.asarray(cos)
        self.sin = cp.asarray(sin)
        self.n_past = cp.zeros(1, cp.int32)
        self.n_ctx = n_ctx
        self.step = _Buffers(cp, cfg, 1, 1 if with_output else 0, splits(n_ctx))
        self.graph = None


class GpuOffload:
    """The offloaded part of one model on one device. forward() runs it for a chunk."""

    def __init__(self, weights: Weights, cfg: ModelConfig, rope, gpu_layers: int, kv_type: str, device_id: int = 0,
                 cpu_moe: bool = False):
        """cpu_moe: an MoE's expert stacks stay in the file's mapping and run on the CPU
        (the router, attention and the shared expert on the GPU)."""
        cp, why = find_gpu()
        if cp is None:
            raise UnsupportedError(why)
        self.cp = cp
        self.cfg = cfg
        self.rope = rope
        self.rope_freqs = weights.rope_freqs
        self.model = family(cfg)
        self.block = stages.bind(self.model, OPS, "gpu").block
        self.first_layer, self.with_output = offloaded(cfg, gpu_layers)
        self.n_layers = cfg.n_layer - self.first_layer
        if cfg.head_dim > 256:
            raise UnsupportedError(f"GPU offload needs a head_dim of at most 256, not {cfg.head_dim}")
        if cfg.spec.hybrid:
            raise UnsupportedError(f"GPU offload of {cfg.arch}'s Gated DeltaNet blocks is not implemented yet")
        if cfg.n_expert > MOE_MAX_EXPERTS:
            raise UnsupportedError(f"GPU offload needs at most {MOE_MAX_EXPERTS} experts, not {cfg.n_expert}")
        self.cpu_moe = cpu_moe and cfg.spec.moe
        # cpu_moe's experts run runtime.chunk's op, which reads only these fields (no gemm:
        # the calling thread's kernels)
        self.cpu_context = chunk.ChunkContext(cfg.rms_eps, None, None, rope.neox, None, None, 0, np.float32(1.0),
                                              cfg.head_dim, n_expert=cfg.n_expert, n_used=cfg.n_expert_used,
                                              norm_topk=cfg.spec.norm_topk) if self.cpu_moe else None
        self.device = cp.cuda.Device(device_id)
        self.kv_type = kv_type
        self.kv_name = {"f16": "__half", "f32": "float"}[kv_type]
        with self.device:
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.module = _module(device_id)
            self._fns: dict[str, object] = {}
            self.layers = [self._layer(layer) for layer in weights.layers[self.first_layer:]]
            self.output_norm = self._vector(weights.output_norm) if self.with_output else None
            self.output = self._matrix(weights.output) if self.with_output else None
            self.name = cp.cuda.runtime.getDeviceProperties(device_id)["name"].decode()

    # upload -----------------------------------------------------------------------------
    def _matrix(self, m: Matrix) -> _Matrix:
        struct = TYPE_STRUCTS.get(m.ggml_type)
        if struct is None or m.cols % TYPE_QK[m.ggml_type] or m.cols % 32:
            raise UnsupportedError(f"tensor '{m.name}' (GGML type {m.ggml_type}, {m.cols} columns) cannot run on the GPU")
        return _Matrix(self.cp.asarray(np.ascontiguousarray(m.data)), struct, m.rows, m.cols, m.n_expert)

    def _vector(self, v):
        return None if v is None else self.cp.asarray(np.ascontiguousarray(v, np.float32))

    def _layer(self, layer):
        """A block's tensors on the device, as the model file's Layer (with cpu_moe, the
        expert stacks stay the CPU's Matrix)."""
        def upload(t, a):
            if a is None or (self.cpu_moe and t.is_experts):
                return a
            return self._matrix(a) if t.is_matrix else self._vector(a)
        return type(layer)(*(upload(t, a) for t, a in zip(self.model.TENSORS, layer)))

    def new_cache(self, n_ctx: int) -> GpuCache:
        cos, sin = self.rope.tables(np.arange(n_ctx), self.rope_freqs)
        with self.device:
            return GpuCache(self.cp, self.cfg, self.n_layers, n_ctx,
                            self.cp.float16 if self.kv_type == "f16" else self.cp.float32, cos, sin, self.with_output)

    # kernels ----------------------------------------------------------------------------
    def _fn(self, name: str):
        f = self._fns.get(name)
        if f is None:
            f = self._fns[name] = self.module.get_function(name)
        return f

    def _linear(self, w: _Matrix, x, out, add: bool = False) -> None:
        """out (n, rows) (+)= x (n, cols) @ W.T."""
        cp = self.cp
        n = x.shape[0]
        if n <= MATVEC_MAX_TOKENS:
            f = self._fn(f"matvec<{w.struct}, {'true' if add else 'false'}>")
            f((-(-w.rows // MATVEC_WARPS), n), (32 * MATVEC_WARPS,),
              (w.data, np.int32(w.rows), np.int32(w.cols), x, np.int32(x.shape[1]), out, np.int32(out.shape[1])))
            return
        w16 = cp.empty((w.rows, w.cols), cp.float16)
        parts = w.rows * (w.cols // 32)
        self._fn(f"dequant<{w.struct}, __half>")((-(-parts // 256),), (256,),
                                                 (w.data, np.int64(w.rows), np.int32(w.cols), w16))
        x16 = cp.empty(x.shape, cp.float16)
        self._fn("to_half")((-(-x.size // 256),), (256,), (x, x16, np.int64(x.size)))
        self._gemm(w16, x16, out, w.rows, n, w.cols, 1.0 if add else 0.0)

    def _gemm(self, w16, x16, out, rows: int, n: int, cols: int, beta: float) -> None:
        """out (n, rows) f32 = x16 (n, cols) @ w16 (rows, cols).T + beta * out; cuBLAS is
        column-major, so this is out.T = w16.T(op T) @ x16.T."""
        from cupy.cuda import cublas
        handle = self.cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.stream.ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        alpha_h, beta_h = np.array(1.0, np.float32), np.array(beta, np.float32)
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, rows, n, cols,
                      alpha_h.ctypes.data, w16.data.ptr, _CUDA_R_16F, cols, x16.data.ptr, _CUDA_R_16F, cols,
                      beta_h.ctypes.data, out.data.ptr, _CUDA_R_32F, out.shape[1],
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)

    def _swiglu(self, gate, up) -> None:
        """gate = silu(gate) * up, in place."""
        self._fn("swiglu")((-(-gate.size // 256),), (256,), (gate, up, np.int64(gate.size)))

    def experts(self, h, ids, weights, gate, up, down, b: _Buffers) -> None:
        """b.moe_out (n, n_embd) = the weighted sum of each token's selected experts (ids,
        weights (n, k) on the device) applied to h (n, n_embd): on the host with cpu_moe
        (gate, up, down are then the CPU's Matrix stacks); up to MATVEC_MAX_TOKENS tokens,
        one product per (token, pick) that reads the ids on the device (the recorded step);
        more, tokens grouped by expert, each expert's matrices multiplied once for them."""
        n, k = ids.shape
        if isinstance(gate, Matrix):
            out = chunk.experts(h.get(), ids.get().astype(np.int64), weights.get(), gate, up, down, self.cpu_context)
            b.moe_out.set(out)
            return
        if n <= MATVEC_MAX_TOKENS:
            self._expert_products(gate, ids, h, k, b.exp_gate)
            self._expert_products(up, ids, h, k, b.exp_up)
            self._swiglu(b.exp_gate, b.exp_up)
            self._expert_products(down, ids, b.exp_gate, 1, b.exp_out)
        else:
            self._experts_grouped(h, ids, gate, up, down, b.exp_out)
        d = b.moe_out.shape[1]
        self._fn("moe_weighted_sum")((-(-d // 256), n), (256,), (b.exp_out, weights, np.int32(k), np.int32(d),
                                                                  b.moe_out))

    def _expert_products(self, w: _Matrix, ids, x, x_div: int, out) -> None:
        """out[s] = expert ids[s]'s matrix of the stack w times x[s // x_div], for each of the
        n * k (token, pick) slots s."""
        self._fn(f"moe_matvec<{w.struct}>")(
            (-(-w.rows // MATVEC_WARPS), ids.size), (32 * MATVEC_WARPS,),
            (w.data, np.int32(w.rows), np.int32(w.cols), np.int32(w.n_expert), ids, x, np.int32(x_div),
             np.int32(x.shape[1]), out, np.int32(out.shape[1])))

    def _experts_grouped(self, h, ids, gate: _Matrix, up: _Matrix, down: _Matrix, out) -> None:
        """out (n * k, n_embd): row token * k + pick = that pick's expert applied to the token's h."""
        cp = self.cp
        k = ids.shape[1]
        # waits for the router: the groups' sizes decide the launches
        order, groups = chunk.expert_groups(ids.get(), gate.n_expert)
        slots = cp.asarray(order)
        for e, lo, hi in groups:
            picked = slots[lo:hi]
            x = h[picked // k]
            g = cp.empty((x.shape[0], gate.rows), cp.float32)
            u = cp.empty_like(g)
            self._linear(gate.expert(e), x, g)
            self._linear(up.expert(e), x, u)
            self._swiglu(g, u)
            y = cp.empty((x.shape[0], down.rows), cp.float32)
            self._linear(down.expert(e), g, y)
            out[picked] = y

    def _norm(self, x, weight, out) -> None:
        self._fn("rms_norm")((x.shape[0],), (256,), (x, weight, np.float32(self.cfg.rms_eps), np.int32(x.shape[1]), out))

    # the pass ---------------------------------------------------------------------------
    def _blocks(self, b: _Buffers, cache: GpuCache, n: int) -> None:
        c = _Context(self, b, cache)
        x = _Residual(self, b.x)
        for il, layer in enumerate(self.layers):
            self.block(x, layer, il, c)

    def _tail(self, b: _Buffers, logits_from: int) -> None:
        """The output norm and matrix for rows logits_from.. of b.x into b.logits."""
        x = b.x[logits_from:]
        h = b.h[logits_from:]
        self._norm(x, self.output_norm, h)
        self._linear(self.output, h, b.logits)

    def forward(self, x: np.ndarray, cache: GpuCache, start: int, logits_from: int) -> np.ndarray:
        """x (n, n_embd) f32: the hidden state after the CPU's blocks, for positions start ..
        start+n-1. Runs the offloaded blocks (appending to `cache`) and returns, for rows
        logits_from .. n-1, the logits (n - logits_from, n_vocab) when the output is
        offloaded, else the hidden state (n - logits_from, n_embd) for the CPU's output."""
        cp = self.cp
        n = x.shape[0]
        logits_from = min(max(logits_from, 0), n)
        n_out = n - logits_from
        with self.device, self.stream:
            cache.n_past.set(np.array([start], np.int32))
            if n == 1 and n_out == 1:
                b = cache.step
                b.x.set(np.ascontiguousarray(x, np.float32))
                if self.cpu_moe:  # the host's experts: not recordable
                    self._pass(b, cache, 1, 0)
                else:
                    if cache.graph is None:
                        self.stream.begin_capture()
                        try:
                            self._pass(b, cache, 1, 0)
                        finally:
                            graph = self.stream.end_capture()
                        cache.graph = graph
                    cache.graph.launch(self.stream)
            else:
                b = _Buffers(cp, self.cfg, n, n_out if self.with_output else 0,
                             splits(cache.n_ctx) if n <= MATVEC_MAX_TOKENS else 1)
                b.x.set(np.ascontiguousarray(x, np.float32))
                self._pass(b, cache, n, logits_from)
            if self.with_output:  # no logits rows asked for: no buffer was made for them
                out = b.logits.get() if n_out else np.empty((0, self.cfg.n_vocab), np.float32)
            else:
                out = b.x[logits_from:].get()
        return out

    def _pass(self, b: _Buffers, cache: GpuCache, n: int, logits_from: int) -> None:
        self._blocks(b, cache, n)
        if self.with_output and n - logits_from > 0:
            self._tail(b, logits_from)


# The ops the model file's stages name (runtime.stages binds them), on the GPU: they write
# the fixed buffers of c.b (a recorded one-token graph replays their addresses), and the
# kernels are the fused ones: biases, q/k norms and RoPE are gathered until attend runs
# them with the KV store in one kernel (qkv_post), and a product added to the residual
# stream (x += linear(...)) accumulates into it in the same kernel.

class _Context:
    def __init__(self, gpu: GpuOffload, b: _Buffers, cache: GpuCache):
        self.gpu, self.b, self.cache = gpu, b, cache
        self.pending: dict[tuple[str, str], object] = {}  # ("bias" | "norm", "q" | "k" | "v") -> device vector

    def which(self, t) -> str:
        return "q" if t is self.b.q else "k" if t is self.b.k else "v"


class _Residual:
    """The residual stream x (n, n_embd) on the device; x += linear(...) adds the product in
    place, x += a computed (n, n_embd) device array (an MoE's output) adds it."""

    def __init__(self, gpu: GpuOffload, x):
        self.gpu, self.x = gpu, x

    def __iadd__(self, y) -> "_Residual":
        if isinstance(y, _Product):
            y.gpu._linear(y.w, y.h, self.x, add=True)
        else:
            self.gpu._fn("add_to")((-(-self.x.size // 256),), (256,), (self.x, y, np.int64(self.x.size)))
        return self


class _Product:
    """h @ W.T, not yet run: run by _Residual's +=, the only use the stages make of it."""

    def __init__(self, gpu: GpuOffload, w: _Matrix, h):
        self.gpu, self.w, self.h = gpu, w, h


def _rms_norm(x, weight, c):
    c.gpu._norm(x.x if isinstance(x, _Residual) else x, weight, c.b.h)
    return c.b.h


def _linear3(h, a, b, d, c):
    for w, out in ((a, c.b.q), (b, c.b.k), (d, c.b.v)):
        c.gpu._linear(w, h, out)
    return c.b.q, c.b.k, c.b.v


def _linear2(h, a, b, c):
    gate, up = c.b.ffn[a.rows]
    c.gpu._linear(a, h, gate)
    c.gpu._linear(b, h, up)
    return gate, up


def _linear(h, a, c):
    return _Product(c.gpu, a, h)


def _add_bias(t, bias, c):
    if bias is not None:
        c.pending["bias", c.which(t)] = bias


def _head_norm(t, weight, c):
    if weight is not None:
        c.pending["norm", c.which(t)] = weight


def _rope(t, c):
    pass  # qkv_post applies RoPE to q and k always


def _attend(q, k, v, il, c):
    gpu, cfg, b, cache = c.gpu, c.gpu.cfg, c.b, c.cache
    n, hd = b.x.shape[0], cfg.head_dim
    null = np.uint64(0)
    p, c.pending = c.pending, {}
    k_cache, v_cache = cache.k[il], cache.v[il]
    gpu._fn(f"qkv_post<{gpu.kv_name}>")(
        (cfg.n_head + cfg.n_head_kv, n), (-(-hd // 32) * 32,),
        (b.q, b.k, b.v, p.get(("bias", "q"), null), p.get(("bias", "k"), null), p.get(("bias", "v"), null),
         p.get(("norm", "q"), null), p.get(("norm", "k"), null), np.float32(cfg.rms_eps), cache.cos, cache.sin,
         np.int32(2 * cache.cos.shape[1]), np.int32(gpu.rope.neox), cache.n_past, np.int32(cfg.n_head),
         np.int32(cfg.n_head_kv), np.int32(hd), np.int32(cache.n_ctx), k_cache, v_cache))
    gpu._fn(f"attention<{gpu.kv_name}, {ATTENTION_WARPS}>")(
        (cfg.n_head, n, b.n_split), (32 * ATTENTION_WARPS,),
        (b.q, k_cache, v_cache, cache.n_past, np.int32(cfg.n_head), np.int32(cfg.n_head_kv), np.int32(hd),
         np.int32(cache.n_ctx), np.float32(1.0 / math.sqrt(hd)), np.int32(ATTENTION_CHUNK if b.n_split > 1 else cache.n_ctx),
         b.att, b.part if b.part is not None else null))
    if b.n_split > 1:
        gpu._fn("attention_combine")((cfg.n_head, n), (-(-hd // 32) * 32,),
                                     (b.part, np.int32(b.n_split), np.int32(cfg.n_head), np.int32(hd), b.att))
    return b.att


def _swiglu(gate_up, c):
    gate, up = gate_up
    c.gpu._swiglu(gate, up)
    return gate


def _route(h, w, c):
    cfg, b = c.gpu.cfg, c.b
    c.gpu._fn("moe_route")((h.shape[0],), (256,), (h, w, np.int32(cfg.n_expert), np.int32(cfg.n_embd),
                                                   np.int32(cfg.n_expert_used), np.int32(cfg.spec.norm_topk),
                                                   b.ids, b.weights))
    return b.ids, b.weights


def _experts(h, ids, weights, gate, up, down, c):
    """Into c.b.moe_out (see GpuOffload.experts)."""
    c.gpu.experts(h, ids, weights, gate, up, down, c.b)
    return c.b.moe_out


def _present(a):
    return a is not None


def _add_gated(out, shared, h, g, c):
    """out += sigmoid(h . g) * shared, shared the shared expert's down product (a _Product)."""
    c.gpu._linear(shared.w, shared.h, c.b.shared)
    c.gpu._fn("moe_add_gated")((out.shape[0],), (256,), (out, c.b.shared, h, g, np.int32(out.shape[1])))


OPS = dict(rms_norm=_rms_norm, linear3=_linear3, linear2=_linear2, linear=_linear, add_bias=_add_bias,
           head_norm=_head_norm, rope=_rope, attend=_attend, swiglu=_swiglu, route=_route, experts=_experts,
           present=_present, add_gated=_add_gated)
