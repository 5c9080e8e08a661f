"""cpuq.runtime.tokenizer against references we did not write: llama.cpp's tokenizer test
vectors (ggml-vocab-qwen2.gguf.inp/.out, which llama.cpp's test-tokenizer-0 checks itself
against), llama.cpp's own answers for the demo model's vocabulary, and, under `peer`,
llama.cpp itself (llama-cpp-python in the peer venv: tokenize, token_to_piece, is_eog for
every vocabulary with test vectors in llama.cpp's models/) and HF transformers' tokenizer
for a checkpoint that cpuq.convert turns into the GGUF.

Small vocabularies for the error cases are built here from GPT-2's byte map.
"""
from __future__ import annotations

import json
import subprocess
import unicodedata
from pathlib import Path

import pytest

import cpuq
import hf_tokenizer
from cpuq import FormatError, GGUFStreamWriter, InputError, UnsupportedError, open_gguf
from cpuq.runtime.tokenizer import PRE_NAMES, StreamDecoder, Tokenizer, Vocab, _TokenIds, _TokenTexts
from make_tiny_checkpoint import QWEN2_VOCAB, make_tiny_checkpoint
from tests.convert.test_convert_peer import HF_PYTHON, LLAMA_CPP, PEER_PYTHON

# Token types (llama.cpp LLAMA_TOKEN_TYPE_*).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

CHAT = "<|im_start|>user\nhi<|im_end|>"
# Characters that span tokens in both vocabularies (Qwen2 splits the family emoji's ZWJ
# sequence, SmolLM2 nearly every CJK character), plus code and whitespace.
MULTIBYTE = "你好，世界！🦙🦙 emoji 👩‍👩‍👧‍👦 日本語のテキスト 한국어 Ελληνικά ∑∫√ ½"
TEXTS = [
    "Hello, world! I'm here, you'll see. DON'T",
    MULTIBYTE,
    "    def f(x):\n\treturn x  # ok\n\n\n\nclass A:\n    pass\n",
    "```python\nimport os\nprint(os.getcwd(), {'a': [1, 2.5e-3]})\n```",
    "a\r\n\r\nb \u00a0c\u3000d  \t  \n \n\n   end   ",
    "12345 3.14159 1,000,000 ²³ ٣٤ ⅷ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<<|im_end|>> <|im_end|><|im_end|>x<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def qwen2() -> Tokenizer:
    with open_gguf(QWEN2_VOCAB) as f:
        return Tokenizer.from_gguf(f)


def _demo_path():
    from cpuq.demo import demo_model_path
    try:
        return demo_model_path()
    except InputError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    with open_gguf(_demo_path()) as f:
        return Tokenizer.from_gguf(f)


# llama.cpp's test vectors and the two vocabularies ---------------------------------------

def test_qwen2_reproduces_llama_cpp_vectors(qwen2):
    vectors = hf_tokenizer.read_vocab_tests(QWEN2_VOCAB)
    assert len(vectors) == 46
    mismatches = [(text, ids, qwen2.encode(text)) for text, ids in vectors if qwen2.encode(text) != ids]
    assert mismatches == []
    # Byte-level BPE loses nothing: every vector decodes back to its text.
    assert [qwen2.decode(ids) for _, ids in vectors] == [text for text, _ in vectors]


def test_qwen2_vocabulary(qwen2):
    assert qwen2.vocab.pre == "qwen2" and qwen2.n_vocab == 151936
    assert (qwen2.bos_id, qwen2.eos_id, qwen2.add_bos) == (151643, 151643, False)
    # The file pads 151646..151935 with [PAD<i>] (USER_DEFINED here): they are tokens like
    # any other added token, text in and text out, as in llama.cpp.
    assert qwen2.token_text(151935) == "[PAD151935]" and not qwen2.is_special(151935)
    assert qwen2.encode("[PAD151650]") == [151650] and qwen2.decode([151650]) == "[PAD151650]"
    assert qwen2.encode("hi", add_bos=True) == [151643, 6023]
    assert qwen2.token_id("<|im_end|>") == 151645 and qwen2.token_id("no such token") is None


def test_qwen2_eos_ids_are_llama_cpps_eog_set(qwen2):
    # llama_vocab::impl::load collects special_eog_ids by token text: <|endoftext|> (also
    # the eos id), <|im_end|>, and "</s>" (its paddleocr rule; a NORMAL token in Qwen2's
    # vocabulary, made a control token by the same rule). llama-cpp-python 0.3.36's
    # llama_vocab_is_eog gives exactly these three (test_matches_llama_cpp below).
    assert qwen2.eos_ids == {151643, 151645, 128247}
    assert qwen2.token_text(128247) == "</s>" and qwen2.is_special(128247)
    assert {i for i in qwen2.eos_ids if qwen2.token_text(i).startswith("<|")} == {151643, 151645}


# From llama-cpp-python 0.3.36, Llama(demo GGUF, vocab_only=True).tokenize(text.encode(),
# add_bos=False, special=True): the reference for SmolLM2's vocabulary in CI.
SMOLLM_IDS = {
    CHAT: [1, 4093, 198, 6004, 2],
    "12345 apples": [33, 34, 35, 36, 37, 13855],
    "你好，世界！🦙": [18645, 250, 48392, 138, 12831, 7906, 240, 178, 239, 230, 8083, 219, 10813, 116, 243],
    "    def f(x):\n\treturn x  \n\n\n": [333, 753, 275, 24, 104, 727, 198, 197, 5406, 1792, 256, 16506],
}


def test_demo_vocabulary_matches_llama_cpp(smollm):
    assert smollm.vocab.pre == "smollm" and smollm.n_vocab == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)  # add_bos_token is false in the file
    assert {text: smollm.encode(text, special=True) for text in SMOLLM_IDS} == SMOLLM_IDS
    # EOG: <|endoftext|>, <|im_end|> (= eos) and <reponame>, llama.cpp's FIM repo token.
    assert smollm.eos_ids == {0, 2, 4}


