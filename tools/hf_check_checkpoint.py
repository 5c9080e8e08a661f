"""Load an HF checkpoint directory with transformers and report on it as JSON: what
loaded (missing / unexpected keys), a fingerprint of every parameter, the tokenizer's
ids for given texts, and optionally a greedy chat answer.

Runs under the separate torch + transformers venv (CPUQ_HF_VENV, default
~/.cache/cpuq-peer/hf-venv, built by tools/peer_env.sh), never under cpuq's: the tests call
it in a subprocess.

    hf-venv/bin/python tools/hf_check_checkpoint.py DIR [--texts FILE.json]
                       [--chat "What is the capital of France?"] [--max-new-tokens 32]

Imports torch, transformers and the standard library only.
"""
from __future__ import annotations

import json
import sys

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from toolcli import ArgumentParser, ToolError, run


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--texts", help="JSON list of strings to tokenize (no special tokens added)")
    ap.add_argument("--chat", help="a user message to answer greedily through the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    # transformers 5 picks the tokenizer class from model_type for some types (qwen2 among
    # them) and rebuilds that family's pre-tokenizer; "file" takes tokenizer.json as written.
    ap.add_argument("--tokenizer", choices=["auto", "file"], default="auto",
                    help="AutoTokenizer, or PreTrainedTokenizerFast on tokenizer.json")
    args = ap.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        raise ToolError(f"{args.model_dir}: no config.json: not an HF checkpoint folder")

    torch.manual_seed(0)
    model, info = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                       output_loading_info=True)
    model.eval()
    auto_tok = AutoTokenizer.from_pretrained(args.model_dir)
    file_tok = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    tok = auto_tok if args.tokenizer == "auto" else file_tok
    report: dict = {
        "class": type(model).__name__,
        "tokenizer_class": type(auto_tok).__name__,
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": [str(k) for k in info.get("mismatched_keys", [])],
        "tied": model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
        # float64 sum and the first values of every parameter, to compare with cpuq's reader
        "params": {name: {"shape": list(p.shape), "sum": float(p.double().sum()),
                          "head": p.detach().reshape(-1)[:4].tolist()}
                   for name, p in model.state_dict().items()},
    }
    with torch.no_grad():
        ids = tok("Hello, world!", return_tensors="pt").input_ids
        logits = model(ids).logits
    report["logits_shape"] = list(logits.shape)
    report["logits_finite"] = bool(torch.isfinite(logits).all())
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = json.load(f)
        report["encodings"] = [auto_tok(t, add_special_tokens=False).input_ids for t in texts]
        report["encodings_file"] = [file_tok(t, add_special_tokens=False).input_ids for t in texts]
    if args.chat:
        messages = [{"role": "user", "content": args.chat}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
        report["prompt"] = prompt
        report["answer"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    run(main)
