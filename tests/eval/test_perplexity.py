"""cpuq perplexity against llama.cpp's llama-perplexity, and its windows, KL and CLI.

The reference numbers are llama-perplexity's own output on the demo model over
tests/data/tempest.txt (tests/golden/perplexity.json, from tools/make_perplexity_golden.py;
tests/eval/test_perplexity_peer.py re-runs it live). The issue's bar: within 0.5%.
Measured: 39.9017 vs 40.0951 (ctx 512, -0.48%), 38.4644 vs 38.5245 (ctx 256, -0.16%). The
gap is llama.cpp's 8-bit activation rounding, not cpuq's: cpuq's float32 prompt path gives
39.9022 at ctx 512, 1e-5 from its int8 path (kernels.qgemm, ~16-bit x)."""
import json
import math
import shutil
from pathlib import Path

import gguf
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


@pytest.fixture(scope="module")
def perturbed(module_tmp_factory):
    """The demo model with token_embd.weight (Q8_0; tied, so also the output matrix)
    requantized through Q4_0 by gguf-py, written in place into a copy: the same layout,
    the same tokenizer, weights 11% (relative L2) away from the original's."""
    path = module_tmp_factory.mktemp("perturbed") / "demo-embd-q4_0.gguf"
    shutil.copyfile(demo_model_path(), path)
    t = next(t for t in gguf.GGUFReader(demo_model_path()).tensors if t.name == "token_embd.weight")
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    blocks = gguf.quants.quantize(gguf.quants.dequantize(gguf.quants.quantize(x, q4_0), q4_0), t.tensor_type)
    assert blocks.nbytes == t.n_bytes
    with open(path, "r+b") as f:
        f.seek(t.data_offset)
        f.write(blocks.tobytes())
    with cpuq.load(path, n_ctx=512) as m:
        yield m


def reference_scores(model, base, n_ctx: int, n_chunks: int) -> dict:
    """Per scored position, computed here in float64 from Model.logits over whole windows:
    the NLL of each model, KL(base || model) = sum_v p_base (log p_base - log p_model), and
    whether the two argmaxes agree. Log-normalizers by np.logaddexp.reduce (a sequential
    log-sum-exp), not cpuq's max-shifted sum of exponentials."""
    tokens = model.tokenize(TEXT.read_text())
    assert base.tokenize(TEXT.read_text()) == tokens
    bos = model.tokenizer.bos_id if model.tokenizer.vocab.add_bos else None
    nll, base_nll, kl, agree = [], [], [], []
    for w in windows(tokens, n_ctx, n_chunks, bos):
        rows, targets = slice(n_ctx // 2, n_ctx - 1), w[n_ctx // 2 + 1:]
        lm, lb = (x.logits(w)[rows].astype(np.float64) for x in (model, base))
        lm -= np.logaddexp.reduce(lm, axis=1, keepdims=True)
        lb -= np.logaddexp.reduce(lb, axis=1, keepdims=True)
        at = np.arange(len(targets)), targets
        nll += list(-lm[at])
        base_nll += list(-lb[at])
        kl += list((np.exp(lb) * (lb - lm)).sum(axis=1))
        agree += list(lm.argmax(axis=1) == lb.argmax(axis=1))
    return {"nll": np.array(nll), "base_nll": np.array(base_nll), "kl": np.array(kl), "agree": np.array(agree)}


def percentile_99(values: np.ndarray) -> float:
    """The 99th percentile, linear between the two nearest order statistics (numpy's default
    method, which llama-perplexity's sorted-index estimate approximates)."""
    v = np.sort(values)
    pos = 0.99 * (len(v) - 1)
    lo = int(math.floor(pos))
    return float(v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo]))