@pytest.mark.parametrize("name", ["qwen2", "smollm"])
def test_round_trip(name, request):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, special=True), special=True) == text


# special tokens --------------------------------------------------------------------------

@pytest.mark.parametrize("name, im_start, im_end, user, newline, hi", [
    ("qwen2", 151644, 151645, 872, 198, 6023),
    ("smollm", 1, 2, 4093, 198, 6004),
])
def test_special_true_parses_control_tokens_false_spells_them(name, im_start, im_end, user, newline, hi, request):
    tok = request.getfixturevalue(name)
    assert tok.encode(CHAT, special=True) == [im_start, user, newline, hi, im_end]
    plain = tok.encode(CHAT)
    assert not any(tok.is_special(i) for i in plain) and len(plain) > 5
    assert tok.decode(plain) == CHAT  # the markup survives as text
    special = tok.encode(CHAT, special=True)
    assert tok.decode(special) == "user\nhi"  # control tokens skipped by default
    assert tok.decode(special, special=True) == CHAT
    assert tok.is_special(im_start) and tok.is_special(im_end) and not tok.is_special(hi)


@pytest.mark.parametrize("name", ["qwen2", "smollm"])
def test_plain_text_never_yields_a_control_id(name, request):
    tok = request.getfixturevalue(name)
    controls = [i for i in range(tok.n_vocab) if tok.is_special(i)]
    texts = [tok.token_text(i) for i in controls]
    for text in [*texts, "".join(texts), " ".join(texts), "x" + "\n".join(texts) + "y"]:
        ids = tok.encode(text)
        assert not any(tok.is_special(i) for i in ids), text
        assert tok.decode(ids) == text


