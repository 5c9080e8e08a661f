"""cpuq.eval.bench and `cpuq bench` on a tiny Qwen2 GGUF (1 layer, hidden 64, the real
151936-token Qwen2 vocabulary, Q8_0): the shape of the results, what one repetition
evaluates, the benchmark prompt, the table and JSON output, and bad input."""
from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

import cpuq
from cpuq import CpuqError, InputError
from cpuq.cli import app
from cpuq.eval.bench import BenchResult, bench, prompt_ids
from cpuq.runtime.model import Model
from cpuq.runtime.tokenizer import CONTROL, NORMAL, UNUSED, Tokenizer


@pytest.fixture(scope="module")
def tiny_model(module_tmp_factory):
    import make_tiny_checkpoint
    where = module_tmp_factory.mktemp("bench")
    src = make_tiny_checkpoint.make_tiny_checkpoint(where / "src", arch="qwen2", dtype="bf16", num_hidden_layers=1)
    return cpuq.convert(src, where / "tiny-q8_0.gguf", "q8_0")


def test_result_shape_and_statistics(tiny_model):
    calls = []
    results = bench(tiny_model, n_prompt=8, n_gen=4, repeat=3, n_threads=1,
                    progress=lambda *a: calls.append(a))
    pp, tg = results
    assert all(isinstance(r, BenchResult) for r in results)
    assert (pp.test, pp.n_tokens, pp.n_depth, tg.test, tg.n_tokens, tg.n_depth) == ("pp8", 8, 0, "tg4", 4, 8)
    assert pp.n_threads == tg.n_threads == 1
    for r in results:
        assert len(r.seconds) == 3 and all(s > 0 for s in r.seconds)
        rates = [r.n_tokens / s for s in r.seconds]
        assert r.samples_per_second == pytest.approx(rates)
        assert r.mean_tokens_per_second == pytest.approx(statistics.mean(rates))
        assert r.std_tokens_per_second == pytest.approx(statistics.stdev(rates))  # sample stddev, as llama-bench
        d = r.to_dict()
        assert d["avg_ts"] == r.mean_tokens_per_second and d["samples_s"] == list(r.seconds)
    # warm-up (0) first, then each counted repetition: prefill before decode
    assert calls == [(t, rep, 3) for rep in range(4) for t in ("pp8", "tg4")]


def test_one_repetition_has_zero_spread():
    r = BenchResult("tg4", 4, (0.5,), 8, 1)
    assert r.mean_tokens_per_second == 8.0 and r.std_tokens_per_second == 0.0


def test_what_a_repetition_evaluates(tiny_model, monkeypatch):
    """Every repetition (warm-up included) is a fresh prompt in one call, then n_gen
    single-token steps, each feeding the top token of the step before."""
    evals = []
    real_eval = Model.eval

    def spy(self, ids):
        if not evals or len(ids) > 1:
            assert len(self._tokens) == 0  # the prompt goes into a reset context
        logits = real_eval(self, ids)
        evals.append((list(ids), int(np.argmax(logits))))
        return logits

    monkeypatch.setattr(Model, "eval", spy)
    bench(tiny_model, n_prompt=6, n_gen=3, repeat=2, n_threads=1)
    assert [len(ids) for ids, _ in evals] == [6, 1, 1, 1] * 3
    prompts = [ids for ids, _ in evals[::4]]
    assert prompts[0] == prompts[1] == prompts[2]
    for rep in range(3):
        chain = evals[4 * rep:4 * rep + 4]
        for (_, top), (ids, _) in zip(chain, chain[1:]):
            assert ids == [top]


