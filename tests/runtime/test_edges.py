"""Runtime edges on the demo model, each with its defined behaviour: prompts longer than
the context, empty prompts, invalid UTF-8 in and out, max_tokens past the context, odd
n_threads / n_ctx, and threads (two Models at once; one Model from two threads)."""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cpuq
from cpuq import InputError
from cpuq.runtime import model as model_mod

from .test_model import model  # noqa: F401  (the demo model fixture; demo is in conftest.py)

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, ignore_eos=True)  # deterministic, and a fixed number of tokens




def greedy(m, prompt, n=8) -> str:
    return "".join(m.generate(prompt, max_tokens=n, **GREEDY))


# --- prompt longer than the context --------------------------------------------------------

def test_prompt_longer_than_the_context_is_an_error_with_the_numbers(demo):
    with cpuq.load(demo, n_ctx=32, n_threads=1) as m:
        long_text = "word " * 40
        n = len(m.tokenize(long_text, special=True))
        assert n > 32
        with pytest.raises(InputError, match=rf"the prompt is {n} tokens; the context holds 32"):
            m.generate(long_text)  # raises at the call, before iterating
        with pytest.raises(InputError, match=r"the prompt is 33 tokens; the context holds 32"):
            m.generate([1] * 33)
        with pytest.raises(InputError, match=r"the prompt is \d+ tokens; the context holds 32"):
            m.chat([{"role": "user", "content": long_text}])
        with pytest.raises(InputError, match=r"33 token ids do not fit in the context of 32"):
            m.logits([1] * 33)
        with pytest.raises(InputError, match=r"33 more tokens do not fit: the context holds 0 of 32"):
            m.eval([1] * 33)
        # nothing was half-done: the model still answers, and a prompt of exactly n_ctx fits
        assert m.logits([1] * 32).shape == (32, m.config.n_vocab)
        out = list(m.generate([1] * 32, max_tokens=10, **GREEDY))
        assert m.finish_reason == "n_ctx" and m.timings.generated_tokens == 1 and len(out) <= 1


# --- max_tokens --------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [10**12, None, -1])
def test_max_tokens_beyond_the_context_stops_at_n_ctx(demo, max_tokens):
    with cpuq.load(demo, n_ctx=24, n_threads=1) as m:
        prompt = m.tokenize("Once upon a time")
        "".join(m.generate(prompt, max_tokens=max_tokens, **GREEDY))
        # the last sampled token is never evaluated, as in llama.cpp: n_ctx - prompt + 1 tokens
        assert m.finish_reason == "n_ctx"
        assert m.timings.generated_tokens == 24 - len(prompt) + 1


