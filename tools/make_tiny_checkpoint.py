"""Tiny HF checkpoints (Qwen2, Qwen3, Llama, Qwen3-MoE, Qwen2-MoE, and the Gated-DeltaNet
hybrids Qwen3.5, Qwen3.5-MoE, Qwen3-Next) built from numpy, for converter and runtime tests.

    make_tiny_checkpoint(out_dir, arch="qwen3", dtype="bf16", seed=0, tied=True, sharded=False,
                         num_hidden_layers=3)          # any config.json key can be overridden
    make_tiny_checkpoint(out_dir, arch="qwen35moe", mtp=True, conditional=True, fused_experts=False)
    python tools/make_tiny_checkpoint.py OUT --arch qwen3 --dtype bf16 [--seed N] [--untied]
                                             [--sharded] [--set key=json_value ...] [--vocab GGUF]
                                             [--fused-experts | --split-experts] [--mtp] [--conditional]

A checkpoint is what `save_pretrained` writes: config.json, generation_config.json,
model.safetensors (or two shards and model.safetensors.index.json) with the exact HF
tensor names and shapes of the architecture, and tokenizer.json / tokenizer_config.json.
The model is small (hidden 64, 2 layers) so transformers runs it instantly, but the
tokenizer is the real Qwen2 one, rebuilt from llama.cpp's ggml-vocab-qwen2.gguf (committed
as tests/golden/ggml-vocab-qwen2.gguf; see tests/golden/README.md), so the vocabulary (and
the embedding) has 151936 rows. OUT must not exist yet: the checkpoint is written into a
temporary sibling folder and renamed at the end, so a failed run leaves nothing.

Weights are N(0, 0.02) (norm weights 1 + N(0, 0.1)), deterministic in `seed`; the hybrids
draw their own way (hybrid_weights). The
safetensors file and BF16 rounding are written here directly: neither the safetensors
package's numpy API nor numpy itself can write BF16.

Imports numpy, the sibling hf_tokenizer (cpuq's tokenizer, tokenizers, gguf enums) and the
standard library; not torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_tokenizer  # noqa: E402
from toolcli import ArgumentParser, ToolError, output_dir, require_new, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# llama.cpp's Qwen2 vocabulary, with its .inp/.out test vectors beside it (provenance in
# tests/golden/README.md). Only this path: a missing file is an error, never a fallback.
QWEN2_VOCAB = ROOT / "tests" / "golden" / "ggml-vocab-qwen2.gguf"

# Storage dtype names: flag value -> (safetensors dtype, config torch_dtype).
DTYPES = {"bf16": ("BF16", "bfloat16"), "f16": ("F16", "float16"), "f32": ("F32", "float32")}
_NUMPY = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
# config.json keys the tensor shapes are computed from: each must be a positive int
# (head_dim may also be null, meaning hidden_size / num_attention_heads).
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "num_key_value_heads", "vocab_size", "head_dim")
MOE_SIZE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")

# Per-architecture config.json, shaped like the real small models of each family
# (Qwen2-0.5B-Instruct, Qwen3-0.6B, a Llama-3-style model), shrunk.
_COMMON = {
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "use_cache": True,
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0,
    "transformers_version": "4.51.0",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "max_position_embeddings": 32768, "max_window_layers": 2, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False},
    # head_dim is not hidden/heads here (32 * 4 = 128 != 64), as in the real Qwen3 models.
    "qwen3": {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32,
              "attention_bias": False, "max_position_embeddings": 40960, "max_window_layers": 2,
              "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
              "use_sliding_window": False},
    "llama": {**_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
              "mlp_bias": False, "max_position_embeddings": 8192, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
              "rope_scaling": None, "rope_theta": 500000.0},
    # Qwen3-30B-A3B's and Qwen1.5-MoE-A2.7B's config.json keys, shrunk
    "qwen3moe": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 32,
                 "attention_bias": False, "decoder_sparse_step": 1, "max_position_embeddings": 40960,
                 "max_window_layers": 2, "mlp_only_layers": [], "moe_intermediate_size": 32, "norm_topk_prob": True,
                 "num_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False, "rms_norm_eps": 1e-6,
                 "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
                 "use_sliding_window": False},
    "qwen2moe": {**_COMMON, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                 "decoder_sparse_step": 1, "max_position_embeddings": 8192, "max_window_layers": 2,
                 "moe_intermediate_size": 32, "norm_topk_prob": False, "num_experts": 6, "num_experts_per_tok": 2,
                 "output_router_logits": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 64, "sliding_window": 32768,
                 "use_sliding_window": False},
}

# The Gated-DeltaNet hybrids, shaped like their published config.json files (Qwen/Qwen3.5-0.8B's
# text_config, Qwen/Qwen3.5-35B-A3B's text_config, Qwen/Qwen3-Next-80B-A3B-Instruct), shrunk to
# hidden 64 and 4 layers: three linear_attention layers, then one full_attention layer. head_dim
# 64 with partial_rotary_factor 0.25 rotates 16 dimensions, which mrope_section [3, 3, 2] splits
# in 8 pairs as [11, 11, 10] splits the real 64. The vocabulary stays the Qwen2 tokenizer's
# (151936 rows), which the tiny checkpoints ship instead of Qwen3.5's 248320-token one.
_HYBRID = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "full_attention_interval": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "max_position_embeddings": 262144, "num_attention_heads": 4,
    "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "use_cache": True,
    "vocab_size": 151936, "transformers_version": "4.57.0.dev0",
}
_QWEN35_ROPE = {"mrope_interleaved": True, "mrope_section": [3, 3, 2], "partial_rotary_factor": 0.25,
                "rope_theta": 10000000, "rope_type": "default"}
_QWEN35 = {**_HYBRID, "attn_output_gate": True, "mamba_ssm_dtype": "float32", "mlp_only_layers": [],
           "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "pad_token_id": None,
           "partial_rotary_factor": 0.25, "rope_parameters": _QWEN35_ROPE}
CONFIGS.update({
    # Qwen3.5-0.8B / 2B: dense, as many value heads as key heads
    "qwen35": {**_QWEN35, "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
               "intermediate_size": 128, "linear_num_key_heads": 4, "linear_num_value_heads": 4},
    # Qwen3.5-35B-A3B: every layer MoE with a gated shared expert, twice the value heads of key heads
    "qwen35moe": {**_QWEN35, "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
                  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "moe_intermediate_size": 32,
                  "num_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
                  "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 64},
    # Qwen3-Next-80B-A3B: no layer_types, rope keys at the top level, fused qkvz / ba projections
    "qwen3next": {**_HYBRID, "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
                  "decoder_sparse_step": 1, "intermediate_size": 128, "linear_num_key_heads": 2,
                  "linear_num_value_heads": 4, "mlp_only_layers": [], "moe_intermediate_size": 32,
                  "norm_topk_prob": True, "num_experts": 8, "num_experts_per_tok": 2,
                  "output_router_logits": False, "partial_rotary_factor": 0.25, "rope_scaling": None,
                  "rope_theta": 5000000, "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 64,
                  "use_sliding_window": False},
})
HYBRID_ARCHS = ("qwen35", "qwen35moe", "qwen3next")
HYBRID_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
HYBRID_SIZE_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                    "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval")
# Which expert layout the published checkpoints store: Qwen3.5-MoE the stacks
# mlp.experts.gate_up_proj / down_proj (its multi-token-prediction layer one matrix per expert),
# Qwen3-Next one matrix per expert.
FUSED_BY_DEFAULT = {"qwen35moe": True, "qwen3next": False}
# Qwen3_5ForConditionalGeneration's outer config.json (Qwen/Qwen3.5-0.8B's keys) around the
# text_config, with a vision tower of one block: the text model ignores it, the layout is the point.
VISION_CONFIG = {"deepstack_visual_indexes": [], "depth": 1, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
                 "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64, "num_heads": 2,
                 "num_position_embeddings": 16, "patch_size": 4, "spatial_merge_size": 2,
                 "temporal_patch_size": 2}
CONDITIONAL = {
    "qwen35": {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
               "vision_model_type": "qwen3_5_vision"},
    "qwen35moe": {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
                  "vision_model_type": "qwen3_5_moe_vision"},
}

# Which optional tensors each architecture has: q/k/v biases (qwen2), per-head q/k RMSNorm (qwen3).
QUIRKS = {
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
    "llama": {"qkv_bias": False, "qk_norm": False},
    "qwen3_moe": {"qkv_bias": False, "qk_norm": True},
    "qwen2_moe": {"qkv_bias": True, "qk_norm": False},
}


def tensor_shapes(config: Mapping[str, Any], fused_experts: bool = False, mtp: bool = False) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes, in modeling-file order. An MoE's experts: one matrix
    per expert (what save_pretrained writes), or with fused_experts the stacks
    mlp.experts.gate_up_proj and mlp.experts.down_proj (transformers' in-memory layout).
    A hybrid's (a config.json of HYBRID_ARCHS) come from hybrid_tensor_shapes."""
    if is_hybrid(config):
        return hybrid_tensor_shapes(config, fused_experts, mtp)
    arch = config["model_type"]
    n_embd, n_ff, n_vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (n_embd,)
        for proj, rows in (("q", n_head * head_dim), ("k", n_head_kv * head_dim), ("v", n_head_kv * head_dim)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, n_embd)
            if QUIRKS[arch]["qkv_bias"]:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (n_embd, n_head * head_dim)
        if QUIRKS[arch]["qk_norm"]:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (n_embd,)
        if "num_experts" in config:
            shapes.update(_moe_shapes(config, p, fused_experts))
            continue
        shapes[p + "mlp.gate_proj.weight"] = (n_ff, n_embd)
        shapes[p + "mlp.up_proj.weight"] = (n_ff, n_embd)
        shapes[p + "mlp.down_proj.weight"] = (n_embd, n_ff)
    shapes["model.norm.weight"] = (n_embd,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (n_vocab, n_embd)
    return shapes


def _moe_shapes(config: Mapping[str, Any], p: str, fused: bool) -> dict[str, tuple[int, ...]]:
    n_embd, n_expert, n_ff = config["hidden_size"], config["num_experts"], config["moe_intermediate_size"]
    shapes = {p + "mlp.gate.weight": (n_expert, n_embd)}
    if fused:
        shapes[p + "mlp.experts.gate_up_proj"] = (n_expert, 2 * n_ff, n_embd)
        shapes[p + "mlp.experts.down_proj"] = (n_expert, n_embd, n_ff)
    else:
        for e in range(n_expert):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (n_ff, n_embd)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (n_ff, n_embd)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (n_embd, n_ff)
    if "shared_expert_intermediate_size" in config:
        n_sh = config["shared_expert_intermediate_size"]
        shapes[p + "mlp.shared_expert.gate_proj.weight"] = (n_sh, n_embd)
        shapes[p + "mlp.shared_expert.up_proj.weight"] = (n_sh, n_embd)
        shapes[p + "mlp.shared_expert.down_proj.weight"] = (n_embd, n_sh)
        shapes[p + "mlp.shared_expert_gate.weight"] = (1, n_embd)
    return shapes


def is_hybrid(config: Mapping[str, Any]) -> bool:
    return config.get("text_config", config)["model_type"] in HYBRID_MODEL_TYPES


def hybrid_tensor_shapes(config: Mapping[str, Any], fused_experts: bool, mtp: bool = False) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Gated-DeltaNet hybrid's config.json: the text model
    under model. (under model.language_model. for a ...ForConditionalGeneration config, which
    has a text_config, then its vision tower model.visual.*), lm_head unless tied, and with
    mtp the multi-token-prediction block mtp.* that published checkpoints ship and
    transformers ignores."""
    conditional = "text_config" in config
    tied = config["tie_word_embeddings"]
    vision = config.get("vision_config")
    config = config.get("text_config", config)
    n_embd, n_vocab = config["hidden_size"], config["vocab_size"]
    prefix = "model.language_model." if conditional else "model."
    shapes = {prefix + "embed_tokens.weight": (n_vocab, n_embd)}
    n_layer = config["num_hidden_layers"]
    for i in range(n_layer):
        shapes.update(_hybrid_layer_shapes(config, f"{prefix}layers.{i}.", _layer_type(config, i), fused_experts))
    shapes[prefix + "norm.weight"] = (n_embd,)
    if conditional:
        shapes.update(_vision_shapes(vision, n_embd))
    if not tied:
        shapes["lm_head.weight"] = (n_vocab, n_embd)
    if mtp:
        shapes["mtp.fc.weight"] = (n_embd, 2 * n_embd)
        # The MTP layer is a full-attention layer; its experts are stored one matrix per expert
        # even where the main layers' are stacked (Qwen3.5-35B-A3B's index).
        shapes.update(_hybrid_layer_shapes(config, "mtp.layers.0.", "full_attention", False))
        shapes["mtp.norm.weight"] = (n_embd,)
        shapes["mtp.pre_fc_norm_embedding.weight"] = (n_embd,)
        shapes["mtp.pre_fc_norm_hidden.weight"] = (n_embd,)
    return shapes


def _layer_type(config: Mapping[str, Any], i: int) -> str:
    """layer_types[i], or what transformers derives from full_attention_interval without it."""
    if config.get("layer_types") is not None:
        return config["layer_types"][i]
    return "full_attention" if (i + 1) % config["full_attention_interval"] == 0 else "linear_attention"


def _hybrid_layer_shapes(config: Mapping[str, Any], p: str, layer_type: str,
                         fused_experts: bool) -> dict[str, tuple[int, ...]]:
    n_embd = config["hidden_size"]
    shapes = {p + "input_layernorm.weight": (n_embd,)}
    if layer_type == "linear_attention":
        nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
        dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
        n_conv = 2 * nk * dk + nv * dv
        la = p + "linear_attn."
        shapes[la + "A_log"] = (nv,)
        shapes[la + "conv1d.weight"] = (n_conv, 1, config["linear_conv_kernel_dim"])
        shapes[la + "dt_bias"] = (nv,)
        if config["model_type"] == "qwen3_next":
            # per key head [q, k, v, z] and [b, a] rows, interleaved (fix_query_key_value_ordering)
            shapes[la + "in_proj_ba.weight"] = (2 * nv, n_embd)
            shapes[la + "in_proj_qkvz.weight"] = (2 * nk * dk + 2 * nv * dv, n_embd)
        else:
            shapes[la + "in_proj_a.weight"] = (nv, n_embd)
            shapes[la + "in_proj_b.weight"] = (nv, n_embd)
            shapes[la + "in_proj_qkv.weight"] = (n_conv, n_embd)
            shapes[la + "in_proj_z.weight"] = (nv * dv, n_embd)
        shapes[la + "norm.weight"] = (dv,)
        shapes[la + "out_proj.weight"] = (n_embd, nv * dv)
    else:
        n_head, n_head_kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        sa = p + "self_attn."
        shapes[sa + "k_norm.weight"] = (head_dim,)
        shapes[sa + "k_proj.weight"] = (n_head_kv * head_dim, n_embd)
        shapes[sa + "o_proj.weight"] = (n_embd, n_head * head_dim)
        shapes[sa + "q_norm.weight"] = (head_dim,)
        shapes[sa + "q_proj.weight"] = (2 * n_head * head_dim, n_embd)  # per head [query, output gate]
        shapes[sa + "v_proj.weight"] = (n_head_kv * head_dim, n_embd)
    shapes[p + "post_attention_layernorm.weight"] = (n_embd,)
    if "num_experts" in config:
        shapes.update(_moe_shapes(config, p, fused_experts))
    else:
        n_ff = config["intermediate_size"]
        shapes[p + "mlp.down_proj.weight"] = (n_embd, n_ff)
        shapes[p + "mlp.gate_proj.weight"] = (n_ff, n_embd)
        shapes[p + "mlp.up_proj.weight"] = (n_ff, n_embd)
    return shapes


def _vision_shapes(vision: Mapping[str, Any], n_out: int) -> dict[str, tuple[int, ...]]:
    """Qwen3_5VisionModel's parameters (patch embedding, learned positions, blocks, merger)."""
    n, n_ff, m = vision["hidden_size"], vision["intermediate_size"], vision["hidden_size"] * vision["spatial_merge_size"] ** 2
    v = "model.visual."
    shapes = {v + "patch_embed.proj.weight": (n, vision["in_channels"], vision["temporal_patch_size"],
                                              vision["patch_size"], vision["patch_size"]),
              v + "patch_embed.proj.bias": (n,),
              v + "pos_embed.weight": (vision["num_position_embeddings"], n)}
    for i in range(vision["depth"]):
        b = f"{v}blocks.{i}."
        for name, shape in (("norm1", (n,)), ("norm2", (n,))):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = shape, shape
        for name, rows, cols in (("attn.qkv", 3 * n, n), ("attn.proj", n, n), ("mlp.linear_fc1", n_ff, n),
                                 ("mlp.linear_fc2", n, n_ff)):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (rows, cols), (rows,)
    shapes[v + "merger.norm.weight"], shapes[v + "merger.norm.bias"] = (n,), (n,)
    for name, rows, cols in (("merger.linear_fc1", m, m), ("merger.linear_fc2", n_out, m)):
        shapes[v + name + ".weight"], shapes[v + name + ".bias"] = (rows, cols), (rows,)
    return shapes


# storage ---------------------------------------------------------------------

def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays a quiet NaN.
    The same rounding as torch's .to(torch.bfloat16) and ggml's fp32_to_bf16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; uint32 only wraps for
    # NaNs with the sign bit set, which the next line replaces anyway.
    out = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out.reshape(np.shape(x))  # ascontiguousarray made 0-d arrays 1-d


def to_storage(x: np.ndarray, st_dtype: str) -> np.ndarray:
    """float32 values as the bytes a safetensors tensor of `st_dtype` holds."""
    if st_dtype == "BF16":
        return f32_to_bf16(x)
    return np.asarray(x, dtype=_NUMPY[st_dtype])


def write_safetensors(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write `{name: (dtype, array)}` as a safetensors file, arrays already in their
    storage dtype (BF16 as uint16). Tensors are stored sorted by name and the header is
    space-padded to 8 bytes, as the safetensors library does. Returns the data size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        dtype, arr = tensors[name]
        if np.dtype(arr.dtype).newbyteorder("<") != _NUMPY[dtype].newbyteorder("<"):
            raise ValueError(f"{name}: array dtype {arr.dtype} does not store {dtype}")
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name][1], dtype=_NUMPY[tensors[name][0]]).tobytes())
    return offset


