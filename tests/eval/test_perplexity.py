"""cpuq perplexity against llama.cpp's llama-perplexity, and its windows, KL and CLI.

The reference numbers are llama-perplexity's own output on the demo model over
tests/data/tempest.txt (tests/golden/perplexity.json, from tools/make_perplexity_golden.py;
tests/eval/test_perplexity_peer.py re-runs it live). The issue's bar: within 0.5%.
Measured: 39.9017 vs 40.0951 (ctx 512, -0.48%), 38.4644 vs 38.5245 (ctx 256, -0.16%). The
gap is llama.cpp's 8-bit activation rounding, not cpuq's: cpuq's float32 prompt path gives
39.9022 at ctx 512, 1e-5 from its int8 path (kernels.qgemm, ~16-bit x)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cpuq
from cpuq.cli import app
from cpuq.demo import demo_model_path
from cpuq.errors import InputError
from cpuq.eval.perplexity import log_softmax_rows, perplexity, windows

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "data" / "tempest.txt"
GOLDEN = json.loads((ROOT / "tests" / "golden" / "perplexity.json").read_text())


@pytest.fixture(scope="module")
def model():
    with cpuq.load(demo_model_path(), n_ctx=512) as m:
        yield m


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"ctx{c['ctx']}")
def test_agrees_with_llama_perplexity(model, case):
    r = perplexity(model, TEXT.read_text(), n_ctx=case["ctx"], n_chunks=case["chunks"])
    assert r.n_chunks == case["chunks"] and r.n_scored == case["chunks"] * (case["ctx"] - 1 - case["ctx"] // 2)
    assert abs(r.ppl / case["ppl"] - 1) <= 0.005, (r.ppl, case["ppl"])
    assert abs(r.ppl_error / case["ppl_error"] - 1) <= 0.02, (r.ppl_error, case["ppl_error"])  # same formula


def test_windows_and_scoring_by_hand(model):
    """The windows llama-perplexity takes (BOS in place of each window's first token when
    the vocabulary adds one), and exp(mean NLL) over their second halves, recomputed from
    Model.logits over whole windows."""
    tokens = model.tokenize(TEXT.read_text())
    bos = model.tokenizer.bos_id if model.tokenizer.vocab.add_bos else None
    wins = windows(tokens, 64, 3, bos)
    assert len(wins) == 3 and all(len(w) == 64 for w in wins)
    assert [w[1:].tolist() for w in wins] == [tokens[i * 64 + 1:(i + 1) * 64] for i in range(3)]
    assert len(windows(tokens, 64, None, bos)) == len(tokens) // 64
    nll = []
    for w in wins:
        lp = log_softmax_rows(model.logits(w))
        nll += [-lp[p, w[p + 1]] for p in range(32, 63)]
    r = perplexity(model, TEXT.read_text(), n_ctx=64, n_chunks=3)
    assert r.n_scored == len(nll)
    assert math.isclose(r.ppl, math.exp(np.mean(nll)), rel_tol=1e-5)  # same logits, rows computed apart


def test_kl_against_itself_is_zero(model):
    r = perplexity(model, TEXT.read_text(), n_ctx=64, n_chunks=2, kl_base=model)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-12) and r.kl_p99 == pytest.approx(0.0, abs=1e-12)
    assert r.top1_agreement == 1.0 and r.delta_ppl_percent == pytest.approx(0.0, abs=1e-9)
    assert r.base_ppl == pytest.approx(r.ppl, rel=1e-12)


def test_bad_input(model):
    with pytest.raises(InputError, match="needs at least 1024"):
        perplexity(model, "too short", n_ctx=512)
    with pytest.raises(InputError, match="even number"):
        perplexity(model, TEXT.read_text(), n_ctx=63)
    with pytest.raises(InputError, match="--chunks"):
        perplexity(model, TEXT.read_text(), n_ctx=64, n_chunks=0)


def test_cli(tmp_path):
    runner = CliRunner()
    path = str(demo_model_path())
    res = runner.invoke(app, ["perplexity", path, "-f", str(TEXT), "--ctx", "128", "--chunks", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_chunks"] == 2 and out["ppl"] > 1 and out["base"] is None
    res = runner.invoke(app, ["perplexity", path, "-f", str(TEXT), "--ctx", "128", "--chunks", "2",
                              "--kl-base", path])
    assert res.exit_code == 0, res.output
    assert "perplexity:" in res.stdout and "top-1 agreement 100.00%" in res.stdout
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    for args, msg in ((["-f", str(bad)], "not UTF-8 text (byte 3)"),
                      (["-f", str(tmp_path / "missing.txt")], "cannot read the text file"),
                      (["-f", str(TEXT), "--ctx", "8192"], "needs at least 16384")):
        res = runner.invoke(app, ["perplexity", path, *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
