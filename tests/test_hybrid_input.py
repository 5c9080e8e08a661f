"""Hybrid (qwen35, qwen3next) inputs: a GGUF file whose Gated-DeltaNet tensors or linear-
attention metadata are missing, mis-shaped or inconsistent, and a config.json whose linear-
attention keys are, get one-line FormatErrors naming the file and the key or tensor; `cpuq
generate` on such a file exits 2 with that line and no traceback, and the converter writes
nothing. The files are cpuq's conversions of make_tiny_checkpoint's hybrids, edited."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFValueType as V
from typer.testing import CliRunner

import cpuq
from cpuq import FormatError
from cpuq.cli import app
from make_tiny_checkpoint import make_tiny_checkpoint
from tests.test_moe_input import rewrite_gguf

# The tiny qwen35 (make_tiny_checkpoint's defaults, shaped like Qwen3.5-0.8B): 4 blocks, the
# last full attention; 4 key and 4 value heads of 16 (inner size 64), conv kernel 4, head_dim
# 64 with 16 rotary dimensions, sections [3, 3, 2, 0]. qwen3next: 2 key heads for 4 value
# heads, the fused ssm_ba.


@pytest.fixture(scope="module")
def ckpts(module_tmp_factory):
    where = module_tmp_factory.mktemp("hybrid-input")
    out = {arch: make_tiny_checkpoint(where / arch, arch=arch, dtype="bf16") for arch in ("qwen35", "qwen3next")}
    out["qwen35_mtp"] = make_tiny_checkpoint(where / "qwen35_mtp", arch="qwen35", dtype="bf16", mtp=True)
    return out


@pytest.fixture(scope="module")
def files(ckpts, module_tmp_factory):
    where = module_tmp_factory.mktemp("hybrid-input-gguf")
    return {arch: cpuq.convert(ckpts[arch], where / f"{arch}.gguf", "q8_0") for arch in ("qwen35", "qwen3next")}


BOOLS, INTS = (V.ARRAY, V.BOOL), (V.ARRAY, V.INT32)

# (arch, edit, what the message must say after the file's name)
BAD_FILES = [
    # tensors
    ("qwen35", {"drop": ("blk.0.ssm_a",)}, "tensor 'blk.0.ssm_a' is missing"),
    ("qwen35", {"drop": ("blk.0.ssm_conv1d.weight",)}, "tensor 'blk.0.ssm_conv1d.weight' is missing"),
    ("qwen35", {"drop": ("blk.2.ssm_beta.weight",)}, "tensor 'blk.2.ssm_beta.weight' is missing"),
    ("qwen35", {"drop": ("blk.1.ssm_norm.weight",)}, "tensor 'blk.1.ssm_norm.weight' is missing"),
    ("qwen3next", {"drop": ("blk.0.ssm_ba.weight",)}, "tensor 'blk.0.ssm_ba.weight' is missing"),
    ("qwen35", {"drop": ("blk.3.attn_q.weight",)}, "tensor 'blk.3.attn_q.weight' is missing"),
    ("qwen35", {"shapes": {"blk.0.ssm_a": (3,)}},
     "tensor 'blk.0.ssm_a' has shape \\[3\\], the metadata implies \\[4\\]"),
    ("qwen35", {"shapes": {"blk.0.ssm_conv1d.weight": (191, 4)}},
     "'blk.0.ssm_conv1d.weight' has shape \\[191, 4\\], the metadata implies \\[192, 4\\]"),
    ("qwen35", {"shapes": {"blk.1.attn_qkv.weight": (128, 64)}},
     "'blk.1.attn_qkv.weight' has shape \\[128, 64\\], the metadata implies \\[192, 64\\]"),
    ("qwen3next", {"shapes": {"blk.2.ssm_ba.weight": (4, 64)}},
     "'blk.2.ssm_ba.weight' has shape \\[4, 64\\], the metadata implies \\[8, 64\\]"),
    # head counts that do not divide
    ("qwen35", {"values": {"ssm.time_step_rank": 6}}, "'qwen35.ssm.time_step_rank' 6 is not a multiple of "
                                                      "'qwen35.ssm.group_count' 4"),
    ("qwen35", {"values": {"ssm.inner_size": 66}}, "'qwen35.ssm.inner_size' 66 is not a multiple of "
                                                   "'qwen35.ssm.time_step_rank' 4"),
    ("qwen35", {"values": {"ssm.group_count": 0}}, "'qwen35.ssm.group_count' is 0, expected a positive integer"),
    # consistent among themselves, not with the tensors
    ("qwen35", {"values": {"ssm.time_step_rank": 8}}, "'blk.0.ssm_beta.weight' has shape \\[4, 64\\], the metadata "
                                                  "implies \\[8, 64\\]"),
    ("qwen35", {"values": {"ssm.state_size": 32}}, "'blk.0.attn_qkv.weight' has shape \\[192, 64\\], the metadata "
                                                   "implies \\[320, 64\\]"),
    ("qwen35", {"values": {"ssm.conv_kernel": 3}}, "'blk.0.ssm_conv1d.weight' has shape \\[192, 4\\], the metadata "
                                                   "implies \\[192, 3\\]"),
    # the layer pattern
    ("qwen35", {"values": {"attention.recurrent_layers": ([True, True, True], *BOOLS)}},
     "'qwen35.attention.recurrent_layers' is \\[True, True, True\\], expected 4 booleans"),
    ("qwen35", {"values": {"attention.recurrent_layers": ([1, 2, 1, 0], *INTS)}},
     "'qwen35.attention.recurrent_layers' is \\[1, 2, 1, 0\\], expected 4 booleans"),
    ("qwen35", {"values": {"attention.recurrent_layers": (["a", "b", "c", "d"], V.ARRAY, V.STRING)}},
     "'qwen35.attention.recurrent_layers' is .*, expected 4 booleans"),
    ("qwen35", {"values": {"attention.recurrent_layers": (1, V.UINT32)}},
     "'qwen35.attention.recurrent_layers' is 1, expected 4 booleans"),
    # a block the pattern calls DeltaNet that holds attention's tensors
    ("qwen35", {"values": {"attention.recurrent_layers": ([True, True, True, True], *BOOLS)}},
     "tensor 'blk.3.attn_qkv.weight' is missing"),
    # partial rotary
    ("qwen35", {"values": {"rope.dimension_count": 15}}, "'qwen35.rope.dimension_count' is 15, expected an even "
                                                         "number up to the head size 64"),
    ("qwen35", {"values": {"rope.dimension_count": 66}}, "'qwen35.rope.dimension_count' is 66, expected an even "
                                                         "number up to the head size 64"),
    # prediction blocks
    ("qwen35", {"values": {"nextn_predict_layers": 4}}, "'qwen35.nextn_predict_layers' is 4, expected a count below "
                                                        "block_count 4"),
    ("qwen35", {"values": {"nextn_predict_layers": 7}}, "'qwen35.nextn_predict_layers' is 7, expected a count below "
                                                        "block_count 4"),
    # rope sections
    ("qwen35", {"values": {"rope.dimension_sections": ([0, 0, 0, 0], *INTS)}},
     "'qwen35.rope.dimension_sections' is \\[0, 0, 0, 0\\], expected 1 to 4 counts of rotary pairs"),
    ("qwen35", {"values": {"rope.dimension_sections": ([3, 3, 2, 0, 1], *INTS)}},
     "'qwen35.rope.dimension_sections' is \\[3, 3, 2, 0, 1\\], expected 1 to 4 counts"),
    ("qwen35", {"values": {"rope.dimension_sections": ([-3, 3, 2, 0], *INTS)}},
     "'qwen35.rope.dimension_sections' is \\[-3, 3, 2, 0\\], expected 1 to 4 counts"),
    ("qwen35", {"values": {"rope.dimension_sections": (["3", "3"], V.ARRAY, V.STRING)}},
     "'qwen35.rope.dimension_sections' is .*, expected 1 to 4 counts"),
    ("qwen35", {"values": {"rope.dimension_sections": (8, V.UINT32)}},
     "'qwen35.rope.dimension_sections' is 8, expected 1 to 4 counts"),
]


@pytest.mark.parametrize("arch, edit, match", BAD_FILES)
def test_bad_hybrid_file_is_one_line_exit_2(files, tmp_path, arch, edit, match):
    bad = rewrite_gguf(files[arch], tmp_path / "bad.gguf", arch_keys=True, **edit)
    with pytest.raises(FormatError, match=match) as e:
        cpuq.load(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["generate", str(bad), "-p", "hi", "-n", "1"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert str(bad) in r.output


def test_the_unedited_files_load(files, tmp_path):
    """The edits above are what fails: the helper's copy of each file loads and runs."""
    for arch, path in files.items():
        copy = rewrite_gguf(path, tmp_path / f"{arch}.gguf")
        with cpuq.load(copy, n_ctx=32) as m:
            assert np.isfinite(m.logits([1, 2, 3])).all()


