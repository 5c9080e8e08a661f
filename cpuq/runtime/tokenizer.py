"""The tokenizer of a GGUF model: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) built
from the file's `tokenizer.ggml.*` metadata with the `tokenizers` library, behaving as
llama.cpp's llama_vocab does (src/llama-vocab.cpp; version pinned in docs/llama_cpp_conventions.md):

* the pre-tokenizer is a row of PRE_TOKENIZERS, chosen by `tokenizer.ggml.pre` through
  PRE_NAMES: llama.cpp's regexes for that LLAMA_VOCAB_PRE_TYPE_*, applied in order, each
  isolating its matches (HF's Split "Isolated"), then GPT-2's byte-to-unicode map;
* CONTROL and UNKNOWN tokens are matched in text only when asked (`special=True`),
  USER_DEFINED tokens always (llama.cpp tokenizer_st_partition); both keep their ids;
* decoding renders CONTROL/UNKNOWN tokens only when asked, USER_DEFINED tokens as their
  text, UNUSED tokens as nothing (llama_vocab::token_to_piece);
* the end-of-generation set is collected as llama_vocab::impl::load collects special_eog_ids.

Encoding runs in `tokenizers`; decoding is a per-token bytes table here, so a stream of
ids can be turned into text without ever splitting a UTF-8 character (StreamDecoder).

Where this differs from llama.cpp: no `clean_spaces` (llama.cpp's whole-text detokenizer
drops the space before punctuation for some pre-tokenizers, never for qwen2/smollm; its
per-token pieces, which generation streams, have none); `add_eos_token` is read, not
applied; a NORMAL token with a character outside GPT-2's byte map decodes to its own UTF-8
(as in HF) rather than llama.cpp's "[UNK_BYTE_0x...]" marker; missing bos/eos ids are
None, not llama.cpp's default 11. Where HF's tokenizer.json differs from llama.cpp (Qwen2's
NFC normalizer), this follows llama.cpp.

Imports from cpuq: errors, and gguf_io for the GGUFFile type. Nothing from model, kernels,
convert or the CLI.
"""
from __future__ import annotations

import dataclasses

import codecs
import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from ..errors import FormatError, InputError, UnsupportedError, abbreviated as _show

if TYPE_CHECKING:
    from ..gguf_io import GGUFFile

# llama.cpp token types (LLAMA_TOKEN_TYPE_*, gguf-py TokenType); 0 is UNDEFINED.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)


# pre-tokenizers ------------------------------------------------------------------------