# streaming -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2", "smollm"])
def test_stream_decoder_never_splits_a_character(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(MULTIBYTE + CHAT, special=True)
    # The test means something only if characters do span tokens.
    assert sum(_invalid_utf8(tok.token_bytes(i)) for i in ids) >= 3
    dec = tok.stream_decoder()
    chunks = [dec.feed(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == MULTIBYTE + "user\nhi"
    # special=True renders control tokens in the stream too.
    dec = StreamDecoder(tok, special=True)
    assert "".join([dec.feed(i) for i in ids] + [dec.flush()]) == MULTIBYTE + CHAT


def test_stream_decoder_flushes_a_cut_character(qwen2):
    ids = qwen2.encode("a👩‍👦")  # ... ' \xf0\x9f\x91' '\xa9' ...: the first emoji spans two tokens
    cut = next(k for k in range(1, len(ids)) if _invalid_utf8(qwen2.decode_bytes(ids[:k])))
    dec = qwen2.stream_decoder()
    chunks = [dec.feed(i) for i in ids[:cut]]
    assert "\ufffd" not in "".join(chunks)
    tail = dec.flush()
    assert tail.endswith("\ufffd") and "".join(chunks) + tail == qwen2.decode(ids[:cut])
    # After flush the decoder starts afresh.
    assert "".join([dec.feed(i) for i in ids] + [dec.flush()]) == "a👩‍👦"


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# small vocabularies: behaviour and errors ----------------------------------------------------

def _gpt2_byte_chars() -> list[str]:
    # GPT-2's bytes_to_unicode (openai/gpt-2 src/encoder.py), in byte order.
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


BYTES = _gpt2_byte_chars()
MERGED = ["he", "ll", "hell", "hello", "Ġh", "Ġhi"]
SPECIALS = [("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<|endoftext|>", CONTROL),
            ("<tool>", USER_DEFINED), ("[PAD266]", UNUSED), ("[PAD267]", USER_DEFINED)]
HELLO, HI, IM_START, IM_END, EOT, TOOL, PAD_UNUSED, PAD_USER = 259, 261, 262, 263, 264, 265, 266, 267


def small_metadata(**overrides) -> dict:
    """A 268-token byte-level vocabulary: the 256 bytes, "hello" and " hi" by merges, three
    control tokens, one user-defined token and converter padding of both kinds."""
    tokens = BYTES + MERGED + [t for t, _ in SPECIALS]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [NORMAL] * (256 + len(MERGED)) + [t for _, t in SPECIALS],
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ h", "Ġh i"],
        "tokenizer.ggml.bos_token_id": 264,
        "tokenizer.ggml.eos_token_id": 264,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_small_vocabulary_behaviour():
    tok = Tokenizer.from_metadata(small_metadata())
    assert tok.n_vocab == 268 and tok.token_text(HELLO) == "hello" and tok.token_bytes(HI) == b" hi"
    assert tok.encode("hello hi") == [HELLO, HI]
    assert tok.encode("<|im_start|>hello<|im_end|>", special=True) == [IM_START, HELLO, IM_END]
    # USER_DEFINED tokens are matched in plain text too (llama.cpp: "pre-tokenized before
    # everything else"); control tokens only with special=True; UNUSED padding never.
    assert tok.encode("hello<tool>[PAD267][PAD266]")[:3] == [HELLO, TOOL, PAD_USER]
    assert PAD_UNUSED not in tok.encode("[PAD266]", special=True)
    assert IM_START not in tok.encode("<|im_start|>")
    # Decoding: control tokens only when asked, USER_DEFINED as text, UNUSED as nothing.
    assert tok.decode([IM_START, HELLO, TOOL, PAD_UNUSED, PAD_USER, IM_END]) == "hello<tool>[PAD267]"
    assert tok.decode([IM_START, HELLO, PAD_UNUSED, IM_END], special=True) == "<|im_start|>hello<|im_end|>"
    assert [tok.is_special(i) for i in (HELLO, IM_START, TOOL, PAD_UNUSED)] == [False, True, False, False]
    # EOG: the eos id and, by their text, <|im_end|> and <|endoftext|>.
    assert tok.eos_ids == {IM_END, EOT}
    with pytest.raises(InputError, match="token id 999"):
        tok.decode([999])
    with pytest.raises(InputError, match="no BOS"):
        Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.bos_token_id": None})).encode("x", add_bos=True)


@pytest.mark.parametrize("name", ["qwen2", "smollm", "small"])
def test_token_texts_and_ids_are_read_back_exactly(name, request):
    # A Tokenizer keeps no Python list of tokens or dict of ids (~17 MiB for 151k tokens):
    # token_text/token_id and vocab.tokens/index read them back from `tokenizers`
    if name == "small":  # with an empty token, which llama.cpp renames [EMPTY_i]
        md = small_metadata()
        md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:-1] + [""]
        tok = Tokenizer.from_metadata(md)
    else:
        tok = request.getfixturevalue(name)
        with open_gguf(QWEN2_VOCAB if name == "qwen2" else _demo_path()) as f:
            md = {"tokenizer.ggml.tokens": f.get("tokenizer.ggml.tokens")}
    expected = [t or f"[EMPTY_{i}]" for i, t in enumerate(md["tokenizer.ggml.tokens"])]
    assert isinstance(tok.vocab.tokens, _TokenTexts) and isinstance(tok.vocab.index, _TokenIds)
    assert len(tok.vocab.tokens) == tok.n_vocab == len(expected)
    assert [tok.token_text(i) for i in range(tok.n_vocab)] == expected
    assert [tok.token_id(t) for t in expected] == list(range(len(expected)))
    assert tok.vocab.tokens[-1] == expected[-1] and tok.vocab.tokens[2:5] == expected[2:5]
    assert tok.token_id("no such token \x00") is None and "no such token" not in tok.vocab.index
    with pytest.raises(IndexError):
        tok.vocab.tokens[len(expected)]


def test_small_vocabulary_through_a_gguf_file(tmp_path):
    """from_gguf reads a GGUF written by cpuq's writer as from_metadata reads the dict."""
    path = tmp_path / "vocab.gguf"
    w = GGUFStreamWriter(path, arch="qwen2")
    w.add_metadata(small_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    w.close()
    with open_gguf(path) as f:
        tok = Tokenizer.from_gguf(f)
    assert tok.vocab.types.tolist() == small_metadata()["tokenizer.ggml.token_type"]
    assert tok.add_bos and tok.encode("hello hi") == [EOT, HELLO, HI]


def test_llama_bpe_adds_bos_by_default_and_the_file_overrides_it():
    assert Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.pre": "llama-bpe"})).add_bos
    assert not Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.pre": "llama-bpe",
                                                         "tokenizer.ggml.add_bos_token": False})).add_bos
    assert Vocab.from_metadata(small_metadata(**{"tokenizer.ggml.pre": None})).pre == "default"  # as llama.cpp


