"""What a GGUF file holds, as one plain dict: the data behind `cpuq info`, and sizes in words.

Imports from cpuq: arch, errors, gguf_io. Nothing that runs or converts models, so that
`cpuq info` starts without the runtime.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .arch import ModelConfig
from .errors import FormatError, UnsupportedError
from .gguf_io import open_gguf

# Metadata that is too long to show in a summary; shown as its length instead.
_BULKY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges", "tokenizer.chat_template")


def human_bytes(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


def summarize(path: str | os.PathLike, tensors: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of the GGUF file at `path`.

    Keys: path, file_size, gguf_version, architecture, name, parameters, context_length,
    experts (an MoE's {count, used, active_parameters}: per block, per token; else None),
    memory (what a context costs besides the weights: {kv_bytes_per_token (fp16 cache),
    attention_blocks, recurrent_blocks, recurrent_state_bytes (a hybrid's Gated DeltaNet
    states, fixed whatever the context)}; None if the runtime cannot read the metadata),
    tensor_count, tensor_types ({type: count}), tensor_bytes, bits_per_weight,
    tokenizer ({model, pre, n_vocab, bos/eos ids}), chat_template (bool), metadata
    (every scalar key; bulky arrays as their length), and with `tensors=True` a list of
    {name, type, shape, bytes}.
    """
    with open_gguf(path) as f:
        arch = f.get("general.architecture")
        n_params = sum(t.n_elements for t in f)
        tensor_bytes = sum(t.n_bytes for t in f)
        histogram = Counter(t.qtype.name for t in f)
        metadata: dict[str, Any] = {}
        for key in f.keys():
            if key in _BULKY_KEYS or f.array_length(key) > 16:
                metadata[key] = f"<{f.array_length(key) or len(str(f.get(key)))} {'items' if f.array_length(key) else 'chars'}>"
            else:
                metadata[key] = f.get(key)
        experts = None
        n_expert, n_used = (f.get(f"{arch}.expert_count"), f.get(f"{arch}.expert_used_count")) if arch else (0, 0)
        if isinstance(n_expert, int) and isinstance(n_used, int) and n_expert > 0:
            stacked = sum(t.n_elements for t in f if "_exps." in t.name)  # the routed experts' weights
            experts = {"count": n_expert, "used": n_used,
                       "active_parameters": n_params - stacked + stacked * n_used // n_expert}
        try:
            memory = _memory(ModelConfig.from_gguf(f))
        except (FormatError, UnsupportedError):  # info still shows what the file holds
            memory = None
        summary: dict[str, Any] = {
            "path": str(path),
            "file_size": f.file_size,
            "gguf_version": f.version,
            "architecture": arch,
            "name": f.get("general.name"),
            "parameters": n_params,
            "context_length": f.get(f"{arch}.context_length") if arch else None,
            "experts": experts,
            "memory": memory,
            "tensor_count": len(f.tensors),
            "tensor_types": dict(histogram.most_common()),
            "tensor_bytes": tensor_bytes,
            "bits_per_weight": round(8.0 * tensor_bytes / n_params, 4) if n_params else None,
            "tokenizer": {
                "model": f.get("tokenizer.ggml.model"),
                "pre": f.get("tokenizer.ggml.pre"),
                "n_vocab": f.array_length("tokenizer.ggml.tokens") or None,
                "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
            },
            "chat_template": "tokenizer.chat_template" in f.keys(),
            "metadata": metadata,
        }
        if tensors:
            summary["tensors"] = [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.n_bytes}
                                  for t in f]
    return summary


def _memory(cfg: ModelConfig) -> dict[str, int]:
    recurrent = cfg.n_layer - cfg.n_attention_layers
    state = (cfg.ssm_d_conv - 1) * cfg.ssm_conv_dim + cfg.ssm_dt_rank * cfg.ssm_d_state * cfg.ssm_head_v_dim
    return {"kv_bytes_per_token": cfg.kv_bytes_per_token(2), "attention_blocks": cfg.n_attention_layers,
            "recurrent_blocks": recurrent, "recurrent_state_bytes": 4 * recurrent * state if recurrent else 0}
