"""Full-width HF Qwen2, Qwen3-MoE and Qwen3.5 (Gated-DeltaNet hybrid) checkpoints with few
layers, written in a streaming pass, for the converter's memory and speed benchmarks and the
MoE and hybrid runtime benchmarks.

    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen2.5-72b --layers 2
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen2.5-0.5b
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen3-30b-a3b --layers 4
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen3.5-2b
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen3.5-35b-a3b --layers 8

OUT_DIR must not exist; it appears only once complete (written under a temporary name).

The shapes are the real models' config.json values (Qwen2.5-72B: hidden 8192,
intermediate 29568, 64 / 8 heads, vocab 152064, untied; Qwen2.5-0.5B: hidden 896,
intermediate 4864, 14 / 2 heads, vocab 151936, tied; Qwen3-30B-A3B: hidden 2048, 128
experts of 768 of which 8 per token, 32 / 4 heads of 128, vocab 151936, untied, one
matrix per expert as its checkpoint stores them) with random N(0, 0.02) bf16 weights
(norms 1 + N(0, 0.1)), as make_tiny_checkpoint.py draws them, and the real Qwen2
tokenizer.

The Qwen3.5 shapes are the text_config values of the published config.json files
(Qwen3.5-0.8B: hidden 1024, intermediate 3584, 24 layers, 8 / 2 heads of 256, 16 key and
16 value DeltaNet heads of 128, tied; Qwen3.5-2B: hidden 2048, intermediate 6144, otherwise
as the 0.8B; Qwen3.5-35B-A3B: hidden 2048, 40 layers, 16 / 2 heads of 256, 16 key and 32
value DeltaNet heads, 256 experts of 512 of which 8 per token, a shared expert of 512,
untied, the experts stacked as mlp.experts.gate_up_proj / down_proj as its checkpoint
stores them; all: vocab 248320, every 4th layer full attention, rope theta 1e7 on a quarter
of each head with mrope sections [11, 11, 10]) as Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM
text models, with make_tiny_checkpoint's hybrid weight draws (hybrid_weights: matrices
N(0, 1/fan_in), zero-centred norms, A_log, dt_bias). --layers keeps the pattern: layer i is
full attention when i+1 is a multiple of 4, so 8 layers are 6 DeltaNet + 2 attention. No
multi-token-prediction tensors (mtp_num_hidden_layers 0, where the published files say 1).
The tokenizer is the real Qwen2 one (151936 tokens); the converter pads the vocabulary to
248320 as it pads any vocab_size above the tokenizer's.

Unlike make_tiny_checkpoint, no tensor is ever whole in memory: each is drawn and written
4M values at a time, so a 12 GB checkpoint needs ~50 MB of RAM. One shard per layer plus
one for the rest, with model.safetensors.index.json, as HF shards big models.

Imports numpy and the sibling make_tiny_checkpoint / hf_tokenizer (and through it cpuq's
tokenizer); not torch.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_tokenizer  # noqa: E402
from make_tiny_checkpoint import (CONFIGS, FUSED_BY_DEFAULT, HYBRID_ARCHS, _hybrid_config, f32_to_bf16,  # noqa: E402
                                  hybrid_weights, is_hybrid, qwen2_tokenizer_files, tensor_shapes, write_json)
from toolcli import ArgumentParser, ToolError, output_dir, require_new, run  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-72B-Instruct config.json
    "qwen2.5-72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 152064, "num_hidden_layers": 80,
                    "tie_word_embeddings": False, "max_position_embeddings": 32768, "max_window_layers": 70,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "sliding_window": 131072},
    # Qwen/Qwen2.5-7B-Instruct config.json
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "num_hidden_layers": 28,
                   "tie_word_embeddings": False, "max_position_embeddings": 32768, "max_window_layers": 28,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "sliding_window": 131072},
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "vocab_size": 151936, "num_hidden_layers": 24,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "max_window_layers": 21,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "sliding_window": 32768},
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": {"arch": "qwen3moe", "hidden_size": 2048, "intermediate_size": 6144, "head_dim": 128,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 151936,
                      "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
                      "moe_intermediate_size": 768, "tie_word_embeddings": False, "max_position_embeddings": 40960,
                      "max_window_layers": 48, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}
# Qwen/Qwen3.5-*'s text_config; make_tiny_checkpoint's qwen35 / qwen35moe configs supply the
# keys all of them share (full_attention_interval 4, conv kernel 4, attn_output_gate, ...).
_QWEN35_ROPE = {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                "rope_theta": 10000000, "rope_type": "default"}
_QWEN35 = {"head_dim": 256, "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
           "num_key_value_heads": 2, "vocab_size": 248320, "max_position_embeddings": 262144,
           "rms_norm_eps": 1e-6, "rope_parameters": _QWEN35_ROPE}
SHAPES.update({
    # Qwen/Qwen3.5-0.8B config.json
    "qwen3.5-0.8b": {**_QWEN35, "arch": "qwen35", "hidden_size": 1024, "intermediate_size": 3584,
                     "num_hidden_layers": 24, "num_attention_heads": 8, "linear_num_key_heads": 16,
                     "linear_num_value_heads": 16, "tie_word_embeddings": True},
    # Qwen/Qwen3.5-2B: hidden, intermediate, layers, 8 / 2 heads of 256 and 16 / 16 DeltaNet heads
    # of 128 as its model card gives them (llama.cpp also takes 24 layers of 2048 for the 2B);
    # tie_word_embeddings is unconfirmed, taken from the 0.8B.
    "qwen3.5-2b": {**_QWEN35, "arch": "qwen35", "hidden_size": 2048, "intermediate_size": 6144,
                   "num_hidden_layers": 24, "num_attention_heads": 8, "linear_num_key_heads": 16,
                   "linear_num_value_heads": 16, "tie_word_embeddings": True},
    # Qwen/Qwen3.5-35B-A3B config.json (every layer MoE: no intermediate_size)
    "qwen3.5-35b-a3b": {**_QWEN35, "arch": "qwen35moe", "hidden_size": 2048, "num_hidden_layers": 40,
                        "num_attention_heads": 16, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                        "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                        "shared_expert_intermediate_size": 512, "tie_word_embeddings": False},
})
PIECE = 1 << 22  # values drawn and written at a time


def _shard_of(name: str, n_layer: int) -> int:
    """Shard 0 holds embeddings, final norm and lm_head; shard i+1 holds layer i."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) + 1
    return 0