def test_unsupported_model_and_pre():
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model 'llama'"):
        Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(UnsupportedError, match=r"tokenizer.ggml.pre 'deepseek-coder' is not supported") as e:
        Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.pre": "deepseek-coder"}))
    assert all(name in str(e.value) for name in ("qwen2", "llama-bpe", "smollm", "gpt-2", "default"))


@pytest.mark.parametrize("overrides, key", [
    ({"tokenizer.ggml.merges": None}, "'tokenizer.ggml.merges' is missing"),
    ({"tokenizer.ggml.tokens": None}, "'tokenizer.ggml.tokens' is missing"),
    ({"tokenizer.ggml.model": None}, "'tokenizer.ggml.model' is missing"),
    ({"tokenizer.ggml.token_type": [NORMAL] * 10}, "'tokenizer.ggml.token_type' has 10 entries for 268 tokens"),
    ({"tokenizer.ggml.token_type": [NORMAL] * 267 + [9]}, r"'tokenizer.ggml.token_type'\[267\] is 9"),
    ({"tokenizer.ggml.token_type": ["1"] * 268}, "'tokenizer.ggml.token_type' holds a value that is not an int"),
    ({"tokenizer.ggml.eos_token_id": 268}, "'tokenizer.ggml.eos_token_id' is 268, outside the vocabulary"),
    ({"tokenizer.ggml.bos_token_id": -1}, "'tokenizer.ggml.bos_token_id' is -1"),
    ({"tokenizer.ggml.padding_token_id": "0"}, "'tokenizer.ggml.padding_token_id' is str"),
    ({"tokenizer.ggml.add_bos_token": 1}, "'tokenizer.ggml.add_bos_token' is int, expected bool"),
    ({"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": None},
     "'tokenizer.ggml.bos_token_id' is missing"),
    ({"tokenizer.ggml.merges": ["h e", "hell"]}, r"'tokenizer.ggml.merges'\[1\] is 'hell', not two tokens"),
    ({"tokenizer.ggml.merges": ["h e", "x yz"]}, "'tokenizer.ggml.merges' does not fit the vocabulary"),
    ({"tokenizer.ggml.merges": "h e"}, "'tokenizer.ggml.merges' is str, expected an array"),
    ({"tokenizer.ggml.tokens": BYTES + MERGED + ["he"] + [t for t, _ in SPECIALS][1:]},
     "'tokenizer.ggml.tokens' holds 'he' twice"),
    ({"tokenizer.ggml.tokens": [], "tokenizer.ggml.token_type": []}, "'tokenizer.ggml.tokens' is empty"),
])
def test_malformed_metadata_is_a_format_error_naming_the_key(overrides, key):
    with pytest.raises(FormatError, match=key) as e:
        Tokenizer.from_metadata(small_metadata(**overrides), source="x.gguf")
    assert str(e.value).startswith("x.gguf: ") and "\n" not in str(e.value)


