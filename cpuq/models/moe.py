"""Mixture-of-experts transformers: qwen3moe and qwen2moe (HF's modeling_qwen3_moe.py,
modeling_qwen2_moe.py). Attention is the dense models' (q/k/v biases for qwen2moe, per-head
q/k norms for qwen3moe); the MLP is routed experts:

    p = softmax(router(h))                     h = rms_norm(x), one row per token
    top-k experts by p, weights p[top-k]       renormalized to sum 1 for qwen3moe only
    y = sum over the k of weight * down_e(silu(gate_e(h)) * up_e(h))
    y += sigmoid(h . g) * shared_expert(h)     qwen2moe: a SwiGLU MLP every token takes
    x = x + y

These are llama.cpp's semantics (build_moe_ffn; src/models/qwen{2,3}moe.cpp): qwen3moe
always renormalizes and qwen2moe never, whatever config.json's norm_topk_prob says.

An expert stack (ffn_{gate,up,down}_exps) is one GGUF tensor of shape (n_expert, rows,
cols); a checkpoint holds it either as one matrix per expert (mlp.experts.{e}.*_proj) or
fused (mlp.experts.gate_up_proj holding gate then up, mlp.experts.down_proj), which
FUSED_EXPERTS describes for the converter.

Imports numpy, cpuq.models and the attention stage of cpuq.models.dense.
"""
from __future__ import annotations

from collections import namedtuple

from . import Tensor
from .dense import GLOBAL_TENSORS, IGNORED_SUFFIXES, TENSORS as DENSE_TENSORS, attention  # noqa: F401

ARCHITECTURES = ("qwen3moe", "qwen2moe")

_ATTENTION = tuple(t for t in DENSE_TENSORS if not t.gguf.startswith("ffn_"))

# GGUF names: llama.cpp's LLM_TENSOR_NAMES; HF names: the modeling files' module paths.
TENSORS = _ATTENTION + (
    Tensor("ffn_norm", "ffn_norm.weight", "post_attention_layernorm.weight", ("n_embd",)),
    Tensor("gate_inp", "ffn_gate_inp.weight", "mlp.gate.weight", ("n_expert", "n_embd"), float32=True),
    Tensor("gate_exps", "ffn_gate_exps.weight", "mlp.experts.{e}.gate_proj.weight", ("n_expert", "n_ff_exp", "n_embd")),
    Tensor("up_exps", "ffn_up_exps.weight", "mlp.experts.{e}.up_proj.weight", ("n_expert", "n_ff_exp", "n_embd")),
    Tensor("down_exps", "ffn_down_exps.weight", "mlp.experts.{e}.down_proj.weight", ("n_expert", "n_embd", "n_ff_exp")),
    # qwen2moe's shared expert and its gate (HF's (1, n_embd) Linear, a vector in the file)
    Tensor("gate_inp_shexp", "ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight", ("n_embd",),
           when="shared_expert", hf_shape=("1", "n_embd")),
    Tensor("gate_shexp", "ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight", ("n_ff_shexp", "n_embd"),
           when="shared_expert"),
    Tensor("up_shexp", "ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight", ("n_ff_shexp", "n_embd"),
           when="shared_expert"),
    Tensor("down_shexp", "ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight", ("n_embd", "n_ff_shexp"),
           when="shared_expert"),
)
Layer = namedtuple("Layer", [t.field for t in TENSORS])

# Checkpoints that store each stack whole (transformers' in-memory layout): HF module ->
# (field, first row, row count as a dim name) per stack it holds, rows of one expert's slice.
FUSED_EXPERTS = {
    "mlp.experts.gate_up_proj": (("gate_exps", "0", "n_ff_exp"), ("up_exps", "n_ff_exp", "n_ff_exp")),
    "mlp.experts.down_proj": (("down_exps", "0", "n_embd"),),
}


def mlp(x, L, c):
    """Routed experts, plus qwen2moe's gated shared expert -> (n, n_embd)."""
    h = rms_norm(x, L.ffn_norm, c)
    ids, weights = route(h, L.gate_inp, c)
    out = experts(h, ids, weights, L.gate_exps, L.up_exps, L.down_exps, c)
    if present(L.gate_shexp):
        shared = linear(swiglu(linear2(h, L.gate_shexp, L.up_shexp, c), c), L.down_shexp, c)
        add_gated(out, shared, h, L.gate_inp_shexp, c)  # out += sigmoid(h . g) * shared
    return out


def block(x, L, il, c):
    """Block il, in place on x."""
    x += attention(x, L, il, c)
    x += mlp(x, L, c)


STAGES = (attention, mlp, block)
