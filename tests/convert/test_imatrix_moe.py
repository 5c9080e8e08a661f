"""The importance matrix of mixture-of-experts models (one row and one count per expert of
each stack, llama-imatrix's MUL_MAT_ID collection), its file, convert --imatrix and
--calibrate on them, against llama.cpp's own llama-imatrix and llama-quantize --imatrix
through the golden files of tools/make_imatrix_moe_golden.py (tiny qwen3moe and qwen2moe
checkpoints over tests/data/tempest.txt). No llama.cpp needed here; test_imatrix_moe_peer.py
re-runs the tools live and checks the goldens are current.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

import cpuq
from cpuq.arch import ModelConfig
from cpuq.convert import scaling
from cpuq.convert.calibration import collect_imatrix
from cpuq.convert.imatrix import Imatrix
from cpuq.models import gguf_tensor_name
from cpuq.quants import get_qtype, quantize
from cpuq.quants.floats import round_through_f16
from make_imatrix_golden import sha256
from make_imatrix_moe_golden import moe_checkpoint
from tests.convert.test_imatrix import cpuq_cli
from tests.convert.test_scaling import fold_with_apply, read_weights, rel_rms, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "imatrix_moe.json").read_text())
TEXT = ROOT / GOLDEN["text"]
ARCHS = sorted(GOLDEN["archs"])
N_TOKENS = GOLDEN["ctx"] * GOLDEN["chunks"]
STACK = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight$")
# The routers are products llama-imatrix sees and cpuq's route op does not show its observer;
# llama-quantize keeps them F32, so their entries never weight a quantization.
ROUTERS = re.compile(r"blk\.\d+\.ffn_gate_inp(_shexp)?\.weight$")
# cpuq's importance against llama-imatrix's. llama.cpp rounds some activations to F16 that
# cpuq keeps in float32 (the attention products' inputs with its F16 KV cache; with F16
# weights every product's), so a token whose two router logits nearly tie can take another
# expert: at most REROUTED of a stack's (token, expert) picks may move (measured from the F32
# file: none at the golden's windows, at most 1 of 1280 at 64 x 10; from the F16 file at most
# 2 of 1536 at 128 x 6). Experts whose counts agree hold the same tokens, and their rows meet
# the dense golden's bars (test_imatrix.py: an F16 rounding, 4.9e-4, doubled by the square):
# 1e-3 per entry, 1e-2 per channel; measured here 2.6e-5 and 4.7e-4, live (peer test) up to
# 5.5e-4 and 4.7e-3 from the F16 file, where a moved pick also nudges the later layers.
REROUTED, BAR_ENTRY, BAR_CHANNEL = 0.01, 1e-3, 1e-2


def assert_agrees(ours: Imatrix, theirs: Imatrix) -> tuple[float, float, float]:
    """ours (cpuq's) against theirs (llama-imatrix's) over the same windows, as the bars above
    say; returns (most picks moved in one stack, worst relative L2, worst channel)."""
    missing = set(theirs.sums) - set(ours.sums)
    assert set(ours.sums) <= set(theirs.sums) and all(ROUTERS.match(n) for n in missing), sorted(missing)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    worst = [0.0, 0.0, 0.0]
    for name in ours.sums:
        c_ours, c_theirs = ours.counts[name], theirs.counts[name]
        assert c_ours.sum() == c_theirs.sum(), name  # each token takes n_expert_used experts in both
        moved = np.abs(c_ours - c_theirs).sum() / 2
        assert moved == 0 or (STACK.match(name) and moved <= REROUTED * c_theirs.sum()), (name, c_ours, c_theirs)
        rows = (c_ours == c_theirs) & (c_theirs > 0)
        a = theirs.importance(name).reshape(c_theirs.size, -1)[rows].astype(np.float64)
        b = ours.importance(name).reshape(c_ours.size, -1)[rows].astype(np.float64)
        rel, channel = np.linalg.norm(b - a) / np.linalg.norm(a), np.max(np.abs(b - a) / a)
        assert rel <= BAR_ENTRY and channel <= BAR_CHANNEL, (name, rel, channel)
        worst = [max(worst[0], moved), max(worst[1], rel), max(worst[2], channel)]
    return tuple(worst)


def stack_entries(im: Imatrix) -> list[str]:
    return sorted(n for n in im.sums if STACK.match(n))


def golden_imatrix(arch: str) -> Path:
    return ROOT / GOLDEN["archs"][arch]["imatrix"]


@pytest.fixture(scope="module")
def checkpoints(module_tmp_factory) -> dict[str, Path]:
    return {arch: moe_checkpoint(arch, module_tmp_factory.mktemp(f"moe-{arch}")) for arch in ARCHS}


@pytest.fixture(scope="module")
def f32_files(checkpoints, module_tmp_factory) -> dict[str, Path]:
    out = {}
    for arch, ckpt in checkpoints.items():
        path = cpuq.convert(ckpt, module_tmp_factory.mktemp(f"moe-f32-{arch}") / "f32.gguf", "f32")
        # The file llama-imatrix read; if this fails, make_tiny_checkpoint or the converter
        # changed: regenerate with tools/make_imatrix_moe_golden.py.
        assert sha256(path) == GOLDEN["archs"][arch]["f32_sha256"], arch
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def collected(f32_files) -> dict[str, Imatrix]:
    text = TEXT.read_text(encoding="utf-8")
    return {arch: collect_imatrix(f, text, n_ctx=GOLDEN["ctx"], n_chunks=GOLDEN["chunks"], dataset=GOLDEN["text"])
            for arch, f in f32_files.items()}


@pytest.fixture(scope="module")
def weighted(checkpoints, module_tmp_factory) -> Path:
    """The qwen3moe checkpoint to q4_k_m with the golden imatrix (the generator's path string)."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # quantize.imatrix.file holds the path as given
    try:
        return cpuq.convert(checkpoints["qwen3moe"], module_tmp_factory.mktemp("moe-q4") / "weighted.gguf", "q4_k_m",
                            imatrix=GOLDEN["archs"]["qwen3moe"]["imatrix"])
    finally:
        os.chdir(cwd)


# the file --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_golden_file_has_a_row_and_a_count_per_expert(arch, checkpoints):
    cfg = ModelConfig.from_hf_config(checkpoints[arch])
    im = Imatrix.read(golden_imatrix(arch))
    raw = {t.name: t for t in gguf.GGUFReader(golden_imatrix(arch)).tensors}
    stacks = stack_entries(im)
    assert len(stacks) == 3 * cfg.n_layer
    for name in stacks:
        n_per_row = cfg.n_ff_exp if "down" in name else cfg.n_embd
        assert im.sums[name].shape == (cfg.n_expert, n_per_row) and im.counts[name].shape == (cfg.n_expert,)
        # ggml's order (ne0 first): in_sum2 (n_per_row, n_expert), counts (1, n_expert)
        assert list(raw[name + ".in_sum2"].shape) == [n_per_row, cfg.n_expert]
        assert list(raw[name + ".counts"].shape) == [1, cfg.n_expert]
        # each token goes to exactly n_expert_used experts
        assert im.counts[name].sum() == N_TOKENS * cfg.n_expert_used, name
    for name in set(im.sums) - set(stacks):
        assert im.counts[name].tolist() == [N_TOKENS], name
        assert len(raw[name + ".in_sum2"].shape) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_file_rewrites_byte_identical(arch, tmp_path):
    out = Imatrix.read(golden_imatrix(arch)).write(tmp_path / "again.gguf")
    assert out.read_bytes() == golden_imatrix(arch).read_bytes()


def test_collected_file_round_trips(collected, tmp_path):
    im = collected["qwen2moe"]
    back = Imatrix.read(im.write(tmp_path / "im.gguf"))
    assert sorted(back.sums) == sorted(im.sums)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    for name in im.sums:
        np.testing.assert_array_equal(back.counts[name], im.counts[name], err_msg=name)
        # written as float32, as llama-imatrix writes its sums
        np.testing.assert_array_equal(back.sums[name], im.sums[name].astype(np.float32), err_msg=name)


def test_add_sends_each_experts_rows_to_its_row():
    """Small integers: every square and sum is exact, so equality is exact. An expert no
    token picked still has its row (count 0), as llama-imatrix sizes the entry by the stack."""
    rng = np.random.default_rng(3)
    im = Imatrix(chunk_size=8)
    a, b, c = (rng.integers(-20, 20, size=(n, 16)).astype(np.float32) for n in (3, 5, 2))
    im.add(a, ("blk.0.ffn_gate_exps.weight#2/4", "blk.0.ffn_up_exps.weight#2/4"))
    im.add(b, ("blk.0.ffn_gate_exps.weight#0/4", "blk.0.ffn_up_exps.weight#0/4"))
    im.add(c, ("blk.0.ffn_gate_exps.weight#2/4", "blk.0.ffn_up_exps.weight#2/4"))
    want = np.zeros((4, 16))
    want[0] = (b.astype(np.float64) ** 2).sum(0)
    want[2] = (np.concatenate([a, c]).astype(np.float64) ** 2).sum(0)
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        np.testing.assert_array_equal(im.sums[name], want)
        np.testing.assert_array_equal(im.counts[name], [5, 0, 5, 0])
        imp = im.importance(name).reshape(4, 16)
        np.testing.assert_array_equal(imp[[0, 2]], (want[[0, 2]] / 5).astype(np.float32))
        np.testing.assert_array_equal(imp[[1, 3]], np.ones((2, 16), np.float32))  # llama-quantize's rule


# collecting --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_collect_agrees_with_llama_imatrix(arch, collected, checkpoints):
    cfg = ModelConfig.from_hf_config(checkpoints[arch])
    ours, theirs = collected[arch], Imatrix.read(golden_imatrix(arch))
    assert (ours.chunk_count, ours.chunk_size) == (GOLDEN["chunks"], GOLDEN["ctx"])
    moved, rel, channel = assert_agrees(ours, theirs)
    for name in stack_entries(ours):
        assert ours.counts[name].sum() == N_TOKENS * cfg.n_expert_used, name
        assert (ours.counts[name] > 0).all(), name  # every expert picked: each row is compared
    print(f"\n{arch}: {moved:.0f} picks moved, max rel L2 {rel:.2g}, max channel {channel:.2g}")


# convert --imatrix ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_convert_with_imatrix_is_llama_quantizes_bytes(arch, checkpoints, weighted, tmp_path, monkeypatch):
    want = GOLDEN["archs"][arch]["quantized"]["q4_k_m"]
    if arch == "qwen3moe":
        out = weighted
    else:
        monkeypatch.chdir(ROOT)  # quantize.imatrix.file holds the path string as given
        out = cpuq.convert(checkpoints[arch], tmp_path / "q4_k_m.gguf", "q4_k_m",
                           imatrix=GOLDEN["archs"][arch]["imatrix"])
    assert out.stat().st_size == want["bytes"]
    assert sha256(out) == want["sha256"]  # bit-exact: files move between the tools


def test_expert_e_is_quantized_with_row_e(checkpoints, f32_files, weighted, tmp_path):
    """Every expert's bytes in the weighted file are its F16-rounded weights quantized with row
    e of the entry (and not with its neighbour's row), and the unweighted file differs from
    the weighted one in exactly the quantized matrices that have an entry."""
    im = Imatrix.read(golden_imatrix("qwen3moe"))
    plain = cpuq.convert(checkpoints["qwen3moe"], tmp_path / "plain.gguf", "q4_k_m")
    with cpuq.open_gguf(f32_files["qwen3moe"]) as f32, cpuq.open_gguf(weighted) as w, cpuq.open_gguf(plain) as p:
        for t in w:
            same = np.array_equal(t.data, p.tensor(t.name).data)
            # Q8_0 (attn_k with 8 experts) and the float types ignore importance, as in llama.cpp
            uses = t.qtype.name not in ("F32", "F16", "Q8_0") and t.name in im.sums
            assert same != uses, t.name
            if t.name not in stack_entries(im):
                continue
            n_expert, rows, cols = t.shape
            imp = im.importance(t.name).reshape(n_expert, cols)
            weights = f32.tensor(t.name).data.view(np.float32).reshape(n_expert, rows, cols)
            data = np.asarray(t.data).reshape(n_expert, rows, -1)
            for e in range(n_expert):
                x = round_through_f16(weights[e].copy())  # llama-quantize reads the F16 file
                assert np.array_equal(quantize(x, t.qtype.name, importance=imp[e]), data[e]), (t.name, e)
                other = quantize(x, t.qtype.name, importance=imp[(e + 1) % n_expert])
                assert not np.array_equal(other, data[e]), (t.name, e)


# --calibrate ---------------------------------------------------------------------------------

def test_awq_scales_attention_only_in_moe_blocks(checkpoints, weighted, tmp_path, monkeypatch):
    """Channel scaling's MLP groups are the dense ffn_gate/ffn_up/ffn_down; an MoE block has
    none, so its router, experts, shared expert and ffn_norm are the imatrix-only file's bytes,
    while attention is scaled where the search finds a gain."""
    monkeypatch.chdir(ROOT)
    scaled = cpuq.convert(checkpoints["qwen3moe"], tmp_path / "awq.gguf", "q4_k_m", awq=True,
                          imatrix=GOLDEN["archs"]["qwen3moe"]["imatrix"])
    changed = []
    with cpuq.open_gguf(scaled) as a, cpuq.open_gguf(weighted) as w:
        for t in a:
            if not np.array_equal(t.data, w.tensor(t.name).data):
                changed.append(t.name)
    assert changed and all(re.match(r"blk\.\d+\.attn_(q|k|v|output|norm)\.weight$", n) for n in changed), changed


def test_search_leaves_moe_mlp_unscaled(checkpoints):
    """Even with a salient importance for every name it is asked about, the search scales
    only the attention groups of an MoE block (the converter's qtypes hold no dense ffn_*)."""
    cfg = ModelConfig.from_hf_config(checkpoints["qwen3moe"])
    weights = read_weights(checkpoints["qwen3moe"])
    names = {gguf_tensor_name(cfg, k): k for k in weights}
    rng = np.random.default_rng(5)

    def importance(name):
        cols = cfg.n_ff_exp if "down" in name else cfg.n_head * cfg.head_dim if "attn_output" in name else cfg.n_embd
        return np.exp(rng.normal(0, 2, cols)).astype(np.float32)  # far from uniform

    # q4_k_m's types: Q4_K, or a fallback for attn_output's 128-wide rows
    qtypes = {n: get_qtype("Q4_K" if weights[k].shape[-1] % 256 == 0 else "Q5_0")
              for n, k in names.items() if n.startswith("blk.0.") and n.endswith(".weight")}
    found = scaling.search_block(0, cfg, importance, lambda n, a, b: weights[names[n]][a:b],
                                 lambda n: weights[names[n]].shape[0], qtypes, f16=True)
    assert set(found.scales) == {"attn", "o"}, found.alphas


def test_attention_scales_fold_exactly_in_moe(checkpoints, tmp_path):
    """The attention groups' folds (attn_norm / s, q/k/v columns * s; attn_v rows / s,
    attn_output columns * s) with random scales, through the converter's F32 path: the MoE
    model's logits are unchanged to float32 rounding, as test_scaling.py shows for dense."""
    src = checkpoints["qwen3moe"]
    cfg = ModelConfig.from_hf_config(src)
    rng = np.random.default_rng(12)
    n_group = cfg.n_head // cfg.n_head_kv
    blocks = {}
    for il in range(cfg.n_layer):
        s_kv = np.exp(rng.uniform(-1.5, 1.5, (cfg.n_head_kv, cfg.head_dim)))
        blocks[il] = scaling.BlockScales({"attn": np.exp(rng.uniform(-1.5, 1.5, cfg.n_embd)),
                                          "o": np.repeat(s_kv, n_group, axis=0).reshape(-1)}, {"attn": 0.1, "o": 0.2})
    scaled_src = write_checkpoint(src, tmp_path / "scaled", fold_with_apply(read_weights(src), cfg, blocks))
    ids = list(range(1000, 1040))
    with cpuq.load(cpuq.convert(src, tmp_path / "plain.gguf", "f32"), n_ctx=64, kv_type="f32") as m:
        want = m.logits(ids)
    with cpuq.load(cpuq.convert(scaled_src, tmp_path / "scaled.gguf", "f32"), n_ctx=64, kv_type="f32") as m:
        got = m.logits(ids)
    # test_scaling.py's bar for the dense folds: float32 rounding of w * s and of products
    # over differently scaled terms (measured 2-3e-7 there, 7.5e-7 here); the same top token.
    assert rel_rms(got, want) <= 2e-6
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_cli_calibrate_converts_an_moe_checkpoint(checkpoints, tmp_path):
    """cpuq convert --calibrate on qwen2moe (routed and shared experts): the file loads and runs,
    says it was channel-scaled, and its expert stacks are quantized with an importance
    (they differ from the plain conversion's) while the routers stay F32."""
    out = tmp_path / "cal.gguf"
    r = cpuq_cli("convert", str(checkpoints["qwen2moe"]), "-o", str(out), "--type", "q4_k_m",
                 "--calibrate", str(TEXT), "--calibrate-ctx", "64", "--calibrate-chunks", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.gguf"]  # the temporary Q8_0 file is gone
    plain = cpuq.convert(checkpoints["qwen2moe"], tmp_path / "plain.gguf", "q4_k_m")
    with cpuq.open_gguf(out) as c, cpuq.open_gguf(plain) as p:
        assert c.get("cpuq.channel_scaling", "").startswith("awq")
        assert c.get("quantize.imatrix.chunks_count") == 2
        for t in c:
            if STACK.match(t.name):
                assert not np.array_equal(t.data, p.tensor(t.name).data), t.name
            if ROUTERS.match(t.name):
                assert t.qtype.name == "F32" and np.array_equal(t.data, p.tensor(t.name).data), t.name
    with cpuq.load(out, n_ctx=64) as m:
        logits = m.logits(m.tokenize("To be, or not to be"))
    assert np.isfinite(logits).all()