def test_tiny_gguf_without_merges(tiny_gguf):
    # tests/conftest.py's tiny file has tokens but no merges.
    with open_gguf(tiny_gguf) as f:
        with pytest.raises(FormatError, match=r"tiny.gguf: .*'tokenizer.ggml.merges' is missing"):
            Tokenizer.from_gguf(f)


def test_every_pre_name_builds():
    for pre in PRE_NAMES:
        tok = Tokenizer.from_metadata(small_metadata(**{"tokenizer.ggml.pre": pre}))
        assert tok.encode("hello hi", add_bos=False) == [HELLO, HI], pre


# peer: llama.cpp itself, and HF transformers -----------------------------------------------

# Runs in the peer venv: argv = model.gguf, texts.json, out.json. Everything llama.cpp's
# vocabulary says: ids with and without special parsing, BOS handling, the EOG and control
# sets, and every token's piece with and without specials.
_LLAMA_PROBE = """
import ctypes, json, sys
import llama_cpp
model_path, texts_path, out_path = sys.argv[1:4]
texts = json.load(open(texts_path, encoding="utf-8"))
llm = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
n = llama_cpp.llama_vocab_n_tokens(vocab)
buf = ctypes.create_string_buffer(4096)
def piece(i, special):
    k = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
    assert k >= 0
    return buf.raw[:k].hex()
json.dump({
    "plain": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts],
    "special": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts],
    "default_bos": [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts],
    "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
    "control": [i for i in range(n) if llama_cpp.llama_vocab_is_control(vocab, i)],
    "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
    "bos": llama_cpp.llama_vocab_bos(vocab), "eos": llama_cpp.llama_vocab_eos(vocab),
    "pieces": [piece(i, False) for i in range(n)],
    "pieces_special": [piece(i, True) for i in range(n)],
}, open(out_path, "w"))
"""

# More text for llama.cpp: decomposed accents and "'ſ" (neither side normalizes or
# case-folds), control characters, U+FFFD and U+10FFFF, Qwen2's "</s>", converter padding,
# a FIM token, repeated specials and long runs.
PEER_TEXTS = TEXTS + ["e\u0301 café cafe\u0301 ſ 'ſ", "\x00\x01\x7f \ufffd \U0010ffff",
                      "</s> <s> [PAD151650]<|fim_pad|>",
                      "<|endoftext|>" * 3, "x" * 300 + " " * 40 + "1" * 25]
