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

Imports numpy, cpuq.models, its moe file (the experts' rows) and torch_exp (a conversion quirk's).
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import replace

import numpy as np

from . import Tensor, moe as _MOE, torch_exp

_MOE_FIELDS = ("gate_inp", "gate_exps", "up_exps", "down_exps", "gate_inp_shexp", "gate_shexp", "up_shexp",
               "down_shexp")

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
    # routed experts and the gated shared expert: moe.py's rows, required for the MoE hybrids
    *(replace(t, when=t.when or "moe") for t in _MOE.TENSORS if t.field in _MOE_FIELDS),
)
Layer = namedtuple("Layer", [t.field for t in TENSORS])

# Outside the blocks, and what the converter drops.
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# Checkpoints that store the experts' stacks whole: as moe.py's.
FUSED_EXPERTS = _MOE.FUSED_EXPERTS


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


# Conversion quirks (llama.cpp's conversion/qwen.py: Qwen3NextModel, _LinearAttentionVReorderBase,
# _QwenMtpMixin, _Qwen35MRopeMixin). Every one is a function of one tensor, applied to the rows
# the converter streams, so no quirk holds more than the piece being written.

# The ...ForConditionalGeneration checkpoints' vision tower, which the text model does without
# (TextModel.filter_tensors skips it; cpuq says so in one line).
VISION_PREFIXES = ("model.visual.",)

# The multi-token-prediction block(s) mtp.* become blocks n_layer.. after the trunk
# (_QwenMtpMixin.filter_tensors): mtp.layers.{k}.X -> model.layers.{n_layer + k}.X, and the
# block's own modules renamed as below; NEXTN_NAMES gives those their GGUF names.
MTP_MODULES = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
               "norm": "shared_head.norm"}
NEXTN_NAMES = {"eh_proj": "nextn.eh_proj", "enorm": "nextn.enorm", "hnorm": "nextn.hnorm",
               "shared_head.norm": "nextn.shared_head_norm"}

# qwen3next's fused DeltaNet input: the module the checkpoint holds instead of the fields
# whose Tensor rows say hf_unless="fused_inputs" (cut by split_rows).
SPLITS = {"linear_attn.in_proj_qkvz.weight": ("wqkv", "wgate")}


def nextn_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """A prediction block's own tensors (canonical HF module -> shape): the projection of
    [embedding; hidden] and its three norms."""
    n = cfg.n_embd
    return {"eh_proj.weight": (n, 2 * n), "enorm.weight": (n,), "hnorm.weight": (n,),
            "shared_head.norm.weight": (n,)}


def canonical_name(name: str, n_layer: int) -> str | None:
    """The checkpoint name `name` as llama.cpp's converter sees it (TextModel.filter_tensors,
    _QwenMtpMixin.filter_tensors): the language_model. level dropped, mtp.* as the blocks
    after the n_layer trunk ones; None for the vision tower."""
    if name.startswith(VISION_PREFIXES):
        return None
    name = name.replace("language_model.", "")
    if name.startswith("model.mtp."):
        name = name[len("model."):]
    if name.startswith("mtp."):
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
            return f"model.layers.{n_layer + int(parts[2])}.{parts[3]}"
        if len(parts) == 3 and parts[1] in MTP_MODULES:
            return f"model.layers.{n_layer}.{MTP_MODULES[parts[1]]}.{parts[2]}"
    return name


def nextn_count(names) -> int:
    """Prediction blocks a checkpoint holds (mtp.layers.{k}.*; llama.cpp's opt_num_mtp_layers)."""
    found = -1
    for name in names:
        parts = name.replace("model.mtp.", "mtp.", 1).split(".", 3)
        if len(parts) == 4 and parts[0] == "mtp" and parts[1] == "layers" and parts[2].isdecimal():
            found = max(found, int(parts[2]))
    return found + 1


