"""Hybrid Gated-DeltaNet transformers: qwen35, qwen35moe and qwen3next (HF's
modeling_qwen3_5.py, modeling_qwen3_5_moe.py, modeling_qwen3_next.py). Most blocks are
Gated DeltaNet (linear attention with a fixed-size recurrent state), every few a gated
full attention (ModelConfig.recurrent says which); then a SwiGLU MLP (qwen35) or routed
experts with a gated shared expert (qwen35moe, qwen3next):

    DeltaNet block                                  full-attention block
    h = rms_norm(x)                                 h = rms_norm(x)
    qkv, z, beta, alpha = projections of h          q|gate, k, v = projections of h
    qkv = silu(causal_conv1d(qkv))   (conv state)   q, k = head norms, partial rope (n_rot)
    q, k = l2_norm(q), l2_norm(k)                   o = attention(q, k, v)  (KV cache)
    g = A * softplus(alpha + dt)     (A < 0)        o = o * sigmoid(gate)
    S = exp(g) S + k (beta (v - S^T k))^T           x = x + o_proj(o)
    o = S^T q / sqrt(d_k)            (state S)
    x = x + out_proj(rms_norm(o) * w * silu(z))
    then x = x + ffn(rms_norm(x))                   (post_attention_norm)

These are llama.cpp's semantics (src/models/qwen35.cpp, qwen35moe.cpp, qwen3next.cpp) and
HF's, which agree. The norms other than the DeltaNet's output norm are stored +1 (HF
computes x * (1 + w)); the rope sections are mrope's, which text positions make plain
NEOX rope over the first n_rot dimensions. The prediction (nextn) blocks after the trunk
are converted but not run.

Imports cpuq.models.
"""
from __future__ import annotations

from collections import namedtuple

from . import Tensor

ARCHITECTURES = ("qwen35", "qwen35moe", "qwen3next")