LLAMA_MODELS = LLAMA_CPP / "models"


def _peer_vocabularies() -> list[Path]:
    from cpuq.demo import demo_model_path
    paths = [QWEN2_VOCAB, demo_model_path()]
    for path in sorted(LLAMA_MODELS.glob("ggml-vocab-*.gguf")):
        with open_gguf(path) as f:
            if f.get("tokenizer.ggml.model") == "gpt2" and (f.get("tokenizer.ggml.pre") or "default") in PRE_NAMES:
                paths.append(path)
    return paths


@pytest.mark.peer
def test_llama_cpp_vectors_of_every_supported_vocabulary():
    """llama.cpp's .inp/.out test vectors for each byte-level BPE vocabulary in its models/
    whose pre-tokenizer cpuq has a row for (command-r, falcon, gpt-2, llama-bpe, mpt, qwen2,
    qwen35, refact, starcoder in llama-cpp-python 0.3.36)."""
    if not LLAMA_MODELS.is_dir():
        pytest.skip(f"{LLAMA_MODELS} missing (tools/peer_env.sh)")
    checked = {}
    for path in _peer_vocabularies()[2:]:
        if not Path(str(path) + ".inp").exists():
            continue
        with open_gguf(path) as f:
            tok = Tokenizer.from_gguf(f)
        vectors = hf_tokenizer.read_vocab_tests(path)
        checked[path.name] = [text for text, ids in vectors if tok.encode(text, add_bos=False) != ids]
    assert len(checked) >= 9 and checked == {name: [] for name in checked}


