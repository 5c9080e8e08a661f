"""What each quantization type costs and buys on one checkpoint: converts it to every type
asked for and measures the three numbers a quantizer is judged on, side by side.

Per type: file size, compression ratio against the checkpoint's safetensors, bits per
weight, prefill and decode tokens/s (eval.bench), perplexity over a text, and against the
F16 conversion (the base, always measured): perplexity change in percent, mean and 99th
percentile KL divergence, top-1 agreement (eval.perplexity). With calibration text, every
type that uses an importance matrix appears twice more: "<type>+imatrix", quantized with
one collected over that text by the F16 model (as llama.cpp recommends; llama-quantize
--imatrix's bytes), and "<type>+awq", with channel scaling by it as well (convert.scaling).

Conversions are cached in `out_dir/models`, each with a JSON key (the checkpoint files'
sizes and modification times, the type, cpuq's version and a digest of its quantizer and
converter sources, the importance matrix's digest):
a second run with the same inputs converts nothing. Reports: compare.md, compare.csv and
compare.png (size against accuracy loss; needs matplotlib, the `bench` extra).

Imports numpy, the standard library and cpuq (convert, runtime, eval); matplotlib lazily.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import __version__
from ..convert.calibration import collect_imatrix
from ..convert.pipeline import OUT_TYPES, convert, out_type
from ..errors import InputError
from ..info import summarize
from ..runtime.model import load
from .bench import bench
from .perplexity import perplexity

BASE = "f16"
IMATRIX_SUFFIX = "+imatrix"  # llama-quantize --imatrix's file
AWQ_SUFFIX = "+awq"  # the importance matrix and channel scaling (convert.scaling)

# (stage, done, total): stage names what runs ("convert q4_k_m", "perplexity q4_k_m", ...)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompareRow:
    """One type's numbers. delta/KL/top-1 are against the F16 base (0, 0, 1 for the base)."""
    type: str
    path: str
    file_bytes: int
    ratio: float              # checkpoint safetensors bytes / file bytes
    bits_per_weight: float
    pp_tok_s: float
    tg_tok_s: float
    ppl: float
    delta_ppl_percent: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


def parse_types(types: str | list[str]) -> list[str]:
    """"f16,q8_0,q4_k_m" -> the list, checked against convert's types (InputError)."""
    names = [t.strip().lower() for t in (types.split(",") if isinstance(types, str) else types) if t.strip()]
    if not names:
        raise InputError("--types names no type (e.g. f16,q8_0,q4_k_m,q4_k)")
    for t in names:
        if t not in OUT_TYPES:
            raise InputError(f"--types: '{t}' is not a type cpuq converts to (one of: {', '.join(OUT_TYPES)})")
    return list(dict.fromkeys(names))


