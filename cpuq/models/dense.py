"""Dense decoder-only transformers: qwen2, qwen3 and llama (HF's modeling_qwen2.py,
modeling_qwen3.py, modeling_llama.py). A block is pre-norm attention with grouped KV
heads, then a SwiGLU MLP, each added to the residual stream:

    x = x + attention(rms_norm(x))          q/k/v biases (qwen2), per-head q/k norms (qwen3)
    x = x + mlp(rms_norm(x))

The stages below name their ops without importing them: cpuq.runtime.stages binds this
same code to the one-token decode step's Numba kernels (kernels.step), the prompt chunk's
threaded kernels (runtime.chunk) and the GPU's (runtime.gpu). An op leaves a tensor the
model lacks (an empty or None weight) alone. `c` is the path's context: norm epsilon,
head counts, RoPE tables of the positions, the KV cache.

Conversion quirks: llama's q/k rows are permuted for ggml's non-NEOX RoPE, and its llama3
rope scaling becomes a rope_freqs tensor.

Imports numpy, cpuq.arch and cpuq.models.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np

from ..arch import LLAMA3_ROPE_DEFAULTS, ModelConfig
from . import Tensor

ARCHITECTURES = ("qwen2", "qwen3", "llama")

# A block's tensors, in Layer's field order (GGUF names: llama.cpp's LLM_TENSOR_NAMES;
# HF names: the modeling files' module paths).
TENSORS = (
    Tensor("attn_norm", "attn_norm.weight", "input_layernorm.weight", ("n_embd",)),
    Tensor("wq", "attn_q.weight", "self_attn.q_proj.weight", ("q_dim", "n_embd")),
    Tensor("wk", "attn_k.weight", "self_attn.k_proj.weight", ("kv_dim", "n_embd")),
    Tensor("wv", "attn_v.weight", "self_attn.v_proj.weight", ("kv_dim", "n_embd")),
    Tensor("wo", "attn_output.weight", "self_attn.o_proj.weight", ("n_embd", "q_dim")),
    Tensor("bq", "attn_q.bias", "self_attn.q_proj.bias", ("q_dim",), when="qkv_bias", optional=True),
    Tensor("bk", "attn_k.bias", "self_attn.k_proj.bias", ("kv_dim",), when="qkv_bias", optional=True),
    Tensor("bv", "attn_v.bias", "self_attn.v_proj.bias", ("kv_dim",), when="qkv_bias", optional=True),
    Tensor("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", ("head_dim",), when="qk_norm"),
    Tensor("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", ("head_dim",), when="qk_norm"),
    Tensor("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", ("n_embd",)),
    Tensor("w_gate", "ffn_gate.weight", "mlp.gate_proj.weight", ("n_ff", "n_embd")),
    Tensor("w_up", "ffn_up.weight", "mlp.up_proj.weight", ("n_ff", "n_embd")),
    Tensor("w_down", "ffn_down.weight", "mlp.down_proj.weight", ("n_embd", "n_ff")),
)
Layer = namedtuple("Layer", [t.field for t in TENSORS])


# Outside the blocks (llama.cpp's gguf-py tensor_mapping.py), and what the converter drops.
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def attention(x, L, il, c):
    """Self-attention of x (n, n_embd) at the context's positions -> (n, n_embd)."""
    h = rms_norm(x, L.attn_norm, c)
    q, k, v = linear3(h, L.wq, L.wk, L.wv, c)
    add_bias(q, L.bq, c)
    add_bias(k, L.bk, c)
    add_bias(v, L.bv, c)
    head_norm(q, L.q_norm, c)  # qwen3: RMSNorm over each head before RoPE
    head_norm(k, L.k_norm, c)
    rope(q, c)
    rope(k, c)
    out = attend(q, k, v, il, c)  # k, v go to the cache first
    return linear(out, L.wo, c)


def mlp(x, L, c):
    """SwiGLU MLP: down(silu(gate(h)) * up(h)) -> (n, n_embd)."""
    h = rms_norm(x, L.ffn_norm, c)
    # silu(gate) * up into gate's memory; the (gate, up) pair is a temporary, so up is not
    # held through the down product (a long prompt chunk's largest activation)
    act = swiglu(linear2(h, L.w_gate, L.w_up, c), c)
    return linear(act, L.w_down, c)


def block(x, L, il, c):
    """Block il, in place on x."""
    x += attention(x, L, il, c)
    x += mlp(x, L, c)


STAGES = (attention, mlp, block)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Llama's q/k permutation (llama.cpp's LlamaModel.permute): within each of `n_head` heads, interleave
    the two rope halves, so row h*D + 2*j + i comes from row h*D + i*D/2 + j."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def qk_permute_heads(cfg: ModelConfig, hf_name: str) -> int | None:
    """How many heads to permute `hf_name` by, or None if it is not permuted."""
    if not cfg.spec.permute_qk:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return cfg.n_head_kv
    return None


def llama3_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """The rope_freqs.weight factors LlamaModel emits for rope_type llama3 (generate_extra_tensors)."""
    rope = dict(cfg.rope_scaling or ())
    base, dim = cfg.rope_theta, cfg.head_dim
    v = {k: rope.get(k, d) for k, d in LLAMA3_ROPE_DEFAULTS.items()}  # ModelConfig.from_hf checked them
    factor, low_freq_factor = float(v["factor"]), float(v["low_freq_factor"])
    high_freq_factor = float(v["high_freq_factor"])
    old_context_len = int(v["original_max_position_embeddings"])
    # torch computes all of this in float32 (Python scalars join a float32 tensor as float32);
    # numpy's scalar promotion (NEP 50) does the same with np.float32 values.
    f32 = np.float32
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / f32(dim)))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = f32(2 * np.pi) / freq
        if wavelen < high_freq_wavelen:
            out.append(f32(1.0))
        elif wavelen > low_freq_wavelen:
            out.append(f32(factor))
        else:
            smooth = (f32(old_context_len) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
            out.append(f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=np.float32)