@pytest.mark.peer
def test_matches_llama_cpp(tmp_path):
    """Each supported vocabulary, against llama.cpp's tokenize, token_to_piece and EOG set."""
    if not PEER_PYTHON.exists():
        pytest.skip(f"{PEER_PYTHON} missing (llama-cpp-python peer venv, tools/peer_env.sh)")
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(PEER_TEXTS), encoding="utf-8")
    seen = []
    for path in _peer_vocabularies():
        out = tmp_path / "llama.json"
        r = subprocess.run([str(PEER_PYTHON), "-c", _LLAMA_PROBE, str(path), str(texts_file), str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        ref = json.loads(out.read_text())
        with open_gguf(path) as f:
            tok = Tokenizer.from_gguf(f)
        name = path.name
        assert [tok.encode(t, add_bos=False) for t in PEER_TEXTS] == ref["plain"], name
        assert [tok.encode(t, special=True, add_bos=False) for t in PEER_TEXTS] == ref["special"], name
        assert [tok.encode(t) for t in PEER_TEXTS] == ref["default_bos"], name
        assert (tok.add_bos, tok.bos_id, tok.eos_id) == (ref["add_bos"], ref["bos"], ref["eos"]), name
        assert sorted(tok.eos_ids) == ref["eog"], name
        assert [i for i in range(tok.n_vocab) if tok.is_special(i)] == ref["control"], name
        for special, key in ((False, "pieces"), (True, "pieces_special")):
            ours = [tok.decode_bytes([i], special=special).hex() for i in range(tok.n_vocab)]
            differ = [i for i in range(tok.n_vocab) if ours[i] != ref[key][i]]
            # llama.cpp writes "[UNK_BYTE_0x<utf8 hex><token>]" for a NORMAL token with a
            # character outside GPT-2's byte map (1403 of command-r's); cpuq, as HF's
            # ByteLevel decoder, the token's own UTF-8.
            for i in differ:
                assert bytes.fromhex(ref[key][i]).startswith(b"[UNK_BYTE_0x"), (name, i, tok.token_text(i))
                assert ours[i] == tok.token_text(i).encode().hex(), (name, i)
        seen.append(name)
    assert len(seen) >= 12, seen


# Runs in the torch venv: argv = checkpoint dir, texts.json. transformers' AutoTokenizer
# (Qwen2Tokenizer for model_type qwen2: transformers' own Qwen2 pre-tokenizer and NFC
# normalizer over the checkpoint's vocabulary and merges).
_HF_TOKENIZE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(open(sys.argv[2], encoding="utf-8"))
ids = [tok.encode(t, add_special_tokens=False) for t in texts]
print(json.dumps({"class": type(tok).__name__, "ids": ids,
                  "decoded": [tok.decode(i, skip_special_tokens=False) for i in ids],
                  "decoded_skip": [tok.decode(i, skip_special_tokens=True) for i in ids]}))
"""

HF_TEXTS = TEXTS + ["数学公式：∀x∈ℝ, x²≥0。中文標點符號「引號」『書名號』…", "🦙🦙🦙👍🏽🇯🇵 🏳️‍🌈",
                    "\n\n\n    \t\t  \r\n  x",
                    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot", "café naïve Ångström",
                    "e\u0301 cafe\u0301", "</s>x", "[PAD151650]"]


@pytest.mark.peer
def test_matches_transformers_through_the_converter(tmp_path):
    """A tiny Qwen2 checkpoint (the real Qwen2 vocabulary) converted by cpuq.convert: cpuq's
    tokenizer from the GGUF against transformers' tokenizer from the checkpoint."""
    if not HF_PYTHON.exists():
        pytest.skip(f"{HF_PYTHON} missing (torch + transformers venv)")
    src = make_tiny_checkpoint(tmp_path / "ckpt", "qwen2", num_hidden_layers=1)
    gguf_path = cpuq.convert(src, tmp_path / "tiny.gguf", "f32")
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(HF_TEXTS), encoding="utf-8")
    r = subprocess.run([str(HF_PYTHON), "-c", _HF_TOKENIZE, str(src), str(texts_file)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = json.loads(r.stdout.strip().splitlines()[-1])
    assert hf["class"] == "Qwen2Tokenizer"
    with open_gguf(gguf_path) as f:
        tok = Tokenizer.from_gguf(f)
    assert tok.vocab.pre == "qwen2"
    # HF matches its added tokens in any text (= special=True). Where llama.cpp differs from
    # HF, cpuq follows llama.cpp, and these are the only differences:
    # * HF NFC-normalizes first, llama.cpp does not (decomposed accents);
    # * llama.cpp makes Qwen2's NORMAL token "</s>" a control token by its text (its
    #   paddleocr EOG rule), so special=True reads "</s>" as one token.
    # The converter's [PAD<i>] padding is UNUSED (as llama.cpp's converter writes it), so it
    # is never matched in text and "[PAD151650]" is plain text on both sides. (The older
    # ggml-vocab-qwen2.gguf has USER_DEFINED padding, which llama.cpp does match.)
    assert tok.vocab.types[151650] == UNUSED
    ours = [tok.encode(t, special=True) for t in HF_TEXTS]
    differ = [t for t, a, b in zip(HF_TEXTS, ours, hf["ids"]) if a != b]
    assert differ == ["e\u0301 cafe\u0301", "</s>x"]
    assert tok.encode("</s>x", special=True) == [128247, 87]
    nfc = [tok.encode(unicodedata.normalize("NFC", t), special=True) for t in HF_TEXTS]
    assert [ids for t, ids in zip(HF_TEXTS, nfc) if t != "</s>x"] == \
        [ids for t, ids in zip(HF_TEXTS, hf["ids"]) if t != "</s>x"]
    # Plain text (special=False) gives HF's ids for "</s>x" too.
    assert tok.encode("</s>x") == hf["ids"][HF_TEXTS.index("</s>x")]
    # Decoding HF's ids: equal, with and without special tokens.
    assert [tok.decode(i, special=True) for i in hf["ids"]] == hf["decoded"]
    assert [tok.decode(i) for i in hf["ids"]] == hf["decoded_skip"]
