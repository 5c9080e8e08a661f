"""Calibration on the Gated-DeltaNet hybrids (qwen35, qwen3next): the importance matrix
cpuq collects covers the DeltaNet blocks' matrices as well as attention's, and channel
scaling driven by it (convert.scaling's lin / lin_ba groups, divided out of attn_norm) keeps
the function the model computes.

What each check is measured against:
* The entries: one per matrix llama-imatrix would see (every matrix product in the blocks),
  of the matrix's row length; the matrices that read one input (a DeltaNet block's
  attn_qkv, attn_gate and ssm_beta/ssm_alpha or ssm_ba; attention's q/k/v) hold the same
  sums, summed over every token of every window.
* The fold: the scales the Q4_K_M conversion searched on that importance, folded into an F32
  file instead, give HF transformers' logits of the unscaled checkpoint
  (tests/golden/hybrid_logits.npz) to test_hybrid's bar and cpuq's logits of the plain F32
  file to float32 rounding (test_scaling's bar, 2e-6).
* The Q4_K_M file made with the importance matrix and scaling runs and scores The Tempest
  (cpuq perplexity), its KL divergence from the Q8_0 file near the plain Q4_K_M file's.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import cpuq
from cpuq.arch import ModelConfig
from cpuq.cli import app
from cpuq.convert import pipeline, scaling
from cpuq.convert.imatrix import Imatrix
from make_hybrid_golden import IDS, build_case

ROOT = Path(__file__).resolve().parents[2]
TEMPEST = ROOT / "tests" / "data" / "tempest.txt"
GOLDEN = ROOT / "tests" / "golden" / "hybrid_logits.npz"
# The hybrid golden's cases (f32 storage, so HF's logits are of the exact checkpoint):
# qwen35 with separate ssm_beta / ssm_alpha and a dense MLP; qwen3next with the fused
# ssm_ba, 2 key heads for 4 value heads, experts and the mtp block.
CASES = {"qwen35": ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha"),
         "qwen3next": ("attn_qkv", "attn_gate", "ssm_ba")}
N_CTX, N_CHUNKS = 64, 6  # 6 windows of 64 tokens: seconds on the tiny models


def rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.fixture(scope="module", params=sorted(CASES))
def calibrated(request, module_tmp_factory):
    """One case: its checkpoint, the Q8_0 file the importance matrix is collected on (`cpuq
    imatrix` over the first half of The Tempest), the Q4_K_M files with that matrix and
    channel scaling and without either, and the scales the scaled conversion chose per block."""
    name = request.param
    where = module_tmp_factory.mktemp(f"calibrate-{name}")
    src = build_case(name, where)
    q8 = cpuq.convert(src, where / "q8_0.gguf", "q8_0")
    text = where / "calibration.txt"
    text.write_text(TEMPEST.read_text(encoding="utf-8")[:15000], encoding="utf-8")
    r = CliRunner().invoke(app, ["imatrix", str(q8), "-f", str(text), "-o", str(where / "im.gguf"),
                                 "--ctx", str(N_CTX), "--chunks", str(N_CHUNKS)])
    assert r.exit_code == 0, r.output
    chosen: dict[int, scaling.BlockScales] = {}
    real_search = scaling.search_block

    def record(il, *args):
        chosen[il] = real_search(il, *args)
        return chosen[il]
    mp = pytest.MonkeyPatch()
    mp.setattr(scaling, "search_block", record)
    try:
        awq = cpuq.convert(src, where / "awq.gguf", "q4_k_m", imatrix=where / "im.gguf", awq=True)
    finally:
        mp.undo()
    plain = cpuq.convert(src, where / "plain.gguf", "q4_k_m")
    return SimpleNamespace(name=name, where=where, src=src, q8=q8, im=Imatrix.read(where / "im.gguf"), awq=awq,
                           plain=plain, chosen=chosen)


def test_imatrix_covers_deltanet_and_attention(calibrated):
    c = calibrated
    with cpuq.open_gguf(c.q8) as f:
        cfg = ModelConfig.from_gguf(f)
        matrices = {t.name: t.shape for t in f if t.name.startswith("blk.") and len(t.shape) >= 2
                    and t.name.endswith(".weight") and "ssm_conv1d" not in t.name}
    n_blocks = cfg.n_layer + cfg.n_nextn
    assert cfg.n_layer == 4 and cfg.recurrent == (True, True, True, False)
    tokens = N_CTX * N_CHUNKS
    for il in range(cfg.n_layer):
        if cfg.recurrent[il]:
            inputs, own = CASES[c.name], ("ssm_out",)
        else:
            inputs, own = ("attn_q", "attn_k", "attn_v"), ("attn_output",)
        names = [f"blk.{il}.{m}.weight" for m in (*inputs, *own)]
        for n in names:
            imp = c.im.importance(n)
            assert imp is not None, n
            assert imp.shape == (matrices[n][-1],) and np.isfinite(imp).all() and (imp > 0).all(), n
            assert c.im.counts[n].tolist() == [tokens], n  # every token of every window
        # the matrices reading the block's normed input: one set of sums
        first = c.im.sums[names[0]]
        for n in names[1:len(inputs)]:
            np.testing.assert_array_equal(c.im.sums[n], first, err_msg=n)
        # and not the output projection's input (another vector, another length or not)
        assert c.im.sums[names[-1]].shape != first.shape or not np.allclose(c.im.sums[names[-1]], first)
    # every matrix of the trunk that llama-imatrix would see has its entry; the prediction
    # blocks after the trunk are not run, as llama.cpp does not run them
    trunk = {n for n in matrices if int(n.split(".")[1]) < cfg.n_layer and "ffn_gate_inp" not in n}
    assert trunk <= set(c.im.sums), sorted(trunk - set(c.im.sums))
    assert not any(int(n.split(".")[1]) >= cfg.n_layer for n in c.im.sums) and n_blocks >= cfg.n_layer


def _deltanet_groups(c) -> dict[int, str]:
    """Block -> the DeltaNet input group the Q4_K_M search chose there."""
    group = "lin" if c.name == "qwen35" else "lin_ba"
    return {il: group for il, b in c.chosen.items() if group in b.scales}


def test_search_scales_the_deltanet_input(calibrated):
    """On the collected importance, the Q4_K_M conversion's search scaled the DeltaNet input
    group of every DeltaNet block (and attention's where it chose to), so the fold below
    crosses it; the scales are the documented ones for the chosen alpha."""
    c = calibrated
    assert sorted(c.chosen) == list(range(4 + (1 if c.name == "qwen3next" else 0)))  # mtp's block too
    assert sorted(_deltanet_groups(c)) == [0, 1, 2], {il: b.alphas for il, b in c.chosen.items()}
    for il, b in c.chosen.items():
        assert set(b.scales) <= ({"lin", "mlp", "down"} if c.name == "qwen35" else {"lin_ba"}) | {"attn", "o"}
        for g, s in b.scales.items():
            assert b.alphas[g] > 0 and np.isfinite(s).all() and (s > 0).all()
            assert abs(np.log(s).mean()) < 1e-9  # geometric mean 1
    with cpuq.open_gguf(c.awq) as f:
        assert f.get("cpuq.channel_scaling", "").startswith("awq")


def test_scaled_f32_file_computes_the_same_function(calibrated, tmp_path, monkeypatch):
    """The scales the Q4_K_M conversion chose, folded into an F32 file by the same converter
    (the search is replaced by them: at F32 there is no rounding error to search over, and
    an F32 conversion takes no importance matrix, so that check is lifted here), give the
    plain F32 file's function."""
    c = calibrated
    golden = np.load(GOLDEN)
    monkeypatch.setattr(scaling, "search_block", lambda il, *args: c.chosen[il])
    monkeypatch.setattr(pipeline, "check_uses_importance", lambda out: None)
    scaled = cpuq.convert(c.src, tmp_path / "scaled.gguf", "f32", imatrix=c.im, awq=True)
    monkeypatch.undo()
    plain = cpuq.convert(c.src, tmp_path / "plain.gguf", "f32")

    # the file really is scaled: a chosen group's matrices have their columns times s, the
    # tensors dividing it out their rows (norms: values) divided by s; everything else is
    # the plain file's, bit for bit
    changed = 0
    with cpuq.open_gguf(plain) as a, cpuq.open_gguf(scaled) as b:
        cfg = ModelConfig.from_gguf(a)
        assert [t.name for t in a] == [t.name for t in b]
        for t in a:
            got, want = b.tensor(t.name).data.view(np.float32), t.data.view(np.float32)
            m = re.match(r"blk\.(\d+)\.(.+)$", t.name)
            block = c.chosen.get(int(m.group(1))) if m else None
            part = m.group(2) if m else ""
            cols = next((g for g in block.scales if part[:-len(".weight")] in scaling.GROUPS[g][0]), None) \
                if block and part.endswith(".weight") else None
            rows = next((g for g in scaling.ROW_DIVIDED.get(part, ()) if g in block.scales), None) if block else None
            if cols is None and rows is None:
                np.testing.assert_array_equal(got, want, err_msg=t.name)
                continue
            x = want.reshape(t.shape).astype(np.float64)
            if cols is not None:
                x = x * block.scales[cols]
            if rows is not None:
                div = block.scales[rows]
                if rows == "o":  # attn_output's input (head h, e) is value row (h // n_group, e)
                    div = div.reshape(cfg.n_head_kv, cfg.n_head // cfg.n_head_kv, cfg.head_dim)[:, 0].reshape(-1)
                x = (x.T / div).T
            # a float32 rounding of the product and one of the quotient (ffn_up has both)
            np.testing.assert_allclose(got.reshape(t.shape), x, rtol=2 ** -22, err_msg=t.name)
            assert not np.array_equal(got, want), t.name
            changed += 1
        for il in _deltanet_groups(c):
            for n in (*(f"blk.{il}.{m}.weight" for m in CASES[c.name]), f"blk.{il}.attn_norm.weight"):
                assert not np.array_equal(a.tensor(n).data, b.tensor(n).data), n
    assert changed >= 3 * (len(CASES[c.name]) + 1)

    with cpuq.load(plain, n_ctx=128, kv_type="f32") as m:
        want = m.logits(IDS)
    with cpuq.load(scaled, n_ctx=128, kv_type="f32") as m:
        got = m.logits(IDS)
    cols = golden[f"{c.name}/columns"]
    # HF's logits of the unscaled checkpoint, to test_hybrid's bar (the plain files measure
    # 2.3e-6 qwen35, 5.0e-6 qwen3next): measured 2.5e-6 qwen35, 3.4e-6 qwen3next
    err_hf = rel_rms(got[:, cols], golden[f"{c.name}/hf"])
    assert err_hf <= 1e-4, f"scaled F32 file vs HF: {err_hf:.2e}"
    assert np.array_equal(got.argmax(1), golden[f"{c.name}/hf_top1"])
    # cpuq's logits of the plain file, all columns: the float32 rounding of w * s and of
    # the products and sums over differently scaled terms, carried along 80 tokens by the
    # recurrent state, as far as the plain file is from HF (measured 2.3e-6 qwen35, 3.3e-6
    # qwen3next). Bar 1e-5, test_hybrid's for float32 summation order; attn_norm not
    # divided by the DeltaNet group's scales moves them by 0.18 qwen35, 0.56 qwen3next.
    err = rel_rms(got, want)
    assert err <= 1e-5, f"scaled F32 file vs the plain one: {err:.2e}"


def test_q4_k_m_with_the_imatrix_scores_the_tempest(calibrated):
    """Smoke: the Q4_K_M file made with the importance matrix and channel scaling runs
    through `cpuq perplexity` on text it was not calibrated on, against the Q8_0 file as
    the base. Random tiny weights predict The Tempest no better than chance (perplexity
    near the vocabulary's 151936, whatever the file), so what is asserted is the KL
    divergence from the Q8_0 file: no more than 1.25x the plain Q4_K_M file's, the bar
    test_scaling's test_awq_file_quality holds dense models to (measured KL
    2.8e-3 against 2.9e-3 qwen35, 5.3e-3 against 6.3e-3 qwen3next: ratios 0.96, 0.84)."""
    c = calibrated
    text = c.where / "scored.txt"
    text.write_text(TEMPEST.read_text(encoding="utf-8")[15000:], encoding="utf-8")
    res = {}
    for kind, path in (("imatrix", c.awq), ("plain", c.plain)):
        r = subprocess.run([sys.executable, "-m", "cpuq.cli", "perplexity", str(path), "-f", str(text),
                            "--ctx", str(N_CTX), "--chunks", "4", "--kl-base", str(c.q8), "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        res[kind] = json.loads(r.stdout)
    for kind, r in res.items():
        assert np.isfinite(r["ppl"]) and 1 < r["ppl"] and np.isfinite(r["kl_mean"]) and r["kl_mean"] > 0, (kind, r)
    assert res["imatrix"]["kl_mean"] <= 1.25 * res["plain"]["kl_mean"], res