def test_prompt_ids_are_seeded_ordinary_tokens():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
          "tokenizer.ggml.tokens": ["<s>", "a", "b", "c", "</s>", "[PAD5]"],
          "tokenizer.ggml.token_type": [CONTROL, NORMAL, NORMAL, NORMAL, CONTROL, UNUSED],
          "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 4}
    tok = Tokenizer.from_metadata(md)
    ids = prompt_ids(tok, 200, seed=1)
    assert len(ids) == 200 and set(ids) == {1, 2, 3}  # every ordinary token, nothing else
    assert prompt_ids(tok, 200, seed=1) == ids and prompt_ids(tok, 200, seed=2) != ids
    with_bos = prompt_ids(Tokenizer.from_metadata({**md, "tokenizer.ggml.add_bos_token": True}), 200, seed=1)
    assert with_bos[0] == 0 and with_bos[1:] == ids[1:]


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_prompt=0), "n_prompt must be a positive integer"),
    (dict(n_gen=-1), "n_gen must be a positive integer"),
    (dict(repeat=0), "repeat must be a positive integer"),
    (dict(n_gen=True), "n_gen must be a positive integer"),
    (dict(n_prompt=32760, n_gen=9), "32769 tokens, more than the model's context length of 32768"),
    (dict(n_threads=0), "n_threads"),
])
def test_bad_arguments(tiny_model, kwargs, words):
    with pytest.raises(InputError, match=re.escape(words)):
        bench(tiny_model, **{"n_prompt": 4, "n_gen": 2, "repeat": 1, **kwargs})


def test_bad_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(4))
    with pytest.raises(CpuqError, match="x.gguf"):
        bench(tmp_path / "x.gguf", n_prompt=4, n_gen=2)


# the command ---------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *map(str, args)], env={"COLUMNS": "200"})


def test_command_prints_a_table(tiny_model):
    r = invoke(tiny_model, "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2", "--threads", "1")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "size", "params", "types", "test", "t/s"]
    assert re.fullmatch(r"\| -+ \| -+: \| -+: \| -+ \| -+: \| -+: \|", lines[1]), lines[1]
    for line, test in zip(lines[2:], ("pp8", "tg4")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == "tiny-q8_0.gguf" and cells[1].endswith("MiB") and cells[4] == test, cells
        assert cells[3] == "Q8_0, F32", cells
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cells[5]), cells
        assert float(cells[5].split(" ± ")[0]) > 0
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert r.stderr.startswith("1 thread, 2 repetitions after a warm-up"), r.stderr


def test_command_json(tiny_model):
    r = invoke(tiny_model, "--prompt-tokens", "8", "-n", "4", "-r", "2", "-t", "1", "--json")
    assert r.exit_code == 0, r.output
    tests = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert [t["test"] for t in tests] == ["pp8", "tg4"]
    for t in tests:
        assert {"model", "model_path", "model_size", "model_n_params", "types", "test", "n_tokens", "n_depth",
                "n_threads", "avg_ts", "stddev_ts", "samples_ts", "samples_s"} <= t.keys()
        assert len(t["samples_s"]) == len(t["samples_ts"]) == 2 and t["avg_ts"] > 0 and t["n_threads"] == 1
        assert t["model"] == "tiny-q8_0.gguf" and t["types"] == {"Q8_0": 8, "F32": 6}


@pytest.mark.parametrize("args, words", [
    (["--prompt-tokens", "0"], "--prompt-tokens must be a positive integer, not 0"),
    (["--gen-tokens", "-3"], "--gen-tokens must be a positive integer, not -3"),
    (["--prompt-tokens", "32768", "--gen-tokens", "1"], "more than the model's context length of 32768"),
    (["--threads", "0"], "--threads must be between 1 and"),
])
def test_command_bad_input_is_one_line_exit_2(tiny_model, args, words):
    r = invoke(tiny_model, *args)
    assert r.exit_code == 2 and r.stdout == "", r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


@pytest.mark.parametrize("name, content, words", [
    ("missing.gguf", None, "no such file"),
    ("notes.gguf", b"# not a model\n", "not a GGUF file"),
])
def test_command_bad_file_is_one_line_exit_2(tmp_path, name, content, words):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    r = invoke(tmp_path / name)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