# llama.cpp's regexes (llm_tokenizer_bpe's constructor), verbatim. Where llama.cpp
# "adapted" HF's (?i:'s|'t|...) into [sS] classes, the adapted form is used: it is what
# llama.cpp runs, and Oniguruma reads both.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One LLAMA_VOCAB_PRE_TYPE_*: its regexes and the flags llama_vocab::impl::load sets
    with it that change how text becomes ids."""
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself in the vocabulary is one token
    add_bos: bool = False        # the default of tokenizer.ggml.add_bos_token


# LLAMA_VOCAB_PRE_TYPE_* -> row; rows that share regexes in llama.cpp's switch share them here.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "DEFAULT": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "LLAMA3": PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "DBRX": PreTokenizer((_LLAMA3,)),  # and SMAUG: LLAMA3's regex, BPE merges as usual
    "FALCON": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "STARCODER": PreTokenizer((r"\p{N}", _GPT2)),  # and REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, ...
    "GPT2": PreTokenizer((_GPT2,)),  # and MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    "QWEN2": PreTokenizer((_QWEN2,)),  # and STABLELM2, HUNYUAN, SOLAR_OPEN
    "QWEN35": PreTokenizer((_QWEN35,)),
}

# tokenizer.ggml.pre -> PRE_TOKENIZERS row, as llama_vocab::impl::load's `tokenizer_pre ==`
# chain maps them. Only names whose every encoding flag a row carries are listed (chatglm,
# tekken, deepseek-*, gemma4, ... are not); a missing key means "default", as in llama.cpp.
PRE_NAMES: dict[str, str] = {
    "default": "DEFAULT",
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], "LLAMA3"),
    "dbrx": "DBRX", "smaug-bpe": "DBRX",
    "falcon": "FALCON",
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    "STARCODER"),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"],
                    "GPT2"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open"], "QWEN2"),
    "qwen35": "QWEN35",
}


# special-token rules of llama_vocab::impl::load ----------------------------------------

# Tokens llama.cpp recognises by text and forces to CONTROL ("control-looking token ... its
# type will be overridden"): the EOT/EOM/FIM candidates.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_FIM_TEXTS = {  # metadata key suffix -> texts
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Texts that end generation (special_eog_ids), also forced to CONTROL. The o200k-harmony,
# solar-open and gemma4 exceptions llama.cpp makes afterwards concern vocabularies whose
# pre-tokenizers are not supported here.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
# FIM tokens that end generation too (special_fim_{pad,rep,sep}_id).
_EOG_FIM = ("fim_pad", "fim_rep", "fim_sep")

_KEY = "tokenizer.ggml."
_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", *_FIM_TEXTS)  # + "_token_id"


# GPT-2's byte <-> printable-unicode map (HF ByteLevel, llama.cpp unicode_byte_to_utf8) ------

def _bytes_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()
# str.translate table: each byte's printable char -> the char whose latin-1 code is the byte.
_UNBYTE = {ord(c): chr(b) for b, c in _BYTE_CHARS.items()}
_BYTE_CHAR_SET = frozenset(_BYTE_CHARS.values())


def _piece_bytes(text: str) -> bytes:
    """The bytes a NORMAL byte-level token stands for. A token with a char outside the map
    (a malformed vocabulary) is its own UTF-8, as HF's ByteLevel decoder does; llama.cpp
    writes an [UNK_BYTE_...] marker there instead."""
    if not _BYTE_CHAR_SET.issuperset(text):
        return text.encode("utf-8")
    return text.translate(_UNBYTE).encode("latin-1")


# metadata -> validated vocabulary ----------------------------------------------------------

@dataclass(frozen=True)
class Vocab:
    """The tokenizer.ggml.* metadata of a byte-level BPE vocabulary, checked."""
    tokens: Sequence[str]      # a list; a Tokenizer's reads them back from `tokenizers` (_TokenTexts)
    types: np.ndarray          # int8 (n_vocab,): tokenizer.ggml.token_type as written
    attrs: np.ndarray          # int8 (n_vocab,): the types after llama.cpp's by-text overrides (used here)
    merges: list[tuple[str, str]]
    pre: str                   # tokenizer.ggml.pre as written ("default" when absent)
    pre_tokenizer: PreTokenizer
    ids: dict[str, int]        # "bos", "eos", "eot", ... -> id, for the keys present
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]
    index: Mapping[str, int]   # token text -> id; a dict, or a Tokenizer's _TokenIds

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str = "metadata") -> "Vocab":
        """Check the tokenizer.ggml.* keys of `metadata` (a GGUF's, or any mapping of them).
        FormatError names the key at fault, UnsupportedError a model or pre it lacks."""
        def where(key: str) -> str:
            return f"{source}: metadata key '{key}'"

        def require(key: str) -> Any:
            if key not in metadata:
                raise FormatError(f"{where(key)} is missing")
            return metadata[key]

        model = require(_KEY + "model")
        if not isinstance(model, str):
            raise FormatError(f"{where(_KEY + 'model')} is {type(model).__name__}, expected str")
        if model != "gpt2":
            raise UnsupportedError(f"{source}: tokenizer.ggml.model {_show(model)} is not supported (only byte-level "
                                   f"BPE, 'gpt2')")
        pre = metadata.get(_KEY + "pre") or "default"  # llama.cpp: missing or empty -> default
        if not isinstance(pre, str):
            raise FormatError(f"{where(_KEY + 'pre')} is {type(pre).__name__}, expected str")
        if pre not in PRE_NAMES:
            raise UnsupportedError(f"{source}: tokenizer.ggml.pre {_show(pre)} is not supported (supported: "
                                   f"{', '.join(sorted(PRE_NAMES))})")
        pre_tokenizer = PRE_TOKENIZERS[PRE_NAMES[pre]]

        tokens = _string_list(require(_KEY + "tokens"), where(_KEY + "tokens"))
        n_vocab = len(tokens)
        if n_vocab == 0:
            raise FormatError(f"{where(_KEY + 'tokens')} is empty")
        index = dict(zip(tokens, range(n_vocab)))
        if "" in index:  # (one lookup, not a scan of the 151k tokens)
            for i in [i for i, t in enumerate(tokens) if not t]:
                tokens[i] = f"[EMPTY_{i}]"  # as llama.cpp names them
            index = dict(zip(tokens, range(n_vocab)))
        if len(index) != n_vocab:  # llama.cpp asserts on this
            first: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in first:
                    raise FormatError(f"{where(_KEY + 'tokens')} holds {_show(t)} twice (ids {first[t]} and {i})")
                first[t] = i

        types = _token_types(metadata.get(_KEY + "token_type"), n_vocab, where(_KEY + "token_type"))
        merges = _merges(require(_KEY + "merges"), where(_KEY + "merges"))

        ids = {}
        for name in _ID_KEYS:
            key = f"{_KEY}{name}_token_id"
            if key in metadata:
                ids[name] = _token_id(metadata[key], n_vocab, where(key))
        add_bos = _flag(metadata, _KEY + "add_bos_token", pre_tokenizer.add_bos, where)
        add_eos = _flag(metadata, _KEY + "add_eos_token", False, where)
        if add_bos and "bos" not in ids:
            raise FormatError(f"{where(_KEY + 'bos_token_id')} is missing but BOS is to be added "
                              f"(tokenizer.ggml.add_bos_token or pre {pre!r})")

        # llama_vocab::impl::load: EOT/EOM/FIM found by text when their key is absent, and
        # every such token and every EOG text made CONTROL.
        found = dict(ids)
        controls = []
        for name, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",)), *_FIM_TEXTS.items()):
            hits = [index[t] for t in texts if t in index]
            if name not in found and hits:  # llama.cpp takes one (in hash order) and forces only it
                found[name] = hits[0]
                controls.append(hits[0])
        eog = {index[t] for t in _EOG_TEXTS if t in index}
        controls += eog
        eog |= {found[n] for n in ("eos", "eot", "eom", *_EOG_FIM) if n in found}
        attrs = types.copy()
        if controls:
            attrs[np.array(controls)] = CONTROL
        return cls(tokens, types, attrs, merges, pre, pre_tokenizer, ids, add_bos, add_eos, frozenset(eog), index)


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise FormatError(f"{where} is {type(value).__name__}, expected an array of strings")
    if not set(map(type, value)) <= {str}:
        i = next(i for i, v in enumerate(value) if not isinstance(v, str))
        raise FormatError(f"{where}[{i}] is {type(value[i]).__name__}, expected str")
    return list(value)


def _token_types(value: Any, n_vocab: int, where: str) -> np.ndarray:
    if value is None:  # llama.cpp: every token NORMAL
        return np.full(n_vocab, NORMAL, np.int8)
    if isinstance(value, (list, tuple)) and not set(map(type, value)) <= {int}:
        raise FormatError(f"{where} holds a value that is not an integer")
    arr = np.asarray(value)
    if arr.ndim != 1 or (len(arr) and arr.dtype.kind not in "iu"):
        raise FormatError(f"{where} is not an array of integers")
    if len(arr) != n_vocab:
        raise FormatError(f"{where} has {len(arr)} entries for {n_vocab} tokens")
    bad = np.flatnonzero((arr < UNDEFINED) | (arr > BYTE))
    if len(bad):
        raise FormatError(f"{where}[{bad[0]}] is {arr[bad[0]]}, not a token type (0..{BYTE})")
    return arr.astype(np.int8)


def _merges(value: Any, where: str) -> list[tuple[str, str]]:
    merges = _string_list(value, where)
    # llama.cpp splits each merge at the first space after its first character
    # (word.find(' ', 1)). Byte-level tokens hold no spaces, so a merge is almost always
    # "left right" with one space: that case is split for all merges at once.
    if set(map(str.count, merges, repeat(" "))) == {1}:
        flat = " ".join(merges).split(" ")
        if all(flat[0::2]):
            return list(zip(flat[0::2], flat[1::2]))
    out = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"{where}[{i}] is {_show(m)}, not two tokens separated by a space")
        out.append((m[:cut], m[cut + 1:]))
    return out


def _token_id(value: Any, n_vocab: int, where: str) -> int:
    if isinstance(value, (np.integer,)):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{where} is {type(value).__name__}, expected an integer token id")
    if not 0 <= value < n_vocab:
        raise FormatError(f"{where} is {value}, outside the vocabulary of {n_vocab} tokens")
    return value


def _flag(metadata: Mapping[str, Any], key: str, default: bool, where) -> bool:
    value = metadata.get(key, default)
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, bool):
        raise FormatError(f"{where(key)} is {type(value).__name__}, expected bool")
    return value


# the HF tokenizer ----------------------------------------------------------------------

def build_hf_tokenizer(vocab: Vocab, exclude: Iterable[int] = (), types: np.ndarray | None = None,
                       source: str = "metadata") -> _HFTokenizer:
    """A `tokenizers.Tokenizer` that encodes as llama.cpp does with this vocabulary.
    CONTROL/UNKNOWN tokens are special added tokens, USER_DEFINED tokens plain added
    tokens; both keep their ids because they are in the BPE vocabulary too.
    The fixture tools, which write an HF tokenizer.json, pass `exclude` (ids to leave out:
    the converter's padding) and `types` (the file's types instead of llama.cpp's `attrs`).
    FormatError if `tokenizers` rejects the merges (a merge of tokens it does not have)."""
    exclude = set(exclude)
    tokens = vocab.tokens
    types = vocab.attrs if types is None else types
    if exclude:
        bpe_vocab = {t: i for i, t in enumerate(tokens) if i not in exclude}
    else:
        bpe_vocab = vocab.index
    # The Python constructor, not Tokenizer.from_str: a 151k vocabulary builds in 0.15 s
    # this way and in 0.45 s through JSON.
    try:
        model = models.BPE(vocab=bpe_vocab, merges=vocab.merges, unk_token=None, fuse_unk=False,
                           byte_fallback=False, ignore_merges=vocab.pre_tokenizer.ignore_merges)
    except Exception as e:  # tokenizers raises plain Exception with the reason
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{source}: metadata key 'tokenizer.ggml.merges' does not fit the vocabulary: {msg}") \
            from None
    tok = _HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in vocab.pre_tokenizer.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [i for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN) | (types == USER_DEFINED)).tolist()
             if i not in exclude]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in added if types[i] != USER_DEFINED])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in added if types[i] == USER_DEFINED])
    return tok


class _Pieces:
    """What each token adds to decoded text (control tokens rendered): NORMAL and BYTE
    tokens through the byte map, CONTROL/UNKNOWN/USER_DEFINED as their text, UNUSED and
    UNDEFINED nothing (llama_vocab::token_to_piece). Worked out per token on first use:
    all 150k at load took 0.08 s of the time to first token, and a reply uses a few hundred."""

    def __init__(self, vocab: Vocab):
        self._tokens, self._attrs = vocab.tokens, vocab.attrs
        self._done: list[bytes | None] = [None] * len(vocab.tokens)

    def __getitem__(self, i: int) -> bytes:
        piece = self._done[i]
        if piece is None:
            kind = self._attrs[i]
            if kind == NORMAL or kind == BYTE:
                piece = _piece_bytes(self._tokens[i])
            elif kind == CONTROL or kind == UNKNOWN or kind == USER_DEFINED:
                piece = self._tokens[i].encode("utf-8")
            else:
                piece = b""
            self._done[i] = piece
        return piece


class _TokenTexts(Sequence[str]):
    """Vocab.tokens read back from the built tokenizer, which holds them anyway: as a Python
    list (and Vocab.index as a dict) a 151k vocabulary kept ~17 MiB resident for nothing."""

    def __init__(self, hf: _HFTokenizer, n_vocab: int):
        self._hf, self._n = hf, n_vocab

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._hf.id_to_token(i % self._n)


class _TokenIds(Mapping[str, int]):
    """Vocab.index (token text -> id) read back from the built tokenizer."""

    def __init__(self, hf: _HFTokenizer, n_vocab: int):
        self._hf, self._n = hf, n_vocab

    def __getitem__(self, text: str) -> int:
        i = self._hf.token_to_id(text) if isinstance(text, str) else None
        if i is None:
            raise KeyError(text)
        return i

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        return (self._hf.id_to_token(i) for i in range(self._n))


# the tokenizer ---------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary.

        tok = Tokenizer.from_gguf(cpuq.open_gguf(path))
        ids = tok.encode("<|im_start|>user\\nhi<|im_end|>", special=True)
        text = tok.decode(ids)                      # control tokens skipped
        dec = tok.stream_decoder(); parts = [dec.feed(i) for i in ids] + [dec.flush()]
    """

    def __init__(self, vocab: Vocab, source: str = "metadata"):
        self.source = source
        self._hf = build_hf_tokenizer(vocab, source=source)
        # The BPE model holds the merges, tokens and ids now; as Python objects they are
        # ~26 MiB (merges) and ~17 MiB (tokens, index) of a 151k vocabulary's resident memory.
        vocab = dataclasses.replace(vocab, merges=[], tokens=_TokenTexts(self._hf, vocab.n_vocab),
                                    index=_TokenIds(self._hf, vocab.n_vocab))
        self.vocab = vocab
        self._hf_lock = threading.Lock()  # encode_special_tokens is a setting of the shared object
        self._special = (vocab.attrs == CONTROL) | (vocab.attrs == UNKNOWN)
        self._pieces = _Pieces(vocab)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str = "metadata") -> "Tokenizer":
        """From a mapping of tokenizer.ggml.* keys to values (a GGUF's metadata, or a dict);
        `source` names it in error messages."""
        with _gc_paused():
            return cls(Vocab.from_metadata(metadata, source), source)

    @classmethod
    def from_gguf(cls, gguf_file: "GGUFFile") -> "Tokenizer":
        """From an open GGUFFile (cpuq.open_gguf); reads only the tokenizer.ggml.* keys."""
        with _gc_paused():
            metadata = {k: gguf_file.get(k) for k in gguf_file.keys() if k.startswith(_KEY)}
            return cls.from_metadata(metadata, str(gguf_file.path))

    # properties ------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids.get("eos")

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation (llama.cpp's special_eog_ids): eos/eot/eom from the
        metadata, tokens such as <|im_end|>, <|endoftext|>, <|eot_id|> by their text, and the
        FIM pad/repo/file-separator tokens."""
        return self.vocab.eog_ids

    @property
    def add_bos(self) -> bool:
        """Whether encode() prepends BOS by default (tokenizer.ggml.add_bos_token, else the
        pre-tokenizer's default: true only for llama-bpe and its aliases)."""
        return self.vocab.add_bos

    def token_text(self, token: int) -> str:
        """The token as the vocabulary spells it (byte-level form: "Ġhello", "<|im_end|>")."""
        return self.vocab.tokens[self._check(token)]

    def token_bytes(self, token: int) -> bytes:
        """What the token adds to decoded output, control tokens rendered."""
        return self._pieces[self._check(token)]

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled `text` in the vocabulary, or None."""
        return self.vocab.index.get(text)

    def is_special(self, token: int) -> bool:
        """A control (or unknown) token: never produced from plain text, skipped when
        decoding unless asked for."""
        return bool(self._special[self._check(token)])

    def _check(self, token: int) -> int:
        if not 0 <= token < self.vocab.n_vocab:
            raise InputError(f"token id {token} is outside the vocabulary of {self.vocab.n_vocab} tokens")
        return token

    # text -> ids -----------------------------------------------------------------------
    def encode(self, text: str | bytes, special: bool = False, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (a str, or bytes of UTF-8: see utf8_text). special=True parses
        control tokens written in the text ("<|im_start|>") as single tokens; special=False
        spells them out as plain text, so user text can never produce a control id.
        add_bos: None follows the file."""
        text = utf8_text(text)
        if add_bos is None:
            add_bos = self.vocab.add_bos
        with self._hf_lock:
            self._hf.encode_special_tokens = not special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise InputError(f"{self.source}: no BOS token (tokenizer.ggml.bos_token_id) to add")
            ids.insert(0, self.bos_id)
        return ids

    # ids -> text -----------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int], special: bool = False) -> bytes:
        n = self.vocab.n_vocab
        pieces, is_special = self._pieces, self._special
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise InputError(f"token id {i} is outside the vocabulary of {n} tokens")
            if special or not is_special[i]:
                out.append(pieces[i])
        return b"".join(out)

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of `ids`; control tokens are skipped unless special=True. Bytes that are not
        valid UTF-8 (a character cut off at the end) become U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


def utf8_text(text: str | bytes | bytearray, what: str = "text") -> str:
    """`text` as a str that UTF-8 can encode: a str without lone surrogates (U+D800..U+DFFF,
    what undecodable bytes become under Python's surrogateescape, as in sys.argv), or bytes
    of valid UTF-8. InputError naming `what` and the position otherwise: a tokenizer would
    otherwise fail deep inside, or (llama.cpp) silently turn the bad bytes into U+FFFD."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str (or UTF-8 bytes), not {type(text).__name__}")
    try:
        text.encode("utf-8")  # fast for valid text; the error gives the first bad position
    except UnicodeEncodeError as e:
        raise InputError(f"{what}: lone surrogate U+{ord(text[e.start]):04X} at character {e.start} is not valid "
                         f"Unicode (from undecodable bytes? decode them with errors='replace')") from None
    return text


@contextmanager
def _gc_paused():
    """Building a vocabulary makes ~10^6 small strings and tuples that all stay alive; the
    cyclic collector's passes over them would add a third to the build time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class StreamDecoder:
    """Ids in, one at a time; out, the text that is complete so far. Bytes of a character
    that spans tokens are held back until the character is whole, so no chunk ever holds a
    broken character; bytes that can never form one (a stray continuation byte, a lead
    byte followed by a non-continuation) become U+FFFD as soon as that is certain, and
    flush() ends the stream (incomplete bytes become U+FFFD). Every chunk is valid Unicode
    (no lone surrogates), and the chunks of a stream concatenate to Tokenizer.decode of the
    same ids."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes((token,), self._special))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
