"""HF tokenizer files (tokenizer.json, tokenizer_config.json) built from a GGUF
vocabulary, for the fixture checkpoints; plus llama.cpp's tokenizer test vectors.

The GGUF keys tokenizer.ggml.{tokens,token_type,merges,pre} are what llama.cpp's
converter wrote from an HF tokenizer; this goes the other way. The tokenizer itself is
cpuq's (cpuq.runtime.tokenizer: the pre-tokenizer rows mirror the regexes of llama.cpp's
src/llama-vocab.cpp); this adds what HF's tokenizer.json has and llama.cpp does not:
Qwen2's NFC normalizer, no converter padding, the file's token types as they are.

`read_gguf_metadata` is a minimal metadata-only GGUF reader for trusted fixture files.

Imports cpuq.runtime.tokenizer, tokenizers, numpy, gguf (for enums) and the standard library.
"""
from __future__ import annotations

import json
import mmap
import re
import struct
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGUFValueType, TokenType
from tokenizers import Tokenizer, normalizers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cpuq.runtime.tokenizer import Vocab, build_hf_tokenizer  # noqa: E402

# tokenizer.ggml.pre -> the normalizer HF's tokenizer.json has and llama.cpp does not
# apply. Qwen2's tokenizer NFC-normalizes, so NFC-decomposed input is the one place the
# HF files and llama.cpp (and cpuq's runtime) can differ; no test vector has any.
HF_NORMALIZERS = {
    "qwen2": normalizers.NFC,
}

# llama.cpp's converter pads a vocabulary up to the model's vocab_size with these
# (convert_hf_to_gguf.py get_vocab_base); they are not part of the HF tokenizer.
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the one the GGUF's vocabulary came from.

    CONTROL tokens become special added tokens, other USER_DEFINED tokens plain added
    tokens (the inverse of get_vocab_base's typing); converter padding is dropped. Unlike
    cpuq's runtime tokenizer, the file's token types are kept as written (llama.cpp makes
    e.g. Qwen2's "</s>" a control token by its text; HF's tokenizer does not).
    """
    vocab = Vocab.from_metadata(metadata)
    padding = [i for i, (tok, typ) in enumerate(zip(vocab.tokens, vocab.types.tolist()))
               if typ in (TokenType.USER_DEFINED, TokenType.UNUSED) and _PAD_TOKEN.fullmatch(tok)]
    tok = build_hf_tokenizer(vocab, exclude=padding, types=vocab.types)
    if vocab.pre in HF_NORMALIZERS:
        tok.normalizer = HF_NORMALIZERS[vocab.pre]()
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
