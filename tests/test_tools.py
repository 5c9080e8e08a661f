"""The scripts in tools/ on bad input: one `error: ...` line on stderr, exit code 2, no
traceback, and no output (not even a half-written one) left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import json

import numpy as np
import pytest

import make_tiny_checkpoint
import make_wide_checkpoint
import toolcli

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / name), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_vocabulary_is_one_error_line_and_writes_nothing(tmp_path):
    r = tool("make_tiny_checkpoint.py", tmp_path / "ckpt", "--vocab", tmp_path / "nope.gguf", cwd=tmp_path)
    assert_one_error_line(r, "nope.gguf", "vocabulary", "not found")
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden partial one


def test_a_vocabulary_that_is_not_a_gguf_file_is_one_error_line(tmp_path):
    (tmp_path / "vocab.gguf").write_bytes(b"not a gguf file at all, just some bytes")
    r = tool("make_tiny_checkpoint.py", tmp_path / "ckpt", "--vocab", tmp_path / "vocab.gguf", cwd=tmp_path)
    assert_one_error_line(r, "vocab.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.gguf"]


def test_existing_output_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = tool("make_tiny_checkpoint.py", out, cwd=tmp_path)
    assert_one_error_line(r, "ckpt", "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("args, fragment", [
    (["--set", "hidden_size=abc"], "hidden_size"),
    (["--set", "num_hidden_layers=0"], "num_hidden_layers"),
    (["--set", "hidden_size"], "KEY=VALUE"),
    (["--arch", "gpt9"], "--arch"),
    (["--seed", "x"], "--seed"),
])
def test_bad_arguments_are_one_error_line(tmp_path, args, fragment):
    r = tool("make_tiny_checkpoint.py", tmp_path / "ckpt", *args, cwd=tmp_path)
    assert_one_error_line(r, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    """The checkpoint is written under a temporary name and renamed only when complete:
    an error after the first files are written leaves neither OUT nor the temporary folder."""
    def fail(out_dir, *_):
        assert (out_dir / "model.safetensors").exists()  # the weights were written: a real half-way point
        raise OSError(28, "No space left on device", str(out_dir / "tokenizer.json"))
    monkeypatch.setattr(make_tiny_checkpoint.hf_tokenizer, "write_tokenizer_files", fail)
    with pytest.raises(OSError, match="No space left"):
        make_tiny_checkpoint.make_tiny_checkpoint(tmp_path / "ckpt", num_hidden_layers=1, vocab_size=512)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_writes_a_whole_checkpoint(tmp_path):
    """The success path through the same script: the folder appears complete, nothing else."""
    r = tool("make_tiny_checkpoint.py", tmp_path / "ckpt", "--set", "num_hidden_layers=1", "--set",
             "vocab_size=512", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _safetensors(path: Path) -> tuple[dict, np.memmap]:
    """(header, the data as bf16 bits) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, np.memmap(path, dtype="<u2", mode="r", offset=8 + n)


