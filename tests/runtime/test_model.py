"""cpuq.load's Model on the demo model: generation controls, the context limit, cache
reuse across chat turns, and independence of two models in one process."""
from __future__ import annotations

import numpy as np
import pytest

import cpuq
from cpuq import InputError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(demo):
    with cpuq.load(demo, n_ctx=256, n_threads=1) as m:
        yield m


def test_greedy_chat_answers_and_ends_at_eos(model):
    model.reset()
    reply = "".join(model.chat(QUESTION, temperature=0))
    assert "Paris" in reply and model.finish_reason == "eos"


def test_second_turn_evaluates_only_the_new_tokens(model):
    model.reset()
    first = "".join(model.chat(QUESTION, temperature=0))
    history = QUESTION + [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
    full = model.tokenize(model.template.render(history), special=True)
    reply = "".join(model.chat(history, temperature=0))
    assert "Berlin" in reply
    assert model.timings.prompt_tokens < len(full) // 2, (model.timings.prompt_tokens, len(full))


def test_seed_determinism_and_stop_strings(model):
    a = "".join(model.generate("Once upon a time", max_tokens=24, seed=7))
    b = "".join(model.generate("Once upon a time", max_tokens=24, seed=7))
    assert a == b
    greedy = "".join(model.generate("1, 2, 3, 4,", max_tokens=12, temperature=0))
    assert " 5" in greedy
    cut = "".join(model.generate("1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]))
    assert model.finish_reason == "stop" and greedy.startswith(cut) and " 7" not in cut and cut


def test_max_tokens_and_ignore_eos(model):
    out = list(model.generate("Hello", max_tokens=5, temperature=0, ignore_eos=True))
    assert model.finish_reason == "length" and model.timings.generated_tokens == 5 and out


def test_context_limit(demo):
    with cpuq.load(demo, n_ctx=40, n_threads=1) as m:
        "".join(m.chat(QUESTION, temperature=0, max_tokens=100, ignore_eos=True))  # 37-token prompt
        assert m.finish_reason == "n_ctx" and m.timings.generated_tokens == 4
        with pytest.raises(InputError, match=r"the prompt is \d+ tokens; the context holds 40"):
            m.generate("word " * 60)
        m.reset()
        assert "".join(m.chat(QUESTION, temperature=0, max_tokens=3)) == "The capital of"  # room again


def test_eval_appends_to_the_context(model):
    """eval continues the context where it is, and gives what logits() gives at the same
    positions, over different products and roundings of x: where the host has AVX512-VNNI
    the chunks take the int8 prompt products (kernels.qgemm: x rounded to 2^-16 / 127 of each
    32 values' largest |x|) and the last token the int16 one-token products (kernels/matvec.py),
    and attention sums in another order per chunking. Measured 2.3e-4..3.1e-4 relative RMS on
    the demo model, whose activations reach ~450 beside values of ~1; bar 1e-3, 50x below
    llama.cpp's own rounding on this file (5.3e-2, README)."""
    ids = model.tokenize("The capital of France is Paris. The capital of Germany is")
    full = model.logits(ids)
    model.reset()
    got = [model.eval(ids[:5]), model.eval(ids[5:-1]), model.eval(ids[-1:])]
    for g, ref in zip(got, [full[4], full[-2], full[-1]]):
        assert np.sqrt(np.mean((g - ref) ** 2) / np.mean(ref ** 2)) <= 1e-3
    assert model.detokenize([int(got[-1].argmax())]) == " Berlin"
    with pytest.raises(InputError, match=f"the context holds {len(ids)} of {model.n_ctx}"):
        model.eval([1] * (model.n_ctx - len(ids) + 1))
    model.reset()


def test_eval_continues_a_generation_that_max_tokens_ended(model, monkeypatch):
    """The last token max_tokens allows is sampled but not evaluated (its logits would go
    unread: a step per generate call); it is still part of the context, so eval runs it
    first. The same logits as evaluating every token by hand, bit for bit (the same calls:
    the hand-made side also ends with eval([last, next]))."""
    prompt = model.tokenize("The capital of France is")
    model.reset()
    logits, tokens = model.eval(prompt), []
    for _ in range(3):
        tokens.append(int(logits.argmax()))
        logits = model.eval(tokens[-1:])
    tokens.append(int(logits.argmax()))
    expected = model.eval([tokens[-1], 42])
    model.reset()
    steps = []
    step = model._step
    monkeypatch.setattr(model, "_step", lambda t: steps.append(t) or step(t))
    text = "".join(model.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True))
    assert text == model.detokenize(tokens) and model.finish_reason == "length"
    assert steps == tokens[:3]  # three steps for four tokens
    np.testing.assert_array_equal(model.eval([42]), expected)
    model.reset()


def test_bad_arguments(model):
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.logits([1, 2, 10**6])
    with pytest.raises(InputError, match="top_p"):
        model.generate("x", top_p=1.5)
    with pytest.raises(InputError, match="n_ctx"):
        cpuq.load(model.path, n_ctx=0)


def test_two_models_are_independent(demo):
    with cpuq.load(demo, n_ctx=128, n_threads=1) as a, cpuq.load(demo, n_ctx=128, n_threads=1) as b:
        ra = "".join(a.chat(QUESTION, temperature=0))
        "".join(b.generate("Bananas are", max_tokens=8, temperature=0))
        history = QUESTION + [{"role": "assistant", "content": ra}, {"role": "user", "content": "And of Germany?"}]
        assert "Berlin" in "".join(a.chat(history, temperature=0))
        np.testing.assert_array_equal(a.logits([1, 2, 3]), b.logits([1, 2, 3]))


def test_ctrl_c_during_a_prompt_chunk_is_raised_after_it(demo, monkeypatch, request):
    """SIGINT in the middle of a chunk's forward pass becomes a KeyboardInterrupt only after
    the chunk: raised inside Numba's dispatcher (the main thread loads kernels for its share
    of the chunk) it could leave Numba's compiler lock taken, and a worker's next kernel
    load then hung the process (seen in cpuq chat). The model works afterwards."""
    import os
    import signal
    import threading

    import cpuq.runtime.forward as model_module  # Paths.run calls its forward()
    real_forward = model_module.forward
    seen = []
    # Python's own handler, as in a terminal: a background job of a non-interactive shell
    # (CI started with `cmd &`) starts with SIGINT ignored, and the kill would do nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def forward_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this, the main, thread
        out = real_forward(*args, **kwargs)
        seen.append("finished")
        return out

    with cpuq.load(demo, n_ctx=256, n_threads=2) as m:
        ids = m.tokenize("The capital of France is")
        expected = m.logits(ids)
        monkeypatch.setattr(model_module, "forward", forward_hit_by_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            m.logits(ids)
        # the chunk ran to its end first (a short one runs token by token: one forward() each)
        assert seen == ["finished"] * (len(ids) if m._paths.choose(len(ids), None) == "tokens" else 1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        monkeypatch.setattr(model_module, "forward", real_forward)
        result = []
        worker = threading.Thread(target=lambda: result.append(m.logits(ids)), daemon=True)
        worker.start()
        worker.join(60)  # a leaked compiler lock would hang here
        assert result and np.array_equal(result[0], expected)