def _tiled(cfg, head_dim: int) -> np.ndarray:
    """Index of the source value head at each position of llama.cpp's tiled order (value
    head o reads key head o % n_group; HF groups them, h // (n_v / n_group)), expanded to
    head_dim rows each; the identity where v_tiled is off or each key head has one value head."""
    n_group, n_v = cfg.ssm_n_group, cfg.ssm_dt_rank
    heads = np.arange(n_v)
    if cfg.spec.v_tiled:
        heads = (heads % n_group) * (n_v // n_group) + heads // n_group
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _ranges(rows: np.ndarray, offset: int = 0) -> list[tuple[int, int]]:
    """Source rows in output order -> maximal runs [first, end)."""
    out: list[tuple[int, int]] = []
    for r in (int(v) + offset for v in rows):
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def row_order(cfg, module: str) -> list[tuple[int, int]] | None:
    """The checkpoint rows of `module` (canonical, without the block prefix) in the order
    GGUF stores them, as runs [first, end); None where it is written as stored.
    _LinearAttentionVReorderBase.modify_tensors: the value heads of in_proj_qkv's v part, of
    in_proj_z, in_proj_a/b (one row per head) and of conv1d's v channels."""
    if not cfg.spec.v_tiled:
        return None
    qk = 2 * cfg.ssm_n_group * cfg.ssm_d_state
    if module in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
        return [(0, qk)] + _ranges(_tiled(cfg, cfg.ssm_head_v_dim), qk)
    if module == "linear_attn.in_proj_z.weight":
        return _ranges(_tiled(cfg, cfg.ssm_head_v_dim))
    if module in ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight"):
        return _ranges(_tiled(cfg, 1))
    return None


def split_rows(cfg, module: str) -> dict[str, list[tuple[int, int]]]:
    """The fields cut from a SPLITS module -> their checkpoint rows as runs (Qwen3NextModel.
    modify_tensors): in_proj_qkvz holds per key head [q, k, v, z], q and k ssm_d_state rows,
    v and z the head's value heads; attn_qkv is every q, then every k, then every v, and
    attn_gate every z."""
    dk, r_dv = cfg.ssm_d_state, cfg.ssm_d_inner // cfg.ssm_n_group
    group = 2 * dk + 2 * r_dv
    starts = [g * group for g in range(cfg.ssm_n_group)]
    q = [(s, s + dk) for s in starts]
    k = [(s + dk, s + 2 * dk) for s in starts]
    v = [(s + 2 * dk, s + 2 * dk + r_dv) for s in starts]
    z = [(s + 2 * dk + r_dv, s + group) for s in starts]
    return {"wqkv": q + k + v, "wgate": z}


def value_transform(cfg, module: str):
    """f(values) -> values for `module`'s rows as read (float32, a piece of rows or the
    whole vector), or None (Qwen3NextModel.modify_tensors and the V-head reorder):
    A_log -> A = -exp(A_log) (ssm_a, torch's float32 exp); the per-value-head vectors
    (A_log, dt_bias) in tiled order; out_proj's columns in tiled order; the RMSNorm weights
    HF applies as (1 + w) stored +1, the gated norm's (linear_attn.norm, x * w) as they are."""
    if module in ("linear_attn.A_log", "linear_attn.dt_bias"):
        order = _tiled(cfg, 1)
        if module == "linear_attn.dt_bias":
            return lambda x: x[..., order]
        return lambda x: _neg_exp(x[..., order])
    if module == "linear_attn.out_proj.weight" and cfg.spec.v_tiled:
        order = _tiled(cfg, cfg.ssm_head_v_dim)
        return lambda x: x[..., order]
    if module.endswith("norm.weight") and module != "linear_attn.norm.weight":
        return lambda x: x + np.float32(1)
    return None


def _neg_exp(x: np.ndarray) -> np.ndarray:
    """-exp(x) in float32 as llama.cpp's converter computes it (torch.exp): the correctly
    rounded value (through float64), moved by the ulp torch's own exp departs from it for the
    bf16 inputs torch_exp tabulates (bf16 is what checkpoints store A_log in)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.exp(x.astype(np.float64)).astype(np.float32)
    bits = x.view(np.uint32)
    bf16 = (bits & 0xFFFF) == 0
    top = bits >> 16
    step = (bf16 & np.isin(top, list(torch_exp.ULP_ABOVE))).astype(np.int32) \
        - (bf16 & np.isin(top, list(torch_exp.ULP_BELOW))).astype(np.int32)
    y = (y.view(np.int32) + step).view(np.float32)
    return -y


def stored_name(name: str, n_layer: int, prefix: str) -> str:
    """The checkpoint's name of canonical `name` (canonical_name's inverse, for messages):
    the text model under `prefix` ("model." or "model.language_model."), blocks from n_layer
    on under mtp.*."""
    m = name.split(".", 3)
    if len(m) == 4 and m[:2] == ["model", "layers"] and m[2].isdecimal() and int(m[2]) >= n_layer:
        module = next((k for k, v in MTP_MODULES.items() if m[3] == f"{v}.weight"), None)
        return f"mtp.{module}.weight" if module else f"mtp.layers.{int(m[2]) - n_layer}.{m[3]}"
    return prefix + name[len("model."):] if name.startswith("model.") else name


# What the converter does to one checkpoint tensor: its rows' order (runs [first, end), None:
# as stored), a function of each piece of its values (None: none), whether its dimensions of
# 1 are dropped (conv1d's (channels, 1, kernel) -> (channels, kernel)).
Quirk = namedtuple("Quirk", ["rows", "values", "squeeze"])


def quirks(cfg, module: str) -> Quirk | None:
    """The conversion quirks of block tensor `module` (canonical, without model.layers.{i}.)."""
    q = Quirk(row_order(cfg, module), value_transform(cfg, module), module == "linear_attn.conv1d.weight")
    return q if q.rows is not None or q.values is not None or q.squeeze else None


# _Qwen35MRopeMixin: qwen35 and qwen35moe files always carry rope sections (llama.cpp's loader
# requires them), these where config.json names none.
DEFAULT_ROPE_SECTIONS = {"qwen35": (11, 11, 10, 0), "qwen35moe": (11, 11, 10, 0)}
