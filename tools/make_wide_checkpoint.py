"""Full-width HF Qwen2 and Qwen3-MoE checkpoints with few layers, written in a streaming
pass, for the converter's memory and speed benchmarks and the MoE runtime benchmark.

    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen2.5-72b --layers 2
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen2.5-0.5b
    python tools/make_wide_checkpoint.py OUT_DIR --shape qwen3-30b-a3b --layers 4

OUT_DIR must not exist; it appears only once complete (written under a temporary name).

The shapes are the real models' config.json values (Qwen2.5-72B: hidden 8192,
intermediate 29568, 64 / 8 heads, vocab 152064, untied; Qwen2.5-0.5B: hidden 896,
intermediate 4864, 14 / 2 heads, vocab 151936, tied; Qwen3-30B-A3B: hidden 2048, 128
experts of 768 of which 8 per token, 32 / 4 heads of 128, vocab 151936, untied, one
matrix per expert as its checkpoint stores them) with random N(0, 0.02) bf16 weights
(norms 1 + N(0, 0.1)), as make_tiny_checkpoint.py draws them, and the real Qwen2
tokenizer. Unlike make_tiny_checkpoint, no tensor is ever whole in memory: each is drawn
and written 4M values at a time, so a 12 GB checkpoint needs ~50 MB of RAM. One shard per
layer plus one for the rest, with model.safetensors.index.json, as HF shards big models.

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
from make_tiny_checkpoint import CONFIGS, f32_to_bf16, qwen2_tokenizer_files, tensor_shapes, write_json  # noqa: E402
from toolcli import ArgumentParser, ToolError, output_dir, require_new, run  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-72B-Instruct config.json
    "qwen2.5-72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 152064, "num_hidden_layers": 80,
                    "tie_word_embeddings": False, "max_position_embeddings": 32768, "max_window_layers": 70,
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
PIECE = 1 << 22  # values drawn and written at a time


def _shard_of(name: str, n_layer: int) -> int:
    """Shard 0 holds embeddings, final norm and lm_head; shard i+1 holds layer i."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) + 1
    return 0


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
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
            n = int(np.prod(shapes[name]))
            for start in range(0, n, PIECE):
                x = rng.standard_normal(min(PIECE, n - start), dtype=np.float32)
                x = 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.02 * x
                f.write(f32_to_bf16(x).tobytes())
    return offset


def make_wide_checkpoint(out_dir: str | Path, shape: str = "qwen2.5-72b", layers: int | None = None,
                         seed: int = 0) -> Path:
    out_dir = require_new(Path(out_dir))
    if shape not in SHAPES:
        raise ToolError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    if layers is not None and layers < 1:
        raise ToolError(f"layers {layers}: expected a positive number")
    tokenizer_json, tok_config = qwen2_tokenizer_files()  # first: a missing vocabulary stops it here
    values = dict(SHAPES[shape])
    config = {**CONFIGS[values.pop("arch", "qwen2")], **values, "torch_dtype": "bfloat16"}
    if layers is not None:
        config["num_hidden_layers"] = layers
        config["max_window_layers"] = min(config["max_window_layers"], layers)
    config = dict(sorted(config.items()))
    shapes = tensor_shapes(config)
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
        total += _write_shard(out_dir / shard, group, rng)
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
    ap = ArgumentParser(description="Write a full-width Qwen2 or Qwen3-MoE checkpoint with random bf16 weights.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-72b")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the real model's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"wrote {make_wide_checkpoint(args.out_dir, args.shape, args.layers, args.seed)}")


if __name__ == "__main__":
    run(main)