# KL, perplexities and top-1 of two different files against the float64 recomputation above.
# Both start from the same float32 logits (Model.logits over a whole window gives the same
# rows as the scored-rows-only call perplexity makes: measured bit-identical); only the
# float64 log-normalizer differs in summation order, off by at most n_vocab * 2^-53 = 5.5e-12
# absolute, which moves each position's KL and NLL by as much: relative to KL ~0.1 and NLL
# ~3.8, under 1e-10 (the perplexity change, a difference of two perplexities 7% apart, under
# 1e-9 by the same bound times ~15). Bar 1e-9; measured (both directions) 9.1e-14 kl_mean,
# 1.0e-12 kl_p99, 3.6e-15 ppl and base_ppl, 9.7e-14 delta_ppl_percent.
KL_REL = 1e-9


def test_kl_of_a_different_model_by_hand(model, perturbed):
    ref = reference_scores(perturbed, model, 64, 3)
    r = perplexity(perturbed, TEXT.read_text(), n_ctx=64, n_chunks=3, kl_base=model)
    assert r.n_scored == len(ref["kl"]) == 3 * 31
    assert r.base == str(model.path) and r.model == str(perturbed.path)
    ppl, base_ppl = math.exp(ref["nll"].mean()), math.exp(ref["base_nll"].mean())
    assert r.ppl == pytest.approx(ppl, rel=KL_REL) and r.base_ppl == pytest.approx(base_ppl, rel=KL_REL)
    assert r.delta_ppl_percent == pytest.approx((ppl - base_ppl) / base_ppl * 100, rel=KL_REL)
    assert r.kl_mean == pytest.approx(float(ref["kl"].mean()), rel=KL_REL)
    assert r.kl_p99 == pytest.approx(percentile_99(ref["kl"]), rel=KL_REL)
    assert r.top1_agreement == ref["agree"].mean()  # a count of equal argmaxes over 93: exact
    # Gibbs: KL >= 0, and > 0 wherever the distributions differ: at every position here
    # (measured minimum 0.0040); the perturbed model is measurably away from the base:
    # measured kl_mean 0.105, p99 0.271, top-1 86.0%, perplexity 47.50 against 44.31 (+7.19%)
    assert ref["kl"].min() > 1e-4
    assert r.kl_mean > 0.01 and r.kl_p99 > r.kl_mean and 0.5 < r.top1_agreement < 1
    assert r.delta_ppl_percent > 1


def test_kl_is_base_to_model_not_symmetric(model, perturbed):
    """Swapping model and base gives KL(model || base): a different number (asymmetric; measured
    0.10616 against 0.10535, p99 0.300 against 0.271), equal to its own recomputation, with the
    two perplexities swapped and top-1 agreement unchanged."""
    forward = perplexity(perturbed, TEXT.read_text(), n_ctx=64, n_chunks=3, kl_base=model)
    swapped = perplexity(model, TEXT.read_text(), n_ctx=64, n_chunks=3, kl_base=perturbed)
    ref = reference_scores(model, perturbed, 64, 3)
    assert swapped.kl_mean == pytest.approx(float(ref["kl"].mean()), rel=KL_REL)
    assert swapped.kl_p99 == pytest.approx(percentile_99(ref["kl"]), rel=KL_REL)
    # the direction matters by far more than the bar: measured 7.6e-3 relative on the mean
    assert abs(swapped.kl_mean / forward.kl_mean - 1) > 1e-3
    assert abs(swapped.kl_p99 / forward.kl_p99 - 1) > 1e-3
    # the same logits scored the same way: the same numbers, bit for bit (measured)
    assert swapped.ppl == forward.base_ppl and swapped.base_ppl == forward.ppl
    assert swapped.top1_agreement == forward.top1_agreement


def test_bad_input(model):
    with pytest.raises(InputError, match="needs at least 1024"):
        perplexity(model, "too short", n_ctx=512)
    with pytest.raises(InputError, match="even number"):
        perplexity(model, TEXT.read_text(), n_ctx=63)
    with pytest.raises(InputError, match="n_chunks"):
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