def test_stop_may_be_one_string(model):
    # llama-cpp-python's stop takes a str or a list; a str is not one stop per character
    one = "".join(model.generate("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=" 7"))
    assert one == "".join(model.generate("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]))
    assert model.finish_reason == "stop" and " 5" in one


def test_max_tokens_values(model):
    assert list(model.generate("Hello", max_tokens=0)) == [] and model.finish_reason == "length"
    assert greedy(model, "Hello", np.int64(3)) == greedy(model, "Hello", 3)  # numpy integers are integers
    for bad in (-2, 1.5, "8", True, 8.0):
        with pytest.raises(InputError, match="max_tokens must be an integer >= 0, or -1 / None"):
            model.generate("Hello", max_tokens=bad)


# --- empty prompts -------------------------------------------------------------------------

def test_empty_text_prompt_starts_from_bos(model):
    bos = model.tokenizer.bos_id
    assert model.tokenize("") == []  # the demo model adds no BOS to prompts...
    from_empty = greedy(model, "")
    assert model.timings.prompt_tokens == 1
    assert from_empty == greedy(model, [bos]) and from_empty  # ...but generation starts from it
    assert greedy(model, b"") == from_empty


def test_empty_text_prompt_without_bos_is_an_error(model, monkeypatch):
    vocab = model.tokenizer.vocab  # the same vocabulary with its BOS id taken away
    monkeypatch.setattr(model.tokenizer, "vocab",
                        dataclasses.replace(vocab, ids={k: v for k, v in vocab.ids.items() if k != "bos"}))
    assert model.tokenizer.bos_id is None
    with pytest.raises(InputError, match="the prompt is empty and .* has no BOS token"):
        model.generate("")
    assert greedy(model, "Hi", 2)  # non-empty text is unaffected


@pytest.mark.parametrize("call", ["generate", "logits", "eval"])
def test_empty_token_ids_are_an_error(model, call):
    with pytest.raises(InputError, match="no token ids: the sequence is empty"):
        getattr(model, call)([])


def test_token_ids_must_be_integers(model):
    for bad, words in (([1.5, 2.0], "float64"), ([[1, 2]], "shape"), ([10**30], "object"), (None, "NoneType"),
                       ("abc", "tokenize text first")):
        with pytest.raises(InputError, match=words):
            model.logits(bad)
    np.testing.assert_array_equal(model.logits(np.array([1, 2], np.int32)), model.logits([1, 2]))


def test_chat_with_no_messages_or_empty_content(model):
    for bad in ([], (), "hello"):
        with pytest.raises(InputError, match="messages: expected a non-empty list"):
            model.chat(bad)
    # an empty content is a message like any other: the template renders it and the model replies
    reply = "".join(model.chat([{"role": "user", "content": ""}], max_tokens=8, temperature=0))
    assert reply and model.finish_reason in ("eos", "length")
    rendered = model.template.render([{"role": "user", "content": ""}])
    assert model.timings.prompt_tokens <= len(model.tokenize(rendered, special=True))


# --- invalid UTF-8 ---------------------------------------------------------------------------

def test_lone_surrogates_and_invalid_bytes_are_errors_with_the_position(model):
    with pytest.raises(InputError, match=r"prompt: lone surrogate U\+DCFF at character 2"):
        model.generate("ab\udcffc")
    with pytest.raises(InputError, match=r"text: lone surrogate U\+D800 at character 0"):
        model.tokenize("\ud800")
    with pytest.raises(InputError, match=r"messages\[1\]\['content'\]: lone surrogate U\+DC80 at character 3"):
        model.chat([{"role": "system", "content": "ok"}, {"role": "user", "content": "abc\udc80"}])
    with pytest.raises(InputError, match=r"prompt: not valid UTF-8 \(byte 0xff at offset 5\)"):
        model.generate("café".encode() + b"\xff")  # offsets count bytes: "café" is 5 of them
    with pytest.raises(InputError, match=r"prompt: not valid UTF-8 \(byte 0xc3 at offset 3\)"):
        model.generate(b"caf\xc3")  # a character cut off


def test_bytes_prompt_is_utf8_text(model):
    text = "Le café coûte 3 €"
    assert model.tokenize(text.encode()) == model.tokenize(text)
    assert greedy(model, text.encode()) == greedy(model, text)
    assert greedy(model, bytearray(text.encode())) == greedy(model, text)


@pytest.fixture(scope="module")
def byte_tokens(model):
    """byte -> the id of the token that is exactly that byte. SmolLM2's vocabulary lacks 21
    of the 256 (bytes its training text never held: 0xc0, 0xf5..0xff, a few controls), but
    has every lead and continuation byte the tests use."""
    tok = model.tokenizer
    out = {}
    for i in range(tok.n_vocab):
        b = tok.token_bytes(i)
        if len(b) == 1 and not tok.is_special(i):
            out.setdefault(b[0], i)
    assert len(out) == 235 and set("a🙂é€".encode()) | {0x80} <= set(out)
    return out


def test_stream_decoder_never_emits_a_broken_character(model, byte_tokens):
    tok = model.tokenizer
    words = model.tokenize("日本語 café 🙂 naïve")
    control = model.tokenizer.eos_id  # skipped when decoding without special
    pool = list(byte_tokens.values()) + words + [control]
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 14))]
        dec = tok.stream_decoder()
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        for p in pieces:
            p.encode("utf-8")  # valid Unicode: no lone surrogates
        # equal to decoding all bytes at once: so no piece held a U+FFFD for bytes that later
        # completed a character (the reference is Python's own whole-bytes UTF-8 decoder)
        assert "".join(pieces) == b"".join(tok.token_bytes(i) for i in ids if i != control).decode(
            "utf-8", errors="replace"), ids
    # a 4-byte character fed a byte at a time comes out whole, once
    dec = tok.stream_decoder()
    assert [dec.feed(byte_tokens[b]) for b in "🙂".encode()] == ["", "", "", "🙂"]


def test_generation_of_partial_characters(model, byte_tokens, monkeypatch):
    """The decode loop itself, with the sampler scripted to emit the bytes of a character
    one token at a time, a stray continuation byte and a character cut off at the end."""
    data = "a🙂".encode() + b"\x80" + "é€".encode()[:-1]
    script = [byte_tokens[b] for b in data]

    class Scripted:
        def __init__(self, params):
            self.tokens = iter(script)

        def sample(self, logits, history):
            return next(self.tokens)

    monkeypatch.setattr(model_mod, "Sampler", Scripted)
    pieces = list(model.generate("x", max_tokens=len(script)))
    assert pieces == ["a", "🙂", "\ufffd", "é", "\ufffd"], pieces  # the last: flushed at the end
    assert model.finish_reason == "length"
    # a stop string made of a multi-byte character cuts before it, never inside it
    pieces = list(model.generate("x", max_tokens=len(script), stop=["🙂"]))
    assert pieces == ["a"] and model.finish_reason == "stop"


# --- n_threads and n_ctx -----------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", [0, -1, 10**6, 1.5, True, "2"])
def test_bad_n_threads(demo, n_threads):
    import numba
    with pytest.raises(InputError, match=rf"n_threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}"):
        cpuq.load(demo, n_threads=n_threads)


def test_n_threads_default_and_numpy_int(demo):
    with cpuq.load(demo, n_ctx=64, n_threads=np.int64(1)) as m:
        assert m.n_threads == 1 and type(m.n_threads) is int
    with cpuq.load(demo, n_ctx=64) as m:
        assert 1 <= m.n_threads <= os.cpu_count()


@pytest.mark.parametrize("n_ctx", [0, -5, 1.5, True, None])
def test_bad_n_ctx(demo, n_ctx):
    with pytest.raises(InputError, match="n_ctx must be a positive integer"):
        cpuq.load(demo, n_ctx=n_ctx)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_huge_n_ctx_is_a_clear_error_before_allocating(demo):
    # demo model: 30 layers x 3 kv heads x 64 x (k, v) x fp16 = 23,040 bytes a token -> 21 TiB
    before = _rss()
    with pytest.raises(InputError, match=r"n_ctx=1000000000: its KV cache would take 21\.0 TiB \(23040 bytes per "
                                         r"token\), more than this machine's .* of memory; load with a smaller n_ctx"):
        cpuq.load(demo, n_ctx=10**9)
    assert _rss() - before < 200 << 20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures resident memory through /proc")
def test_large_n_ctx_maps_the_cache_lazily(demo):
    memory = model_mod.memory_bytes()
    if memory is None or memory < 4 << 30:
        pytest.skip("needs 4 GiB of memory for the 1.4 GiB cache")
    before = _rss()
    with cpuq.load(demo, n_ctx=65536, n_threads=1) as m:  # 65536 x 23,040 bytes = 1.4 GiB of KV cache
        assert greedy(m, "The capital of France is", 4)
        assert _rss() - before < 400 << 20  # weights are mmapped; the cache grows with use


# --- threads -----------------------------------------------------------------------------------

def _run_threads(*fns, timeout=300):
    """Run fns at once (released together by a barrier); re-raise the first error."""
    errors, results = [], [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001  (reported to the test below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive()
    if errors:
        raise errors[0]
    return results


def test_two_models_in_two_threads_give_the_sequential_outputs(demo):
    long_prompt = "The history of the city is long. " * 20  # > 32 tokens: the prompt workers' path too
    with cpuq.load(demo, n_ctx=512, n_threads=1) as a, cpuq.load(demo, n_ctx=512, n_threads=1) as b:
        def work_a():
            a.reset()
            return "".join(a.chat(QUESTION, max_tokens=24, temperature=0)), a.logits(a.tokenize("Hello world"))

        def work_b():
            b.reset()
            return greedy(b, long_prompt, 24), b.logits(b.tokenize("Bananas are"))

        sequential = [work_a(), work_b()]
        assert "Paris" in sequential[0][0]
        for _ in range(2):
            together = _run_threads(work_a, work_b)
            for (text, logits), (text_ref, logits_ref) in zip(together, sequential):
                assert text == text_ref
                np.testing.assert_array_equal(logits, logits_ref)  # same kernels, same order: bit-identical


_TWO_THREADS = """
import sys, threading, cpuq, numba
ms = [cpuq.load(sys.argv[1], n_ctx=128, n_threads=1) for _ in range(2)]
run = lambda m: "".join(m.generate("Once upon a time", max_tokens=16, temperature=0, ignore_eos=True))
want, got = run(ms[0]), [None, None]
ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(ms[i]))) for i in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
print(numba.threading_layer(), got == [want, want])
"""


def test_two_models_in_two_threads_under_numbas_workqueue_layer(demo):
    # Numba's fallback layer (no TBB, no OpenMP) aborts the process when two threads launch
    # parallel regions at once; there the Models' forward passes take turns instead
    r = subprocess.run([sys.executable, "-c", _TWO_THREADS, str(demo)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NUMBA_THREADING_LAYER": "workqueue"})
    assert r.returncode == 0 and r.stdout.split() == ["workqueue", "True"], r.stderr[-2000:]


def test_one_model_with_a_stream_open_in_another_thread(model):
    expected = greedy(model, "Once upon a time", 12)
    opened, release, got = threading.Event(), threading.Event(), {}

    def reader():
        it = model.generate("Once upon a time", max_tokens=12, **GREEDY)
        first = next(it)
        opened.set()
        release.wait(60)
        got["text"] = first + "".join(it)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert opened.wait(60)
        for call in (lambda: model.generate("x"), lambda: model.chat(QUESTION), lambda: model.logits([1, 2]),
                     lambda: model.eval([1]), model.reset):
            with pytest.raises(InputError, match=r"is in use by another thread \(generate\(\) has an unfinished "
                                                 r"stream"):
                call()
        assert model.tokenize("still fine") == model.tokenize("still fine")  # tokenize never conflicts
    finally:
        release.set()
        t.join(60)
    assert got["text"] == expected  # the refused calls did not touch the stream's cache
    assert greedy(model, "Once upon a time", 12) == expected  # free again


def test_one_model_while_a_call_runs_in_another_thread(model):
    entered, release = threading.Event(), threading.Event()

    def slow(x, names):  # logits' observer: holds the forward pass until released
        entered.set()
        release.wait(60)

    t = threading.Thread(target=lambda: model.logits([1, 2, 3], observe=slow))
    t.start()
    try:
        assert entered.wait(60)
        with pytest.raises(InputError, match=r"in use by another thread \(logits\(\) is running\)"):
            model.generate("x")
    finally:
        release.set()
        t.join(60)
    assert greedy(model, "Hi", 2)


def test_reentry_from_a_callback_is_an_error(model):
    seen = []

    def reenter(x, names):
        if not seen:
            try:
                model.eval([1])
            except InputError as e:
                seen.append(str(e))

    model.logits([1, 2], observe=reenter)
    assert seen and "eval() called while logits() is running in the same thread" in seen[0]


def test_many_threads_on_one_model_get_a_result_or_a_clear_error(model):
    """Never a wrong output, a crash or another exception: each call either has the model
    (and the right text) or is refused with InputError."""
    expected = greedy(model, "1, 2, 3,", 8)
    outcomes = []

    def worker():
        for _ in range(4):
            try:
                outcomes.append(greedy(model, "1, 2, 3,", 8))
            except InputError as e:
                assert "in use by another thread" in str(e)
                outcomes.append(None)

    _run_threads(*[worker] * 4)
    assert len(outcomes) == 16 and expected in outcomes
    assert all(o in (expected, None) for o in outcomes)


def test_a_stream_can_be_read_from_another_thread(model):
    expected = greedy(model, "Once upon a time", 10)
    it = model.generate("Once upon a time", max_tokens=10, **GREEDY)
    (text,) = _run_threads(lambda: "".join(it))
    assert text == expected


def test_a_new_call_in_the_same_thread_ends_the_old_stream(model):
    expected = greedy(model, "Bananas are", 6)
    old = model.generate("Once upon a time", max_tokens=10, **GREEDY)
    next(old)
    assert greedy(model, "Bananas are", 6) == expected
    with pytest.raises(InputError, match=r"this generate\(\) stream was ended by a later call"):
        next(old)
    assert list(old) == []  # and stays ended


def test_logits_inside_a_stream_leaves_it_be(model):
    expected = greedy(model, "Once upon a time", 6)
    pieces = []
    for piece in model.generate("Once upon a time", max_tokens=6, **GREEDY):
        pieces.append(piece)
        assert model.logits([1, 2]).shape == (2, model.config.n_vocab)  # a fresh context of its own
    assert "".join(pieces) == expected


def test_a_dropped_or_closed_stream_frees_the_model(model):
    model.generate("never read", max_tokens=4)  # dropped unread: the Model is free at once
    assert _run_threads(lambda: model.logits([1, 2]).shape) == [(2, model.config.n_vocab)]
    it = model.generate("read a little", max_tokens=4)
    next(it)
    it.close()
    assert _run_threads(lambda: model.logits([1, 2]).shape) == [(2, model.config.n_vocab)]


# --- the command line ---------------------------------------------------------------------------

def cli(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cpuq.cli", *args], input=stdin, capture_output=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def one_error_line(r, returncode: int = 2) -> str:
    assert r.returncode == returncode and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (("-p", " ".join(["word"] * 60), "--ctx", "32"), "the prompt is 60 tokens; the context holds 32"),
    (("-p", "x", "--threads", "0"), "--threads must be between 1 and"),
    (("-p", "x", "--ctx", "1000000000"), "--ctx 1000000000: its KV cache would take 21.0 TiB"),
    (("-p", "x", "-n", "-3"), "--max-tokens must be an integer >= 0, or -1 for no limit"),
    ((b"-p", b"ab\xffc"), "--prompt: not valid UTF-8 (byte 0xff at offset 2)"),  # as a shell passes raw bytes
])
def test_generate_command_edges_are_one_line_exit_2(demo, args, words):
    assert words in one_error_line(cli("generate", str(demo), *args))


def test_generate_command_empty_prompt_and_no_limit(demo):
    r = cli("generate", str(demo), "-p", "", "-n", "4", "--temperature", "0", "--threads", "1")
    assert r.returncode == 0 and "[4 tokens" in r.stderr and "prompt 1 tokens" in r.stderr, r.stderr
    r = cli("generate", str(demo), "-p", "Once upon a time", "-n", "-1", "--ctx", "24", "--temperature", "0",
            "--ignore-eos", "--threads", "1")
    assert r.returncode == 0 and "prompt 4 tokens" in r.stderr, r.stderr
    assert "[21 tokens" in r.stderr, r.stderr  # 24 - 4 + 1: up to the full context


def test_chat_over_a_pipe_with_invalid_utf8(demo):
    r = cli("chat", str(demo), "--temperature", "0", "-n", "16", "--threads", "1",
            stdin=b"What is the capital of France?\ncaf\xe9 au lait\nAnd of Germany?\n")
    line = one_error_line(r)  # as any failed turn: the line is skipped, chat goes on, exit code 2 at the end
    assert line == "error: input line 2: not valid UTF-8 (byte 0xe9 at offset 3)"
    out = r.stdout.splitlines()
    assert out[0] == ">>> What is the capital of France?" and "Paris" in out[1]
    assert out[2] == ">>> And of Germany?" and "Berlin" in out[3]
    assert "caf" not in r.stdout


def test_chat_over_a_pipe_prompt_too_long(demo):
    r = cli("chat", str(demo), "--ctx", "48", "--temperature", "0", "-n", "4", "--threads", "1",
            stdin=("word " * 60 + "\nHi\n").encode())
    assert "the context holds 48" in one_error_line(r)
    assert r.stdout.splitlines()[-2] == ">>> Hi"  # the next line still gets its turn
