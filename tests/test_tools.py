"""The scripts in tools/ on bad input: one `error: ...` line on stderr, exit code 2, no
traceback, and no output (not even a half-written one) left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import make_tiny_checkpoint
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