def _hybrid_pieces(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """A hybrid tensor drawn by make_tiny_checkpoint.hybrid_weights in pieces of whole rows
    along its first axis (an expert, a row), so every piece keeps the tensor's fan-in (its
    trailing axes); vectors (norms, A_log, dt_bias) in one piece."""
    rows = shape[0] if len(shape) < 2 else max(1, PIECE // int(np.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        piece = (min(rows, shape[0] - start), *shape[1:])
        yield hybrid_weights({name: piece}, int(rng.integers(2**63)))[name]


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator,
                 hybrid: bool = False) -> int:
    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            if hybrid:
                for x in _hybrid_pieces(name, shapes[name], rng):
                    f.write(f32_to_bf16(x).tobytes())
                continue
            n = int(np.prod(shapes[name]))
            for start in range(0, n, PIECE):
                x = rng.standard_normal(min(PIECE, n - start), dtype=np.float32)
                x = 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.02 * x
                f.write(f32_to_bf16(x).tobytes())
    return offset


def wide_config(shape: str, layers: int | None = None) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """config.json of `shape` with `layers` layers (None: the real model's), and the HF
    tensor names and shapes it implies, in the layout the published checkpoint stores."""
    if shape not in SHAPES:
        raise ToolError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    if layers is not None and layers < 1:
        raise ToolError(f"layers {layers}: expected a positive number")
    values = dict(SHAPES[shape])
    arch = values.pop("arch", "qwen2")
    if layers is not None:
        values["num_hidden_layers"] = layers
    if arch in HYBRID_ARCHS:
        # layer_types follow num_hidden_layers (every 4th full attention); no mtp.* tensors
        config = _hybrid_config(arch, values.pop("tie_word_embeddings"), "bfloat16", False, False, values)
    else:
        config = {**CONFIGS[arch], **values, "torch_dtype": "bfloat16"}
        config["max_window_layers"] = min(config["max_window_layers"], config["num_hidden_layers"])
        config = dict(sorted(config.items()))
    return config, tensor_shapes(config, fused_experts=FUSED_BY_DEFAULT.get(arch, False))


def make_wide_checkpoint(out_dir: str | Path, shape: str = "qwen2.5-72b", layers: int | None = None,
                         seed: int = 0) -> Path:
    out_dir = require_new(Path(out_dir))
    wide_config(shape, layers)  # bad arguments stop it before the vocabulary is read
    tokenizer_json, tok_config = qwen2_tokenizer_files()  # first: a missing vocabulary stops it here
    config, shapes = wide_config(shape, layers)
    n_shards = config["num_hidden_layers"] + 1
    groups: list[dict[str, tuple[int, ...]]] = [{} for _ in range(n_shards)]
    for name, s in shapes.items():
        groups[_shard_of(name, config["num_hidden_layers"])][name] = s
    with output_dir(out_dir) as tmp:
        _write(tmp, config, groups, seed, tokenizer_json, tok_config)
    return out_dir


def _write(out_dir: Path, config: dict[str, Any], groups: list[dict[str, tuple[int, ...]]], seed: int,
           tokenizer_json: str, tok_config: dict) -> None:
    n_shards = len(groups)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        t = time.perf_counter()
        total += _write_shard(out_dir / shard, group, rng, is_hybrid(config))
        weight_map.update({n: shard for n in group})
        print(f"  {shard}: {sum(2 * int(np.prod(s)) for s in group.values()) / 2**30:.2f} GiB "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
    write_json(out_dir / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
        "transformers_version": config["transformers_version"]})
    hf_tokenizer.write_tokenizer_files(out_dir, tokenizer_json, tok_config)


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="Write a full-width Qwen2, Qwen3-MoE or Qwen3.5 checkpoint with random bf16 "
                                    "weights.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-72b")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the real model's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"wrote {make_wide_checkpoint(args.out_dir, args.shape, args.layers, args.seed)}")


if __name__ == "__main__":
    run(main)
