"""The `cpuq` command line (typer). Every command is a thin shell over the Python API;
a CpuqError becomes one line on stderr and exit code 2, Ctrl-C exit code 130.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import CpuqError

app = typer.Typer(
    name="cpuq",
    help="CPU-first GGUF quantizer and LLM runtime.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


@app.callback()
def _main() -> None:
    """CPU-first GGUF quantizer and LLM runtime."""


def _clean_errors(fn: Callable) -> Callable:
    """Turn cpuq's own errors into `error: <message>` and exit 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CpuqError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
    return wrapper


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@app.command()
@_clean_errors
def info(
    path: Optional[Path] = typer.Argument(None, help="GGUF file to describe (default: the demo model)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor (name, type, shape, bytes)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Describe a GGUF file: architecture, size, tensor types, tokenizer, metadata."""
    from .demo import demo_model_path
    from .info import summarize

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


@app.command()
@_clean_errors
def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF file to write."),
    qtype: str = typer.Option("q4_k_m", "--type", "-t",
                              help="f32, f16, bf16, q8_0, q4_k_m (llama.cpp's mix), q4_k, q5_k, q6_k, q5_0, q4_0."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Convert a Hugging Face Qwen2/Qwen3/Llama checkpoint to a GGUF file llama.cpp runs."""
    import time
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn, TransferSpeedColumn
    from .convert.pipeline import convert as run_convert
    from .info import summarize

    start = time.perf_counter()
    # Bytes of the checkpoint read so far: the measure that makes the ETA honest when one
    # tensor (a 150k-row embedding) is a tenth of the model.
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[name]}"))
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("converting", total=None, name="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name)

        path = run_convert(src, output, qtype=qtype, force=force, progress=progress)
    seconds = time.perf_counter() - start
    s = summarize(path)
    src_bytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    ratio = f"{src_bytes / s['file_size']:.2f}x" if s["file_size"] else "-"
    out.print(f"wrote {path}\n"
              f"  {_human_count(s['parameters'])} parameters, {', '.join(f'{k}: {v}' for k, v in s['tensor_types'].items())}\n"
              f"  {_human_bytes(src_bytes)} safetensors -> {_human_bytes(s['file_size'])} GGUF ({ratio} smaller), "
              f"{s['bits_per_weight']:.2f} bits per weight, {seconds:.1f} s", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
