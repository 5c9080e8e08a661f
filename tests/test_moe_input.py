"""MoE inputs: bad expert metadata, checkpoints and files get one-line errors naming what
and where; the converter streams an expert stack one expert's rows at a time."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFValueType as V
from typer.testing import CliRunner

import cpuq
from cpuq import FormatError, UnsupportedError
from cpuq.cli import app
from cpuq.convert import safetensors_io
from make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def moe_ckpt(module_tmp_factory):
    return make_tiny_checkpoint(module_tmp_factory.mktemp("moe") / "qwen3moe", arch="qwen3moe", dtype="bf16")


@pytest.fixture(scope="module")
def moe_file(moe_ckpt, module_tmp_factory):
    return cpuq.convert(moe_ckpt, module_tmp_factory.mktemp("moe-gguf") / "m.gguf", "q8_0")


def _edited_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, error, match", [
    ({"num_experts_per_tok": 9}, FormatError, "num_experts_per_tok 9 is more than the 8 experts"),
    ({"num_experts": 7}, FormatError, "'model.layers.0.mlp.gate.weight' has shape \\[8, 64\\], config.json implies "
                                      "\\[7, 64\\]"),
    ({"num_experts": 9, "num_hidden_layers": 1}, FormatError, "gate.weight' has shape \\[8, 64\\], config.json "
                                                              "implies \\[9, 64\\]"),
    ({"moe_intermediate_size": 16}, FormatError, "experts.0.gate_proj.weight' has shape \\[32, 64\\], config.json "
                                                 "implies \\[16, 64\\]"),
    ({"mlp_only_layers": [1]}, UnsupportedError, "dense blocks among the expert blocks"),
    ({"num_experts_per_tok": 0}, FormatError, "'num_experts_per_tok' is 0, expected an integer from 1"),
])
def test_bad_expert_config_is_refused_before_writing(moe_ckpt, tmp_path, changes, error, match):
    src = _edited_config(moe_ckpt, tmp_path / "src", **changes)
    with pytest.raises(error, match=match):
        cpuq.convert(src, tmp_path / "out.gguf", "q8_0")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


def test_a_missing_expert_matrix_is_named(moe_ckpt, tmp_path):
    src = shutil.copytree(moe_ckpt, tmp_path / "src")
    header_len = int.from_bytes((src / "model.safetensors").read_bytes()[:8], "little")
    raw = (src / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + header_len])
    header["model.layers.1.mlp.experts.5.up_proj.weightX"] = header.pop("model.layers.1.mlp.experts.5.up_proj.weight")
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (src / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + header_len:])
    with pytest.raises(FormatError, match="'model.layers.1.mlp.experts.5.up_proj.weight' is missing"):
        cpuq.convert(src, tmp_path / "out.gguf", "q8_0")


# Element types of the arrays a converted MoE or hybrid holds (the reader gives values, not them).
ARRAY_TYPES = {"tokenizer.ggml.token_type": V.INT32, "attention.recurrent_layers": V.BOOL,
               "rope.dimension_sections": V.INT32}


def rewrite_gguf(src, dst, values=None, drop=(), shapes=None, arch_keys=False):
    """src's GGUF with metadata `values` set (key -> value, or (value, type[, element
    type]); UINT32 by default; with arch_keys, keys without the "<arch>." prefix), tensors
    `drop` left out, and tensors of `shapes` (name -> numpy shape) cut to that many leading
    values."""
    shapes = shapes or {}
    with cpuq.open_gguf(src) as f:
        arch = f.get("general.architecture")
        meta = {k: f.get(k) for k in f.keys() if k != "general.architecture"}
        types = {k: f.value_type(k) for k in meta}
        for k in meta:
            if f.array_length(k):
                types[k + "[]"] = next((t for suffix, t in ARRAY_TYPES.items() if k.endswith(suffix)), V.STRING)
        for k, v in (values or {}).items():
            key = f"{arch}.{k}" if arch_keys else k
            v, *vtypes = v if isinstance(v, tuple) else (v, V.UINT32)
            meta[key], types[key] = v, vtypes[0]
            if len(vtypes) > 1:
                types[key + "[]"] = vtypes[1]
        w = cpuq.GGUFStreamWriter(dst, arch=arch)
        w.add_metadata(meta, types)
        tensors = [(t.name, t.qtype, shapes.get(t.name, t.shape), t.data) for t in f if t.name not in drop]
        for name, qtype, shape, _ in tensors:
            w.add_tensor_info(name, shape, qtype)
        w.begin()
        for name, qtype, shape, data in tensors:
            w.write_tensor(name, data.reshape(-1)[:qtype.row_bytes(shape[-1]) * int(np.prod(shape[:-1]))]
                           if name in shapes else data)
        w.close()
    return dst


@pytest.mark.parametrize("edit, match", [
    ({"values": {"qwen3moe.expert_used_count": 9}}, "'qwen3moe.expert_used_count' is 9, more than the 8 experts"),
    ({"values": {"qwen3moe.expert_count": 4}}, "'blk.0.ffn_gate_inp.weight' has shape \\[8, 64\\], the metadata "
                                               "implies \\[4, 64\\]"),
    ({"values": {"qwen3moe.expert_used_count": 0}}, "'qwen3moe.expert_used_count' is 0, expected a positive"),
    ({"drop": ("blk.1.ffn_down_exps.weight",)}, "tensor 'blk.1.ffn_down_exps.weight' is missing"),
    ({"shapes": {"blk.0.ffn_up_exps.weight": (7, 32, 64)}}, "'blk.0.ffn_up_exps.weight' has shape \\[7, 32, 64\\], "
                                                            "the metadata implies \\[8, 32, 64\\]"),
])
def test_bad_expert_file_is_one_line_exit_2(moe_file, tmp_path, edit, match):
    bad = rewrite_gguf(moe_file, tmp_path / "bad.gguf", **edit)
    with pytest.raises(FormatError, match=match):
        cpuq.load(bad)
    r = CliRunner().invoke(app, ["generate", str(bad), "-p", "hi", "-n", "1"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_stack_is_streamed_one_expert_at_a_time(moe_ckpt, tmp_path, monkeypatch):
    """The converter's memory promise for MoE: no read of an expert stack spans more than one
    expert's rows (peak RSS at Qwen3-30B-A3B width is in docs/performance.md)."""
    reads = []
    real = safetensors_io.Checkpoint.read_rows_f32

    def spy(self, name, start, stop):
        reads.append((name, stop - start))
        return real(self, name, start, stop)
    monkeypatch.setattr(safetensors_io.Checkpoint, "read_rows_f32", spy)
    src = make_tiny_checkpoint(tmp_path / "fused", arch="qwen3moe", dtype="bf16", fused_experts=True)
    cpuq.convert(src, tmp_path / "f.gguf", "q4_k_m")
    cpuq.convert(moe_ckpt, tmp_path / "p.gguf", "q4_k_m")
    fused = [n for name, n in reads if name.endswith(("gate_up_proj", "experts.down_proj"))]
    per_expert = [n for name, n in reads if ".experts." in name and name.endswith("_proj.weight")]
    assert fused and per_expert
    assert max(fused) <= 64 and max(per_expert) <= 64  # one expert: 32 rows of gate or up, 64 of down


def test_info_names_the_experts(moe_file):
    s = cpuq.summarize(moe_file)
    assert s["experts"]["count"] == 8 and s["experts"]["used"] == 2
    stacked = 2 * 3 * 8 * 32 * 64  # 2 layers of three (8, 32, 64) stacks
    assert s["experts"]["active_parameters"] == s["parameters"] - stacked + stacked * 2 // 8
    r = CliRunner().invoke(app, ["info", str(moe_file)])
    assert r.exit_code == 0 and "8 per block, 2 used per token" in r.output


def test_fused_experts_are_not_counted_as_tensors(tmp_path):
    """A fused checkpoint holds two tensors per layer whatever its expert count (Qwen3-30B-A3B:
    128 experts in a ~700-tensor checkpoint), so the guard against a lying expert count
    counts only the layers stored one matrix per expert."""
    src = make_tiny_checkpoint(tmp_path / "fused", arch="qwen3moe", dtype="bf16", fused_experts=True,
                               num_experts=64, num_experts_per_tok=4)
    out = cpuq.convert(src, tmp_path / "f.gguf", "q8_0")
    with cpuq.open_gguf(out) as f:
        assert f.tensors["blk.1.ffn_up_exps.weight"].shape == (64, 32, 64)