@functools.lru_cache(maxsize=None)  # the sources do not change under a running process
def _code_key(dirs: tuple[str, ...] = ("quants", "convert")) -> str:
    """A digest of the code that decides a cached file's bytes (for a conversion the
    quantizers and converter; for an importance matrix the runtime too): nothing cached is
    reused after it changes, even at the same version."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for d in dirs for p in (root / d).glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _source_key(src: Path) -> list:
    files = sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _cached(dst: Path, key: dict, make: Callable[[], None]) -> Path:
    """dst, made by make() unless the key file beside it (dst with .json) says it was made
    from the same `key`."""
    key_file = dst.with_suffix(".json")
    try:
        if dst.is_file() and json.loads(key_file.read_text()) == key:
            return dst
    except (OSError, ValueError):
        pass
    key_file.unlink(missing_ok=True)  # a crash between the two writes leaves no stale key
    make()
    key_file.write_text(json.dumps(key))
    return dst


def _cached_convert(src: Path, models: Path, label: str, qtype: str, imatrix: Optional[Path],
                    progress: Optional[Progress], awq: bool = False) -> Path:
    """src converted to `qtype` (with the importance matrix file, if given) at
    models/<label>.gguf, reused when its key says it was made from the same inputs."""
    dst = models / f"{label}.gguf"
    key = {"cpuq": __version__, "code": _code_key(), "type": qtype, "source": _source_key(src), "awq": awq,
           "imatrix": hashlib.sha256(imatrix.read_bytes()).hexdigest() if imatrix else None}
    stage = f"convert {label}"
    return _cached(dst, key, lambda: convert(
        src, dst, qtype, force=True, imatrix=imatrix, awq=awq,
        progress=None if progress is None else (lambda d, t, _name: progress(stage, d, t))))


def compare(src_dir: str | os.PathLike, types: str | list[str], text: str, out_dir: str | os.PathLike,
            calibration: Optional[str] = None, n_ctx: int = 512, n_chunks: Optional[int] = None,
            n_prompt: int = 256, n_gen: int = 32, repeat: int = 2, n_threads: Optional[int] = None,
            progress: Optional[Progress] = None) -> list[CompareRow]:
    """Convert the checkpoint in `src_dir` to each of `types` (plus F16, the base) and
    measure each: see the module docstring. `text` is scored (perplexity windows of n_ctx
    tokens, at most n_chunks); `calibration`, a different text, adds "+imatrix" and "+awq" rows.
    Speed: eval.bench with n_prompt / n_gen tokens, `repeat` repetitions."""
    src, out = Path(src_dir), Path(out_dir)
    names = parse_types(types)
    if not (src / "config.json").is_file():
        raise InputError(f"{src}: not an HF checkpoint folder (no config.json)")
    models = out / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the output folder: {e.strerror}") from None
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))

    labels = [(BASE, BASE, None, False)] + [(t, t, None, False) for t in names if t != BASE]
    base_path = _cached_convert(src, models, BASE, BASE, None, progress)
    if calibration is not None and any(out_type(t).via_llama_quantize for t in names):
        im_path = out / "imatrix.gguf"
        key = {"cpuq": __version__, "code": _code_key(("quants", "convert", "kernels", "runtime")),
               "base": _source_key(src), "text": hashlib.sha256(calibration.encode()).hexdigest(), "n_ctx": n_ctx}
        cb = None if progress is None else (lambda d, t: progress("calibrate", d, t))
        _cached(im_path, key, lambda: collect_imatrix(
            base_path, calibration, n_ctx=n_ctx, dataset="calibration text", n_threads=n_threads,
            progress=cb).write(im_path, force=True))
        for t in names:
            if out_type(t).via_llama_quantize:
                labels += [(t + IMATRIX_SUFFIX, t, im_path, False), (t + AWQ_SUFFIX, t, im_path, True)]
        labels.sort(key=lambda x: ([BASE] + names).index(x[1]))  # each type's calibrated rows after it

    rows = []
    with load(base_path, n_ctx=n_ctx, n_threads=n_threads) as base:
        for label, qtype, im, awq in labels:
            path = base_path if label == BASE else _cached_convert(src, models, label, qtype, im, progress, awq)
            stage = f"speed {label}"
            speed = bench(path, n_prompt=n_prompt, n_gen=n_gen, repeat=repeat, n_threads=n_threads,
                          progress=None if progress is None else (lambda _t, r, n: progress(stage, r, n)))
            stage_p = f"perplexity {label}"
            p = perplexity(path, text, n_ctx=n_ctx, n_chunks=n_chunks, kl_base=base, n_threads=n_threads,
                           progress=None if progress is None else (lambda d, t: progress(stage_p, d, t)))
            s = summarize(path)
            rows.append(CompareRow(label, str(path), s["file_size"], src_bytes / s["file_size"], s["bits_per_weight"],
                                   speed[0].mean_tokens_per_second, speed[1].mean_tokens_per_second, p.ppl,
                                   p.delta_ppl_percent, p.kl_mean, p.kl_p99, p.top1_agreement))
    return rows


HEADERS = ["type", "file MiB", "ratio", "bits/weight", "pp tok/s", "tg tok/s", "perplexity", "Δppl %",
           "KL mean", "KL p99", "top-1 %"]


def table_rows(rows: list[CompareRow]) -> list[list[str]]:
    return [[r.type, f"{r.file_bytes / 2**20:.1f}", f"{r.ratio:.2f}x", f"{r.bits_per_weight:.2f}", f"{r.pp_tok_s:.0f}",
             f"{r.tg_tok_s:.1f}", f"{r.ppl:.4f}", f"{r.delta_ppl_percent:+.2f}", f"{r.kl_mean:.5f}",
             f"{r.kl_p99:.4f}", f"{100 * r.top1_agreement:.2f}"] for r in rows]


def markdown_table(headers: list[str], rows: list[list[str]], right: set[str]) -> str:
    """A Markdown table padded to line up in a terminal, as llama-bench prints it."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if h in right else c.ljust(w)
                                 for c, w, h in zip(cells, widths, headers)) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + ":" if h in right else "-" * w for w, h in zip(widths, headers)) + " |"
    return "\n".join([line(headers), rule, *map(line, rows)])


def write_reports(rows: list[CompareRow], out_dir: str | os.PathLike, title: str) -> list[Path]:
    """compare.md (title, then the table), compare.csv (raw numbers) and, with matplotlib,
    compare.png; returns the paths written."""
    out = Path(out_dir)
    md = out / "compare.md"
    md.write_text(f"{title}\n\n{markdown_table(HEADERS, table_rows(rows), set(HEADERS[1:]))}\n", encoding="utf-8")
    csv_path = out / "compare.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].to_dict()))
        w.writeheader()
        w.writerows(r.to_dict() for r in rows)
    written = [md, csv_path]
    png = _plot(rows, out / "compare.png", title)
    if png is not None:
        written.append(png)
    return written


def _plot(rows: list[CompareRow], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, field, label, log in ((axes[0], "delta_ppl_percent", "perplexity change vs F16, %", False),
                                  (axes[1], "kl_mean", "mean KL divergence from F16", True)):
        pts = [r for r in rows if not (log and getattr(r, field) <= 0)]
        for r in pts:
            color, dy = ("tab:orange", -10) if r.type.endswith(IMATRIX_SUFFIX) else \
                ("tab:green", -10) if r.type.endswith(AWQ_SUFFIX) else ("tab:blue", 4)
            ax.scatter([r.file_bytes / 2**20], [getattr(r, field)], color=color)
            ax.annotate(r.type, (r.file_bytes / 2**20, getattr(r, field)), textcoords="offset points",
                        xytext=(5, dy), fontsize=8)
        ax.set_xlabel("file size, MiB")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title.lstrip("# ").splitlines()[0], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
