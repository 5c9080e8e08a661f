"""HF tokenizer files (tokenizer.json, tokenizer_config.json) built from a GGUF
vocabulary, for the fixture checkpoints; plus llama.cpp's tokenizer test vectors.

The GGUF keys tokenizer.ggml.{tokens,token_type,merges,pre} are what llama.cpp's
converter wrote from an HF tokenizer; this goes the other way. The pre-tokenizer for
each `tokenizer.ggml.pre` is a table row mirroring the regexes of llama.cpp's
src/llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_*), written as HF's tokenizer.json writes it.

`read_gguf_metadata` is a minimal metadata-only GGUF reader for trusted fixture files:
gguf-py (and so cpuq.open_gguf) takes ~7 s to open a 151936-token vocabulary because
it builds one numpy view per string; this takes a fraction of a second.

Imports tokenizers, numpy, gguf (for enums) and the standard library; not cpuq.
"""
from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGUFValueType, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# The regex HF's Qwen2 tokenizer.json carries; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 is
# this with (?i:...) spelled out as [sS] classes.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _qwen2():
    # Qwen2's tokenizer.json also NFC-normalizes; llama.cpp does not, so NFC-decomposed
    # input is the one place the two can differ (no test vector has any).
    return (normalizers.NFC(),
            pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]))


def _smollm():
    # llama.cpp: "\p{N}" first (every digit alone), then GPT-2's regex; HF spells that
    # Digits(individual_digits) + ByteLevel(use_regex), as SmolLM2's own tokenizer.json does.
    return (None,
            pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]))


# tokenizer.ggml.pre -> (normalizer, pre_tokenizer) for a byte-level BPE ("gpt2") vocab.
PRE_TOKENIZERS = {
    "qwen2": _qwen2,
    "smollm": _smollm,
}

# llama.cpp's converter pads a vocabulary up to the model's vocab_size with these
# (convert_hf_to_gguf.py get_vocab_base); they are not part of the HF tokenizer.
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the one the GGUF's vocabulary came from.

    CONTROL tokens become special added tokens, other USER_DEFINED tokens plain added
    tokens (the inverse of get_vocab_base's typing); converter padding is dropped.
    """
    model = metadata["tokenizer.ggml.model"]
    pre = metadata["tokenizer.ggml.pre"]
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') is supported")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre {pre!r}: no pre-tokenizer row (have {sorted(PRE_TOKENIZERS)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]
    vocab, added = {}, []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == TokenType.USER_DEFINED and _PAD_TOKEN.fullmatch(tok):
            continue
        vocab[tok] = i
        if typ == TokenType.CONTROL:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif typ == TokenType.USER_DEFINED:
            added.append(AddedToken(tok, special=False, normalized=False))
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    for a in added:  # added tokens already in the vocab keep their ids; check nothing moved
        assert tok.token_to_id(a.content) == vocab[a.content], a.content
    return tok


def tokenizer_config(metadata: Mapping[str, Any], tokenizer_class: str, model_max_length: int,
                     eos_token: str | None = None) -> dict:
    """tokenizer_config.json as transformers writes it, from the GGUF's special ids and template.
    `eos_token` overrides the GGUF's (a base vocab like Qwen2's names <|endoftext|>, while
    a ChatML chat model ends turns with <|im_end|>)."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata["tokenizer.ggml.token_type"]

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, (t, typ) in enumerate(zip(tokens, types)) if typ == TokenType.CONTROL}
    eos = eos_token or token("eos")
    return {
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in ("<|im_start|>", "<|im_end|>") if t in tokens],
        "bos_token": token("bos"),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": token("padding"),
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": token("unknown"),
    }


def write_tokenizer_files(out_dir: Path, tokenizer_json: str, config: dict) -> None:
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")


# llama.cpp test vectors ----------------------------------------------------------

def read_vocab_tests(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """The (text, token ids) pairs of `<vocab>.gguf.inp` / `.out`, split exactly as
    llama.cpp's tests/test-tokenizer-0.cpp splits them."""
    inp = Path(str(gguf_path) + ".inp").read_text(encoding="utf-8")
    out = Path(str(gguf_path) + ".out").read_text(encoding="utf-8").split("\n")
    sep = "\n__ggml_vocab_test__\n"
    texts = inp.split(sep)
    if texts and texts[-1] == "":  # the file ends with a separator; C++'s loop stops there
        texts.pop()
    if out and out[-1] == "":
        out.pop()
    if len(texts) != len(out):
        raise ValueError(f"{gguf_path}: {len(texts)} test strings but {len(out)} expected outputs")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, out)]


# metadata-only GGUF reading -------------------------------------------------------

_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key/value of a trusted GGUF file as plain Python values (arrays as
    lists). No validation beyond what struct and numpy do; use cpuq.open_gguf for
    untrusted files."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF v2/v3 file")
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

        def value(vtype, pos):
            if vtype == GGUFValueType.STRING:
                return string(pos)
            if vtype == GGUFValueType.ARRAY:
                item_type, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item_type in _SCALARS:
                    arr = np.frombuffer(buf, dtype=_SCALARS[item_type], count=count, offset=pos)
                    items = arr.astype(bool).tolist() if item_type == GGUFValueType.BOOL else arr.tolist()
                    return items, pos + arr.nbytes
                items = []
                for _ in range(count):
                    item, pos = value(item_type, pos)
                    items.append(item)
                return items, pos
            dt = np.dtype(_SCALARS[vtype])
            v = np.frombuffer(buf, dtype=dt, count=1, offset=pos)[0].item()
            return (bool(v) if vtype == GGUFValueType.BOOL else v), pos + dt.itemsize

        out = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            out[key], pos = value(vtype, pos + 4)
        return out