def write_checkpoint_weights(out_dir: Path, tensors: Mapping[str, tuple[str, np.ndarray]],
                             sharded: bool) -> None:
    """model.safetensors, or two shards split by name order plus the index transformers reads."""
    if not sharded:
        write_safetensors(out_dir / "model.safetensors", tensors)
        return
    names = sorted(tensors)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for k, part in enumerate(halves, start=1):
        shard = f"model-{k:05d}-of-{len(halves):05d}.safetensors"
        total += write_safetensors(out_dir / shard, {n: tensors[n] for n in part})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / "model.safetensors.index.json", index)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# the checkpoint -----------------------------------------------------------------

def check_vocab(vocab: Path) -> None:
    """ToolError unless `vocab` is a GGUF file with a BPE vocabulary (what
    hf_tokenizer.read_gguf_metadata, a reader for trusted files, then reads)."""
    if not vocab.is_file():
        raise ToolError(f"{vocab}: Qwen2 vocabulary (llama.cpp's ggml-vocab-qwen2.gguf) not found")
    from cpuq import open_gguf
    with open_gguf(vocab) as f:  # CpuqError naming the file if it is not a valid GGUF
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            if f.array_length(key) == 0:
                raise ToolError(f"{vocab}: no '{key}' array: not a BPE vocabulary")


