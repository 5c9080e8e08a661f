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

Imports cpuq.models only.
"""
from __future__ import annotations

from collections import namedtuple

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
    Tensor("bq", "attn_q.bias", "self_attn.q_proj.bias", ("q_dim",), optional=True),
    Tensor("bk", "attn_k.bias", "self_attn.k_proj.bias", ("kv_dim",), optional=True),
    Tensor("bv", "attn_v.bias", "self_attn.v_proj.bias", ("kv_dim",), optional=True),
    Tensor("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", ("head_dim",), when="qk_norm"),
    Tensor("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", ("head_dim",), when="qk_norm"),
    Tensor("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", ("n_embd",)),
    Tensor("w_gate", "ffn_gate.weight", "mlp.gate_proj.weight", ("n_ff", "n_embd")),
    Tensor("w_up", "ffn_up.weight", "mlp.up_proj.weight", ("n_ff", "n_embd")),
    Tensor("w_down", "ffn_down.weight", "mlp.down_proj.weight", ("n_embd", "n_ff")),
)
Layer = namedtuple("Layer", [t.field for t in TENSORS])


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
    # swiglu(gate, up) into gate's memory; up, unnamed, is not held through the down product
    # (a long prompt chunk's largest activation)
    gate = swiglu(*linear2(h, L.w_gate, L.w_up, c), c)
    return linear(gate, L.w_down, c)


def block(x, L, il, c):
    """Block il, in place on x."""
    x += attention(x, L, il, c)
    x += mlp(x, L, c)


STAGES = (attention, mlp, block)
