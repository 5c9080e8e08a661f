"""The tokenizer.* GGUF keys of an HF checkpoint with a byte-level BPE tokenizer.json
(Qwen2/Qwen3, Llama-3, SmolLM), as llama.cpp's `_set_vocab_gpt2` + `SpecialVocab` write
them (TextModel.get_vocab_base and get_vocab_base_pre, gguf-py's SpecialVocab; see
docs/llama_cpp_conventions.md section 1.7).

Reads tokenizer.json with the `tokenizers` library (not transformers). Imports only the
standard library, tokenizers, gguf-py's enums and cpuq.errors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from ..errors import FormatError, UnsupportedError

# The text llama.cpp tokenizes to recognise a pre-tokenizer (chktxt in TextModel.get_vocab_base_pre).
CHK_TXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# sha256 of str(token ids of CHK_TXT) -> tokenizer.ggml.pre (TextModel.get_vocab_base_pre; only the
# entries for the families cpuq converts).
PRE_BY_HASH: dict[str, str] = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",             # Qwen1.5/2/2.5/3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",             # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",         # Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}

# llama.cpp token types (gguf-py constants TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Special-token kinds in SpecialVocab's order (SpecialVocab.__init__) and their GGUF keys; `cls` has
# no key and is skipped when writing (SpecialVocab.add_to_gguf).
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id"}
ADD_KEYS = {"bos": "tokenizer.ggml.add_bos_token", "eos": "tokenizer.ggml.add_eos_token",
            "sep": "tokenizer.ggml.add_sep_token"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {str(e).splitlines()[0]}") from None


def _looks_special(text: str) -> bool:
    """llama.cpp's TextModel.does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


@dataclass(frozen=True)
class TokenizerFiles:
    """What the converter reads of a checkpoint's tokenizer files for a vocabulary of n_vocab
    rows: a function of those alone, not of config.json's other keys."""
    tok_path: Path
    tok_json: dict         # tokenizer.json
    cfg_path: Path
    tok_config: dict       # tokenizer_config.json, {} if absent or not an object
    tokens: list[str]      # n_vocab of them, "[PADi]" where the tokenizer has no id i (TextModel.get_vocab_base)
    types: list[int]
    merges: list[str]      # as "a b" (SpecialVocab._try_load_from_tokenizer_json)
    chkhsh: str            # sha256 of CHK_TXT's token ids: names the pre-tokenizer
    template: Any          # tokenizer_config's chat_template, else chat_template.jinja's text, else None