# GGUF names: llama.cpp's LLM_TENSOR_NAMES; HF names: the modeling files' module paths.
TENSORS = (
    Tensor("attn_norm", "attn_norm.weight", "input_layernorm.weight", ("n_embd",)),
    # gated full attention: q_proj yields each head's query then its output gate
    Tensor("wq", "attn_q.weight", "self_attn.q_proj.weight", ("q_gate_dim", "n_embd"), layer="attention"),
    Tensor("wk", "attn_k.weight", "self_attn.k_proj.weight", ("kv_dim", "n_embd"), layer="attention"),
    Tensor("wv", "attn_v.weight", "self_attn.v_proj.weight", ("kv_dim", "n_embd"), layer="attention"),
    Tensor("wo", "attn_output.weight", "self_attn.o_proj.weight", ("n_embd", "q_dim"), layer="attention"),
    Tensor("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", ("head_dim",), layer="attention"),
    Tensor("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", ("head_dim",), layer="attention"),
    # Gated DeltaNet
    Tensor("wqkv", "attn_qkv.weight", "linear_attn.in_proj_qkv.weight", ("ssm_conv_dim", "n_embd"),
           layer="linear", hf_unless="fused_inputs"),
    Tensor("wgate", "attn_gate.weight", "linear_attn.in_proj_z.weight", ("ssm_d_inner", "n_embd"),
           layer="linear", hf_unless="fused_inputs"),
    Tensor("ssm_beta", "ssm_beta.weight", "linear_attn.in_proj_b.weight", ("ssm_dt_rank", "n_embd"),
           when="split_inputs", layer="linear"),
    Tensor("ssm_alpha", "ssm_alpha.weight", "linear_attn.in_proj_a.weight", ("ssm_dt_rank", "n_embd"),
           when="split_inputs", layer="linear"),
    Tensor("ssm_ba", "ssm_ba.weight", "linear_attn.in_proj_ba.weight", ("ssm_ba_dim", "n_embd"),
           when="fused_inputs", layer="linear"),
    Tensor("ssm_conv1d", "ssm_conv1d.weight", "linear_attn.conv1d.weight", ("ssm_conv_dim", "ssm_d_conv"),
           layer="linear", float32=True, hf_shape=("ssm_conv_dim", "1", "ssm_d_conv")),
    Tensor("ssm_dt", "ssm_dt.bias", "linear_attn.dt_bias", ("ssm_dt_rank",), layer="linear"),
    Tensor("ssm_a", "ssm_a", "linear_attn.A_log", ("ssm_dt_rank",), layer="linear"),
    Tensor("ssm_norm", "ssm_norm.weight", "linear_attn.norm.weight", ("ssm_head_v_dim",), layer="linear"),
    Tensor("ssm_out", "ssm_out.weight", "linear_attn.out_proj.weight", ("n_embd", "ssm_d_inner"), layer="linear"),
    # the MLP: dense (qwen35), or routed experts and a gated shared expert
    Tensor("ffn_norm", "post_attention_norm.weight", "post_attention_layernorm.weight", ("n_embd",)),
    Tensor("w_gate", "ffn_gate.weight", "mlp.gate_proj.weight", ("n_ff", "n_embd"), when="dense_ffn"),
    Tensor("w_up", "ffn_up.weight", "mlp.up_proj.weight", ("n_ff", "n_embd"), when="dense_ffn"),
    Tensor("w_down", "ffn_down.weight", "mlp.down_proj.weight", ("n_embd", "n_ff"), when="dense_ffn"),
    Tensor("gate_inp", "ffn_gate_inp.weight", "mlp.gate.weight", ("n_expert", "n_embd"), when="moe", float32=True),
    Tensor("gate_exps", "ffn_gate_exps.weight", "mlp.experts.{e}.gate_proj.weight", ("n_expert", "n_ff_exp", "n_embd"),
           when="moe"),
    Tensor("up_exps", "ffn_up_exps.weight", "mlp.experts.{e}.up_proj.weight", ("n_expert", "n_ff_exp", "n_embd"),
           when="moe"),
    Tensor("down_exps", "ffn_down_exps.weight", "mlp.experts.{e}.down_proj.weight", ("n_expert", "n_embd", "n_ff_exp"),
           when="moe"),
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

# Outside the blocks, and what the converter drops.
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Checkpoints that store the experts' stacks whole (as models.moe.FUSED_EXPERTS).
FUSED_EXPERTS = {
    "mlp.experts.gate_up_proj": (("gate_exps", "0", "n_ff_exp"), ("up_exps", "n_ff_exp", "n_ff_exp")),
    "mlp.experts.down_proj": (("down_exps", "0", "n_embd"),),
}


def deltanet(x, L, il, c):
    """Gated DeltaNet of x (n, n_embd), continuing block il's conv and recurrent states."""
    h = rms_norm(x, L.attn_norm, c)
    if present(L.ssm_ba):  # qwen3next: beta and alpha in one matrix, grouped by key head
        qkv, z, ba = linear3(h, L.wqkv, L.wgate, L.ssm_ba, c)
        beta, alpha = split_ba(ba, c)
    else:
        qkv, z, beta = linear3(h, L.wqkv, L.wgate, L.ssm_beta, c)
        alpha = linear(h, L.ssm_alpha, c)
    qkv = conv(qkv, L.ssm_conv1d, il, c)  # causal depthwise conv + silu
    out = delta_rule(qkv, alpha, beta, L.ssm_dt, L.ssm_a, il, c)  # (n, d_inner)
    gated_norm(out, L.ssm_norm, z, c)  # rms_norm(out) * w * silu(z), per value head
    return linear(out, L.ssm_out, c)


def gated_attention(x, L, il, c):
    """Full attention with per-head q/k norms, partial rope and a sigmoid output gate."""
    h = rms_norm(x, L.attn_norm, c)
    qg, k, v = linear3(h, L.wq, L.wk, L.wv, c)
    q, gate = split_heads(qg, c)  # each head's [query | gate] -> queries, gates
    head_norm(q, L.q_norm, c)
    head_norm(k, L.k_norm, c)
    rope(q, c)  # over the first n_rot dimensions of each head (the tables' width)
    rope(k, c)
    out = attend(q, k, v, il, c)
    mul_sigmoid(out, gate, c)
    return linear(out, L.wo, c)


def ffn(x, L, c):
    """SwiGLU MLP (qwen35) or routed experts plus the gated shared expert -> (n, n_embd)."""
    h = rms_norm(x, L.ffn_norm, c)
    if present(L.w_gate):
        return linear(swiglu(linear2(h, L.w_gate, L.w_up, c), c), L.w_down, c)
    ids, weights = route(h, L.gate_inp, c)
    out = experts(h, ids, weights, L.gate_exps, L.up_exps, L.down_exps, c)
    shared = linear(swiglu(linear2(h, L.gate_shexp, L.up_shexp, c), c), L.down_shexp, c)
    add_gated(out, shared, h, L.gate_inp_shexp, c)  # out += sigmoid(h . g) * shared
    return out


def block(x, L, il, c):
    """Block il, in place on x."""
    if present(L.ssm_out):
        x += deltanet(x, L, il, c)
    else:
        x += gated_attention(x, L, il, c)
    x += ffn(x, L, c)


STAGES = (deltanet, gated_attention, ffn, block)