def _tensor(header: dict, data: np.memmap, name: str, rows: int | None = None) -> np.ndarray:
    """A bf16 tensor (its first `rows` rows) as float32."""
    start, end = (o // 2 for o in header[name]["data_offsets"])
    shape = header[name]["shape"]
    if rows is not None:
        end = start + rows * int(np.prod(shape[1:]))
        shape = [rows, *shape[1:]]
    return (data[start:end].astype(np.uint32) << 16).view(np.float32).reshape(shape)


def test_the_wide_hybrid_checkpoint_has_the_published_shape_and_draws(tmp_path):
    """make_wide_checkpoint's Qwen3.5-0.8B shape at 4 layers, through the script (the real
    width and 248320-row vocabulary, ~7 s): config.json carries the published text_config
    values, 3 DeltaNet layers then 1 attention layer, every tensor hybrid_tensor_shapes names
    with its shape (one shard per layer), and the draws hybrid_weights makes."""
    r = tool("make_wide_checkpoint.py", tmp_path / "ckpt", "--shape", "qwen3.5-0.8b", "--layers", "4", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    ckpt = tmp_path / "ckpt"
    config = json.loads((ckpt / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "linear_num_key_heads",
                                   "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                                   "linear_conv_kernel_dim", "vocab_size", "tie_word_embeddings")} == {
        "model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "vocab_size": 248320, "tie_word_embeddings": True}
    assert config["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    expected = make_tiny_checkpoint.hybrid_tensor_shapes(config, fused_experts=False)
    assert sorted(index) == sorted(expected)
    tensors = {}
    for shard in sorted(set(index.values())):
        header, data = _safetensors(ckpt / shard)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {n: tuple(h["shape"]) for n, h in header.items()} == {n: expected[n] for n in header}
        assert data.size == sum(int(np.prod(s)) for s in map(expected.get, header))
        tensors.update({n: (header, data) for n in header})

    def get(name, rows=None):
        return _tensor(*tensors[name], name, rows)
    la = "model.layers.0.linear_attn."
    a_log, dt_bias = get(la + "A_log"), get(la + "dt_bias")
    # bf16 rounds by at most 2**-8 relative: the bounds widen by 1 %
    assert np.all((a_log >= 0) & (a_log <= np.log(16) * 1.01))
    dt = np.logaddexp(0, dt_bias)  # softplus
    assert np.all((dt > 1e-3 * 0.99) & (dt < 1e-1 * 1.01))
    # 1024 values of each: the sample std is within 10 % of the drawn 0.1 (5 sigma is 11 %)
    assert abs(np.std(get("model.layers.3.input_layernorm.weight")) - 0.1) < 0.01
    assert abs(np.mean(get("model.layers.3.input_layernorm.weight"))) < 0.02  # zero-centred, HF adds 1
    assert abs(np.mean(get(la + "norm.weight")) - 1) < 0.05  # RMSNormGated scales by w itself
    # 1M+ values: the std within 1 % of N(0, 1/fan_in) (fan-in 1024) and of the embeddings' 0.02
    assert abs(np.std(get(la + "in_proj_qkv.weight", rows=1024)) * 32 - 1) < 0.01
    assert abs(np.std(get("model.layers.3.self_attn.q_proj.weight", rows=1024)) * 32 - 1) < 0.01
    assert abs(np.std(get("model.embed_tokens.weight", rows=1024)) / 0.02 - 1) < 0.01
    assert get(la + "conv1d.weight").shape == (2 * 16 * 128 + 16 * 128, 1, 4)


def test_the_wide_moe_hybrid_keeps_three_deltanet_layers_to_one_attention_layer():
    """Qwen3.5-35B-A3B cut to 8 layers: 6 DeltaNet + 2 attention, the experts stacked as its
    checkpoint stores them, untied, no intermediate_size (every layer MoE)."""
    config, shapes = make_wide_checkpoint.wide_config("qwen3.5-35b-a3b", 8)
    assert config["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert "intermediate_size" not in config and config["tie_word_embeddings"] is False
    assert shapes["model.layers.7.mlp.experts.gate_up_proj"] == (256, 2 * 512, 2048)
    assert shapes["model.layers.7.mlp.experts.down_proj"] == (256, 2048, 512)
    assert shapes["model.layers.0.linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 32 * 128, 2048)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (2 * 16 * 256, 2048)
    assert shapes["lm_head.weight"] == (248320, 2048)
    assert not any(".experts.0." in n for n in shapes)


@pytest.mark.parametrize("name, args, fragment", [
    ("make_real_checkpoint.py", ["out", "--gguf", "missing.gguf"], "missing.gguf"),
    ("make_wide_checkpoint.py", ["out", "--shape", "qwen2.5-0.5b", "--layers", "0"], "layers"),
    ("calibration_text.py", ["out.txt", "--chars", "0"], "--chars"),
    ("decode_ab.py", ["missing.gguf"], "missing.gguf"),
    ("fuzz.py", ["--target", "gguf", "--replay", "missing.bin"], "missing.bin"),
    ("fuzz.py", ["--target", "nope"], "--target"),
    ("make_golden.py", ["extra"], "extra"),
    ("make_perplexity_golden.py", ["extra"], "extra"),
    ("make_moe_golden.py", ["extra"], "extra"),
])
def test_other_tools_fail_with_one_error_line(tmp_path, name, args, fragment):
    r = tool(name, *args, cwd=tmp_path)
    assert_one_error_line(r, fragment)
    assert list(tmp_path.iterdir()) == []


def test_output_file_keeps_the_old_content_when_writing_fails(tmp_path):
    dst = tmp_path / "golden.json"
    dst.write_text("old")
    with pytest.raises(RuntimeError):
        with toolcli.output_file(dst) as part:
            part.write_text("half")
            raise RuntimeError("interrupted")
    assert dst.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["golden.json"]
    with toolcli.output_file(dst) as part:
        part.write_text("new")
    assert dst.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["golden.json"]