def read_tokenizer_files(src_dir: Path, n_vocab: int) -> TokenizerFiles:
    """Read and check tokenizer.json and tokenizer_config.json (and chat_template.jinja)."""
    from tokenizers import Tokenizer

    if (src_dir / "tokenizer.model").is_file():
        # llama.cpp would take its SentencePiece path (tokenizer.ggml.model "llama", scores).
        raise UnsupportedError(f"{src_dir}: has tokenizer.model; SentencePiece vocabularies are not supported")
    tok_path = src_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise UnsupportedError(f"{src_dir}: no tokenizer.json (only HF fast BPE tokenizers are supported)")
    tok_json = _read_json(tok_path)
    model = tok_json.get("model") if isinstance(tok_json, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedError(f"{tok_path}: model is not a BPE vocabulary (only byte-level BPE is supported)")
    if model.get("byte_fallback"):
        # Llama-2-style HF BPE: llama.cpp writes it as tokenizer.ggml.model "llama" (gguf-py's LlamaHfVocab).
        raise UnsupportedError(f"{tok_path}: BPE with byte_fallback (Llama-2 style) is not supported")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise FormatError(f"{tok_path}: cannot load: {str(e).splitlines()[0]}") from None
    cfg_path = src_dir / "tokenizer_config.json"
    tok_config = _read_json(cfg_path) if cfg_path.is_file() else {}
    if not isinstance(tok_config, dict):
        tok_config = {}
    # tokens and types (TextModel.get_vocab_base)
    reverse = {i: s for s, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in tok_json.get("added_tokens") or []}
    if reverse and max(reverse) >= n_vocab:
        raise FormatError(f"{tok_path}: token id {max(reverse)} is outside vocab_size {n_vocab} of config.json")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    # merges (SpecialVocab._try_load_from_tokenizer_json)
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2:
            merges.append(" ".join(part.replace(" ", "\u0120") for part in m))
        else:
            raise FormatError(f"{tok_path}: merge entry {m!r} is neither 'a b' nor ['a', 'b']")
    ids = tokenizer.encode(CHK_TXT, add_special_tokens=True).ids
    template = tok_config.get("chat_template")
    if template is None and (src_dir / "chat_template.jinja").is_file():
        template = (src_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return TokenizerFiles(tok_path, tok_json, cfg_path, tok_config, tokens, types, merges,
                          hashlib.sha256(str(ids).encode()).hexdigest(), template)


def tokenizer_metadata(src_dir: Path, n_vocab: int, config: dict, arch: str) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    """(values, explicit types) of every tokenizer.* key, in the converter's order.
    `arch` is the GGUF architecture name (llama adds its own keys, LlamaModel.set_vocab)."""
    files = read_tokenizer_files(src_dir, n_vocab)
    tok_path, tok_json, tok_config = files.tok_path, files.tok_json, files.tok_config

    chkhsh = files.chkhsh
    pre = PRE_BY_HASH.get(chkhsh)
    if pre is None:
        raise UnsupportedError(f"{tok_path}: pre-tokenizer not recognised (chkhsh {chkhsh}); "
                               f"known: {', '.join(sorted(set(PRE_BY_HASH.values())))}")

    values: dict[str, Any] = {}
    if arch == "llama" and tok_config.get("add_prefix_space") is not None:  # written first (LlamaModel.set_vocab)
        values["tokenizer.ggml.add_space_prefix"] = bool(tok_config["add_prefix_space"])
    values |= {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": list(files.tokens),  # copies: files may be shared (a memo)
        "tokenizer.ggml.token_type": list(files.types),
    }
    vtypes = {"tokenizer.ggml.token_type": GGUFValueType.ARRAY, "tokenizer.ggml.token_type[]": GGUFValueType.INT32}

    if files.merges:
        values["tokenizer.ggml.merges"] = list(files.merges)

    # special ids: tokenizer_config first, then config.json; the first set wins
    # (SpecialVocab._load, _set_special_token)
    special: dict[str, int] = {}
    added_by_content: dict[str, int] = {}
    for t in tok_json.get("added_tokens") or []:
        added_by_content.setdefault(t.get("content"), t["id"])
    if tok_config:
        for kind in SPECIAL_KINDS:
            entry = tok_config.get(f"{kind}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str) and content in added_by_content:
                special.setdefault(kind, added_by_content[content])
    for kind in SPECIAL_KINDS:
        tid = config.get(f"{kind}_token_id")
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0:
            special.setdefault(kind, tid)
    for kind, tid in special.items():
        if kind in SPECIAL_KEYS:
            values[SPECIAL_KEYS[kind]] = tid
            vtypes[SPECIAL_KEYS[kind]] = GGUFValueType.UINT32

    # add_bos/add_eos from the post-processor, then tokenizer_config (SpecialVocab._try_load_from_tokenizer_json)
    add: dict[str, bool] = {}
    post = tok_json.get("post_processor") or {}
    procs = post.get("processors", [post]) if isinstance(post, dict) else []
    bos_text = next((t for t, i in added_by_content.items() if i == special.get("bos")), None)
    eos_text = next((t for t, i in added_by_content.items() if i == special.get("eos")), None)
    for proc in procs:
        kind = proc.get("type") if isinstance(proc, dict) else None
        if kind == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            add["bos"] = first is not None and first == bos_text
            add["eos"] = last is not None and last == eos_text
    for kind in ("bos", "eos", "sep"):
        flag = tok_config.get(f"add_{kind}_token")
        if isinstance(flag, bool):
            add.setdefault(kind, flag)
    for kind, flag in add.items():
        values[ADD_KEYS[kind]] = flag

    template = files.template
    if isinstance(template, str) and template:
        values["tokenizer.chat_template"] = template
    elif template is not None and not isinstance(template, str):
        raise UnsupportedError(f"{files.cfg_path}: chat_template lists named templates; only one template is supported")
    if arch == "llama" and n_vocab == 49152:
        # SmolLM/SmolLM2/granite: LlamaModel.set_vocab forces add_bos off;
        # a dict update keeps an existing key's position, as gguf-py's re-add does, else appends.
        values["tokenizer.ggml.add_bos_token"] = False
    return values, vtypes