@lru_cache(maxsize=2)
def qwen2_tokenizer_files(vocab: Path = QWEN2_VOCAB) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) of the real Qwen2 tokenizer, built once
    per vocabulary file."""
    check_vocab(vocab)
    metadata = hf_tokenizer.read_gguf_metadata(vocab)
    tok = hf_tokenizer.build_tokenizer(metadata)
    config = hf_tokenizer.tokenizer_config(metadata, "Qwen2Tokenizer", model_max_length=32768,
                                           eos_token="<|im_end|>")
    return tok.to_str(), config


def random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        is_norm = name.endswith("norm.weight")
        out[name] = (1.0 + 0.1 * x if is_norm else 0.02 * x).astype(np.float32)
    return out


def hybrid_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random weights of a hybrid, drawn as its modules expect them, deterministic in `seed`:
    matrices N(0, 1/fan_in) so every block moves the residual stream by O(1) and a wrong stage
    shows in the logits (embeddings N(0, 0.02)); the zero-centred RMSNorms (HF computes
    x * (1 + w)) N(0, 0.1), linear_attn.norm (RMSNormGated, x * w) 1 + N(0, 0.1); A_log =
    log(U(1, 16)); dt_bias the inverse softplus of dt = logU(0.001, 0.1) (Mamba's init), so
    the per-token decays exp(-A softplus(a + dt_bias)) run from ~0.2 to ~0.999 and the state
    keeps both short and long memories; biases N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".A_log"):
            x = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith(".dt_bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
            x = dt + np.log(-np.expm1(-dt))  # softplus(x) == dt
        else:
            z = rng.standard_normal(shape, dtype=np.float32)
            if name.endswith("linear_attn.norm.weight"):
                x = 1.0 + 0.1 * z
            elif name.endswith("norm.weight"):  # the vision tower's LayerNorms scale by w itself
                x = 1.0 + 0.1 * z if name.startswith("model.visual.") else 0.1 * z
            elif name.endswith(("embed_tokens.weight", "lm_head.weight", ".bias")):
                x = 0.02 * z
            else:  # (rows, cols), expert stacks (n, rows, cols), conv1d (C, 1, K): the last axis
                fan_in = np.prod(shape[1:]) if len(shape) == 5 else shape[-1]  # Conv3d patch embedding
                x = z / np.sqrt(fan_in)
        out[name] = np.asarray(x, dtype=np.float32)
    return out


def make_tiny_checkpoint(out_dir: str | Path, arch: str = "qwen2", dtype: str = "bf16", seed: int = 0,
                         tied: bool = True, sharded: bool = False, *, vocab: str | Path = QWEN2_VOCAB,
                         fused_experts: bool | None = None, mtp: bool = False, conditional: bool = False,
                         **overrides: Any) -> Path:
    """Write a tiny HF checkpoint of `arch` (a key of CONFIGS) to `out_dir`, which must not
    exist; `overrides` replace config.json keys (sizes included; a hybrid's text config keys
    when conditional); `vocab` is the GGUF the tokenizer is rebuilt from; fused_experts: an
    MoE's experts as stacks (tensor_shapes), None for the layout the published checkpoints
    of `arch` use (FUSED_BY_DEFAULT); mtp (hybrids): the multi-token-prediction tensors;
    conditional (qwen35, qwen35moe): the ...ForConditionalGeneration layout with a vision
    tower. Returns `out_dir`. ToolError (or cpuq's CpuqError for a broken vocabulary file)
    on bad input, before anything is written."""
    if arch not in CONFIGS:
        raise ToolError(f"arch {arch!r}: expected one of {sorted(CONFIGS)}")
    if dtype not in DTYPES:
        raise ToolError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if mtp and arch not in HYBRID_ARCHS:
        raise ToolError(f"mtp: arch {arch!r} has no multi-token-prediction block; only {list(HYBRID_ARCHS)}")
    if conditional and arch not in CONDITIONAL:
        raise ToolError(f"conditional: arch {arch!r} has no ...ForConditionalGeneration layout; "
                        f"only {sorted(CONDITIONAL)}")
    require_new(Path(out_dir))
    if fused_experts is None:
        fused_experts = FUSED_BY_DEFAULT.get(arch, False)
    st_dtype, torch_dtype = DTYPES[dtype]
    if arch in HYBRID_ARCHS:
        config = _hybrid_config(arch, tied, torch_dtype, mtp, conditional, overrides)
    else:
        config = {**CONFIGS[arch], "tie_word_embeddings": tied, "torch_dtype": torch_dtype, **overrides}
        config = dict(sorted(config.items()))  # transformers writes keys sorted
        _check_sizes(config)
    tokenizer_json, tok_config = qwen2_tokenizer_files(Path(vocab))
    with output_dir(Path(out_dir)) as tmp:
        _write_checkpoint(tmp, config, st_dtype, seed, sharded, tokenizer_json, tok_config, fused_experts, mtp)
    return Path(out_dir)


def _check_sizes(config: Mapping[str, Any]) -> None:
    keys = SIZE_KEYS + (MOE_SIZE_KEYS if "num_experts" in config else ())
    if config["model_type"] == "qwen3_5_moe_text":  # every layer MoE: its config has no intermediate_size
        keys = tuple(k for k in keys if k != "intermediate_size")
    keys += HYBRID_SIZE_KEYS if config["model_type"] in HYBRID_MODEL_TYPES else ()
    for key in keys:
        value = config.get(key)
        if not (type(value) is int and value > 0 or key == "head_dim" and value is None):
            raise ToolError(f"config {key}={json.dumps(value)}: expected a positive integer")


def _hybrid_config(arch: str, tied: bool, torch_dtype: str, mtp: bool, conditional: bool,
                   overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json of a hybrid: its text config with `overrides`, layer_types following
    num_hidden_layers (Qwen3.5; Qwen3-Next's config has only full_attention_interval), and
    for `conditional` the outer ...ForConditionalGeneration config around it."""
    text = {**CONFIGS[arch], "tie_word_embeddings": tied, "dtype": torch_dtype}
    if arch != "qwen3next":  # the published Qwen3-Next config.json has no such key
        text["mtp_num_hidden_layers"] = 1 if mtp else 0
    text.update(overrides)
    _check_sizes(text)
    if arch != "qwen3next" and "layer_types" not in overrides:
        interval = text["full_attention_interval"]
        text["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                               for i in range(text["num_hidden_layers"])]
    kinds = text.get("layer_types")
    if kinds is not None and (type(kinds) is not list or len(kinds) != text["num_hidden_layers"] or
                              not set(kinds) <= {"linear_attention", "full_attention"}):
        raise ToolError(f"config layer_types={json.dumps(kinds)}: expected num_hidden_layers="
                        f"{text['num_hidden_layers']} entries, each linear_attention or full_attention")
    if text["linear_num_value_heads"] % text["linear_num_key_heads"]:
        raise ToolError(f"config linear_num_value_heads={text['linear_num_value_heads']}: expected a multiple "
                        f"of linear_num_key_heads={text['linear_num_key_heads']}")
    if not conditional:
        return dict(sorted(text.items()))
    outer = CONDITIONAL[arch]
    text.pop("architectures")  # llama.cpp's converter would take a text_config's architectures for the model's
    vision = {**VISION_CONFIG, "model_type": outer["vision_model_type"], "out_hidden_size": text["hidden_size"]}
    return {"architectures": outer["architectures"], "image_token_id": 248056, "model_type": outer["model_type"],
            "text_config": dict(sorted(text.items())), "tie_word_embeddings": tied,
            "transformers_version": text["transformers_version"], "video_token_id": 248057,
            "vision_config": dict(sorted(vision.items())), "vision_end_token_id": 248054,
            "vision_start_token_id": 248053}


def _write_checkpoint(out_dir: Path, config: dict[str, Any], st_dtype: str, seed: int, sharded: bool,
                      tokenizer_json: str, tok_config: dict, fused_experts: bool = False, mtp: bool = False) -> None:
    write_json(out_dir / "config.json", config)
    text = config.get("text_config", config)
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": text["bos_token_id"], "do_sample": True,
        "eos_token_id": [text["eos_token_id"], 151643], "pad_token_id": 151643,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
        "transformers_version": text["transformers_version"],
    })
    if is_hybrid(config):
        weights = hybrid_weights(hybrid_tensor_shapes(config, fused_experts, mtp), seed)
    else:
        weights = random_weights(tensor_shapes(config, fused_experts), seed)
    write_checkpoint_weights(out_dir, {n: (st_dtype, to_storage(w, st_dtype)) for n, w in weights.items()}, sharded)
    hf_tokenizer.write_tokenizer_files(out_dir, tokenizer_json, tok_config)


