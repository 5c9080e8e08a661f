"""cpuq.convert on the Gated-DeltaNet hybrids (qwen35, qwen35moe, qwen3next) is byte-identical
to llama.cpp, checked without llama.cpp: tests/golden/hybrid_convert.json
(tools/make_hybrid_convert_golden.py) holds the sha256 of llama.cpp's own f16 and q8_0
(convert_hf_to_gguf.py) and q4_k_m (llama-quantize Q4_K_M, the mix) files of small bf16
checkpoints, which make_tiny_checkpoint rebuilds here from the same arguments: the V-head
reorder, the qkvz cut, ssm_a, the +1 norms, the prediction (nextn) blocks, the vision tower
left out, the expert layouts and llama-quantize's rules for these tensors.
tests/convert/test_convert_hybrid_peer.py compares against llama.cpp live, on more cases.

Also: a checkpoint with a missing or mis-shaped DeltaNet or prediction-block tensor is
refused with one line naming the tensor as the checkpoint names it, and the folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import cpuq
from cpuq.arch import ModelConfig
from cpuq.convert.safetensors_io import Checkpoint
from make_hybrid_convert_golden import CONVERT_CASES, QTYPES, build_convert_case
from make_tiny_checkpoint import make_tiny_checkpoint, write_safetensors

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "golden" / "hybrid_convert.json").read_text())


def test_golden_is_of_these_checkpoints():
    """The golden was made from the checkpoints this file rebuilds (else regenerate it)."""
    assert {name: (c["arch"], c["checkpoint"]) for name, c in GOLDEN["cases"].items()} == \
        {name: (arch, kwargs) for name, (arch, kwargs) in CONVERT_CASES.items()}


@pytest.fixture(scope="module")
def checkpoint(module_tmp_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_convert_case(name, module_tmp_factory.mktemp(name))
            assert built[name].name == GOLDEN["cases"][name]["folder"]  # general.name comes from it
        return built[name]
    return get


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", list(CONVERT_CASES))
def test_hybrid_same_bytes_as_llama_cpp(name, qtype, checkpoint, tmp_path):
    want = GOLDEN["cases"][name]["files"][qtype]
    path = cpuq.convert(checkpoint(name), tmp_path / "cpuq.gguf", qtype)
    assert path.stat().st_size == want["bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"], f"{name} {qtype}: not llama.cpp's bytes"


def test_vision_tower_skipped_in_one_line(checkpoint, tmp_path, caplog):
    src = checkpoint("qwen35moe_conditional_mtp")
    with caplog.at_level(logging.WARNING, logger="cpuq.convert.pipeline"):
        cpuq.convert(src, tmp_path / "out.gguf", "f16")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "vision tower" in lines[0] and "model.visual." in lines[0] and "\n" not in lines[0]
    with cpuq.open_gguf(tmp_path / "out.gguf") as f:
        assert not any("visual" in t.name or t.name.startswith("v.") for t in f)


# Bad checkpoints: small ones (hidden 64), edited below.
SMALL = {"qwen35moe": dict(arch="qwen35moe", dtype="bf16", seed=71, conditional=True, mtp=True),
         "qwen3next": dict(arch="qwen3next", dtype="bf16", seed=72, mtp=True),
         "qwen35": dict(arch="qwen35", dtype="bf16", seed=73, linear_num_key_heads=2, linear_num_value_heads=4)}


@pytest.fixture(scope="module")
def small(module_tmp_factory):
    where = module_tmp_factory.mktemp("small")
    return {k: make_tiny_checkpoint(where / k, **kw) for k, kw in SMALL.items()}


def _edited(src: Path, dst: Path, drop: str | None = None, reshape: tuple[str, tuple[int, ...]] | None = None,
            config: dict | None = None) -> Path:
    """A copy of checkpoint `src` without tensor `drop`, with one tensor's shape changed (its
    leading values kept), or with config.json (the text part) updated."""
    shutil.copytree(src, dst)
    with Checkpoint(src) as ck:
        tensors = {n: (ck.dtype(n), ck.raw(n).copy()) for n in ck.names if n != drop}
    if reshape is not None:
        name, shape = reshape
        dtype, arr = tensors[name]
        tensors[name] = (dtype, arr.reshape(-1)[:int(np.prod(shape))].reshape(shape))
    write_safetensors(dst / "model.safetensors", tensors)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (cfg.get("text_config", cfg)).update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


BAD = [
    ("qwen35moe", dict(drop="model.language_model.layers.0.linear_attn.A_log"),
     "model.language_model.layers.0.linear_attn.A_log' is missing"),
    ("qwen35moe", dict(reshape=("model.language_model.layers.1.linear_attn.conv1d.weight", (128, 4))),
     "model.language_model.layers.1.linear_attn.conv1d.weight' has shape [128, 4]"),
    ("qwen35moe", dict(drop="model.language_model.layers.2.linear_attn.in_proj_b.weight"),
     "model.language_model.layers.2.linear_attn.in_proj_b.weight' is missing"),
    ("qwen35moe", dict(drop="mtp.fc.weight"), "'mtp.fc.weight' is missing"),
    ("qwen35moe", dict(drop="mtp.layers.0.self_attn.q_proj.weight"), "'mtp.layers.0.self_attn.q_proj.weight' is missing"),
    ("qwen3next", dict(drop="model.layers.1.linear_attn.in_proj_qkvz.weight"),
     "'model.layers.1.linear_attn.in_proj_qkvz.weight' is missing"),
    ("qwen3next", dict(reshape=("model.layers.2.linear_attn.in_proj_ba.weight", (4, 64))),
     "'model.layers.2.linear_attn.in_proj_ba.weight' has shape [4, 64], config.json implies [8, 64]"),
    ("qwen3next", dict(drop="model.layers.0.linear_attn.dt_bias"), "'model.layers.0.linear_attn.dt_bias' is missing"),
    ("qwen3next", dict(config={"mtp_num_hidden_layers": 2}), "mtp_num_hidden_layers 2, the checkpoint holds 1"),
    ("qwen35", dict(reshape=("model.layers.0.linear_attn.dt_bias", (2,))),
     "'model.layers.0.linear_attn.dt_bias' has shape [2], config.json implies [4]"),
    ("qwen35", dict(drop="model.layers.3.self_attn.q_norm.weight"), "'model.layers.3.self_attn.q_norm.weight' is missing"),
]


@pytest.mark.parametrize("arch,edit,message", BAD, ids=[f"{a}-{m.split(chr(39))[1] if chr(39) in m else m[:20]}"
                                                         for a, _, m in BAD])
def test_bad_hybrid_checkpoint_one_line(arch, edit, message, small, tmp_path):
    src = _edited(small[arch], tmp_path / "bad", **edit)
    with pytest.raises(cpuq.FormatError) as e:
        cpuq.convert(src, tmp_path / "out.gguf", "f16")
    text = str(e.value)
    assert message in text and str(src) in text and "\n" not in text, text
    assert not (tmp_path / "out.gguf").exists()


def test_checkpoint_without_prediction_block(small, tmp_path):
    """config.json says one mtp block, the checkpoint holds none: converted without it (as
    llama.cpp's --no-mtp), block_count the trunk's."""
    src = _edited(small["qwen35moe"], tmp_path / "stripped", config={"mtp_num_hidden_layers": 1})
    with Checkpoint(src) as ck:
        kept = {n: (ck.dtype(n), ck.raw(n).copy()) for n in ck.names if not n.startswith("mtp.")}
    write_safetensors(src / "model.safetensors", kept)
    path = cpuq.convert(src, tmp_path / "out.gguf", "f16")
    with cpuq.open_gguf(path) as f:
        assert f.get("qwen35moe.block_count") == 4 and f.get("qwen35moe.nextn_predict_layers") is None
        assert not any(t.name.startswith("blk.4.") for t in f)
        assert list(f.get("qwen35moe.attention.recurrent_layers")) == [True, True, True, False]


@pytest.mark.parametrize("arch", ["qwen35", "qwen3next"])
def test_channel_scaling_reads_the_rows_the_file_holds(arch, small, tmp_path):
    """Channel scaling searches a block's scales on its matrices as written (the V-head
    reorder, the qkvz cut, +1 norms): pipeline._plan_rows, at any row range, equals the f32
    file's tensor."""
    from cpuq.convert.pipeline import _plan_rows, checkpoint_config, out_type, plan_tensors
    src = small[arch]
    path = cpuq.convert(src, tmp_path / "f32.gguf", "f32")
    with cpuq.open_gguf(path) as f:
        written = {t.name: t.data.copy().view(np.float32) for t in f}  # f32: rows of float32 bytes
    cfg = ModelConfig.from_hf_config(src / "config.json")
    with Checkpoint(src) as ck:
        cfg = checkpoint_config(ck, cfg, src)
        plans = {p.name: p for p in plan_tensors(ck, cfg, out_type("f32"), src)}
        for name in ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_out.weight", "blk.0.attn_norm.weight"):
            want = written[name].reshape(-1, plans[name].shape[-1])
            assert np.array_equal(_plan_rows(ck, plans[name], 0, want.shape[0]).reshape(want.shape), want), name
            assert np.array_equal(_plan_rows(ck, plans[name], 5, 37 if want.shape[0] > 37 else 1)
                                  .reshape(-1, want.shape[1]), want[5:37] if want.shape[0] > 37 else want[5:1]), name