def _edited_config(src, dst, rope=None, **changes):
    """src with config.json's keys `changes` set (None: removed), and rope_parameters' `rope`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    for k, v in (rope or {}).items():
        cfg["rope_parameters"][k] = v
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


LINEAR = "linear_attention"
FULL = "full_attention"

# (arch, config.json edits, what the message must say after config.json's path)
BAD_CONFIGS = [
    ("qwen35", {"linear_num_key_heads": 3}, "linear_num_value_heads 4 is not a multiple of linear_num_key_heads 3"),
    ("qwen3next", {"linear_num_value_heads": 3},
     "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    ("qwen35", {"linear_num_value_heads": 0}, "key 'linear_num_value_heads' is 0, expected an integer from 1"),
    ("qwen35", {"linear_key_head_dim": "16"}, "key 'linear_key_head_dim' is '16', expected an integer"),
    ("qwen35", {"layer_types": [LINEAR, LINEAR, FULL]}, "key 'layer_types' is .*, expected 4 entries of "
                                                        "linear_attention or full_attention"),
    ("qwen35", {"layer_types": [LINEAR, LINEAR, LINEAR, "sliding_attention"]}, "key 'layer_types' is .*, expected 4 "
                                                                               "entries"),
    ("qwen35", {"layer_types": "linear_attention"}, "key 'layer_types' is .*, expected 4 entries"),
    ("qwen35", {"layer_types": None, "full_attention_interval": 0}, "key 'full_attention_interval' is 0"),
    ("qwen35", {"rope": {"partial_rotary_factor": 0}}, "key 'partial_rotary_factor' is 0, expected a number in "
                                                       "\\(0, 1\\]"),
    ("qwen35", {"rope": {"partial_rotary_factor": 1.5}}, "key 'partial_rotary_factor' is 1.5, expected a number"),
    ("qwen35", {"rope": {"partial_rotary_factor": -0.25}}, "key 'partial_rotary_factor' is -0.25, expected"),
    ("qwen35", {"rope": {"partial_rotary_factor": "0.25"}}, "key 'partial_rotary_factor' is '0.25', expected"),
    ("qwen35", {"rope": {"partial_rotary_factor": True}}, "key 'partial_rotary_factor' is True, expected"),
    ("qwen3next", {"partial_rotary_factor": 0.3}, "head_dim 64 x partial_rotary_factor 0.3 gives 19 rotary "
                                                  "dimensions, expected an even number"),
    ("qwen3next", {"partial_rotary_factor": 0.01}, "head_dim 64 x partial_rotary_factor 0.01 gives 0 rotary"),
    ("qwen35", {"rope": {"mrope_section": [0, 0, 0]}}, "rope 'mrope_section' is \\[0, 0, 0\\], expected 1 to 4 "
                                                       "counts of rotary pairs"),
    ("qwen35", {"rope": {"mrope_section": [3, 3, 2, 0, 0]}}, "rope 'mrope_section' is .*, expected 1 to 4 counts"),
    ("qwen35", {"rope": {"mrope_section": [3, -3, 2]}}, "rope 'mrope_section' is .*, expected 1 to 4 counts"),
    ("qwen35", {"rope": {"mrope_section": [3, 2.5, 2]}}, "rope 'mrope_section' is .*, expected 1 to 4 counts"),
    ("qwen35", {"rope": {"mrope_section": "3,3,2"}}, "rope 'mrope_section' is .*, expected 1 to 4 counts"),
    ("qwen35", {"rope": {"mrope_section": []}}, "rope 'mrope_section' is \\[\\], expected 1 to 4 counts"),
    ("qwen35", {"rope": {"mrope_section": [True, 3, 2]}}, "rope 'mrope_section' is .*, expected 1 to 4 counts"),
    ("qwen35", {"mtp_num_hidden_layers": -1}, "key 'mtp_num_hidden_layers' is -1, expected a count"),
    ("qwen35", {"mtp_num_hidden_layers": "1"}, "key 'mtp_num_hidden_layers' is '1', expected a count"),
    ("qwen35", {"mtp_num_hidden_layers": 1.5}, "key 'mtp_num_hidden_layers' is 1.5, expected a count"),
    ("qwen35", {"mtp_num_hidden_layers": True}, "key 'mtp_num_hidden_layers' is True, expected a count"),
    # a count the checkpoint's mtp.* tensors do not bear out (a checkpoint without any converts
    # without them, as llama.cpp's --no-mtp)
    ("qwen35_mtp", {"mtp_num_hidden_layers": 2}, "config.json says mtp_num_hidden_layers 2, the checkpoint holds 1"),
]


@pytest.mark.parametrize("arch, changes, match", BAD_CONFIGS)
def test_bad_hybrid_config_is_refused_before_writing(ckpts, tmp_path, arch, changes, match):
    src = _edited_config(ckpts[arch], tmp_path / "src", **changes)
    with pytest.raises(FormatError, match=match) as e:
        cpuq.convert(src, tmp_path / "out.gguf", "q8_0")
    assert str(e.value).startswith(str(src)) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


def test_bad_hybrid_config_cli_exits_2(ckpts, tmp_path):
    src = _edited_config(ckpts["qwen35"], tmp_path / "src", linear_num_key_heads=3)
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "out.gguf"), "--type", "q8_0"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "not a multiple of linear_num_key_heads 3" in r.output
    assert not list(tmp_path.glob("*.gguf*"))