def _parse_set(item: str) -> tuple[str, Any]:
    """KEY=VALUE: VALUE as JSON, or as a string where it is not JSON (--set model_type=qwen2)."""
    key, eq, value = item.partition("=")
    if not key or not eq:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="Write a tiny HF checkpoint (random weights, real Qwen2 tokenizer).")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", choices=sorted(CONFIGS), default="qwen2")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    ap.add_argument("--sharded", action="store_true", help="two shards and model.safetensors.index.json")
    layout = ap.add_mutually_exclusive_group()
    layout.add_argument("--fused-experts", dest="fused_experts", action="store_const", const=True, default=None,
                        help="an MoE's experts as stacks, not one per expert")
    layout.add_argument("--split-experts", dest="fused_experts", action="store_const", const=False,
                        help="an MoE's experts one matrix per expert (default: as the published checkpoints)")
    ap.add_argument("--mtp", action="store_true", help="a hybrid's multi-token-prediction tensors (mtp.*)")
    ap.add_argument("--conditional", action="store_true",
                    help="qwen35/qwen35moe as ...ForConditionalGeneration (text_config, a vision tower)")
    ap.add_argument("--set", action="append", type=_parse_set, default=[], metavar="KEY=JSON",
                    help="override a config.json key")
    ap.add_argument("--vocab", type=Path, default=QWEN2_VOCAB,
                    help="the GGUF vocabulary the tokenizer is rebuilt from (default: %(default)s)")
    args = ap.parse_args(argv)
    out = make_tiny_checkpoint(args.out_dir, args.arch, args.dtype, args.seed, not args.untied, args.sharded,
                               vocab=args.vocab, fused_experts=args.fused_experts, mtp=args.mtp,
                               conditional=args.conditional, **dict(args.set))
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
