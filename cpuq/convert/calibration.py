"""Calibration: run a model over text to collect llama.cpp's importance matrix, and convert
a checkpoint with one collected on the fly.

collect_imatrix does what llama-imatrix does (tools/imatrix/imatrix.cpp compute_imatrix):
the text's tokens (BOS first when the vocabulary adds one) in consecutive windows of n_ctx
tokens, each evaluated from an empty context with its first token replaced by BOS, and
for every matrix product in the transformer blocks (not the output matrix, as llama-imatrix
without --process-output) the sum over all tokens of each input channel's square. Sums are
kept in float64 (llama.cpp: float32) and written as float32.

convert_calibrated is llama.cpp's three-step recipe in one call: the checkpoint to a
temporary Q8_0 file next to the destination (llama.cpp's imatrix README suggests F16 or
Q8_0; Q8_0 halves the disk and memory, and its rounding is ~100x smaller than Q4_K's),
the importance matrix collected by running it, then the checkpoint to the wanted type with
it. Memory: the Q8_0 file is mapped, not read into memory, and the sums are one vector per
matrix; the conversions stream as convert does.

A conversion recipe, so it lives with the converter, though it runs the model: imports numpy,
the standard library and cpuq (errors, convert, runtime, eval.perplexity's windows).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError
from ..eval.perplexity import windows
from ..runtime.model import Model, load
from .imatrix import Imatrix
from .pipeline import Progress, check_destination, check_uses_importance, convert, out_type

MIN_CTX = 16  # llama-imatrix ignores products of fewer rows (IMatrixCollector::collect_imatrix)


def check_windows(n_ctx: object, n_chunks: object) -> None:
    """InputError unless n_ctx is a calibration window length and n_chunks a count of windows or None."""
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < MIN_CTX:
        raise InputError(f"n_ctx must be at least {MIN_CTX} tokens for calibration, not {n_ctx!r}")
    if n_chunks is not None and (not isinstance(n_chunks, int) or isinstance(n_chunks, bool) or n_chunks < 1):
        raise InputError(f"n_chunks must be a positive number of windows, not {n_chunks!r}")


def collect_imatrix(model: str | os.PathLike | Model, text: str, n_ctx: int = 512, n_chunks: Optional[int] = None,
                    dataset: str = "calibration text", n_threads: Optional[int] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> Imatrix:
    """The importance matrix of `model` (a path or a loaded Model) over `text`, in windows
    of n_ctx tokens (at most n_chunks). dataset: the text's name, stored in the file as
    llama-imatrix stores its prompt file's path. progress(done, total) before the first
    window and after each.
    InputError: n_ctx < 16, a text shorter than one window."""
    check_windows(n_ctx, n_chunks)
    m = model if isinstance(model, Model) else load(model, n_ctx=n_ctx, n_threads=n_threads)
    try:
        tok = m.tokenizer
        tokens = tok.encode(text)
        if len(tokens) < n_ctx:
            raise InputError(f"the calibration text is {len(tokens)} tokens; one window of n_ctx={n_ctx} needs "
                             f"{n_ctx} (use a longer text or a smaller n_ctx)")
        wins = windows(tokens, n_ctx, n_chunks, tok.bos_id if tok.vocab.add_bos else None)
        im = Imatrix(chunk_size=n_ctx, datasets=[dataset or "calibration text"])
        if progress is not None:
            progress(0, len(wins))
        for i, w in enumerate(wins):
            m.logits(w, len(w) - 1, observe=im.add)  # one row through the output matrix: its logits are unused
            im.chunk_count = i + 1
            if progress is not None:
                progress(i + 1, len(wins))
        return im
    finally:
        if m is not model:
            m.close()


def convert_calibrated(src_dir: str | os.PathLike, dst_path: str | os.PathLike, qtype: str, text: str,
                       dataset: str = "calibration text", n_ctx: int = 512, n_chunks: Optional[int] = None,
                       force: bool = False, n_threads: Optional[int] = None, progress: Progress | None = None,
                       calibration_progress: Optional[Callable[[int, int], None]] = None, awq: bool = True) -> Path:
    """Convert `src_dir` to `dst_path` as `qtype`, with an importance matrix collected over
    `text` by a temporary Q8_0 conversion (removed afterwards, also on error). progress:
    as convert's, for both conversions (the first names its tensors "calibration model:
    ..."); calibration_progress(done, total) after each window. awq: also scale the blocks'
    input channels by the matrix (convert.scaling; cpuq's default for calibration text:
    real-weights Q4_K_M, perplexity increase over F16 +3.57% -> +2.01%; an MoE model's
    attention only)."""
    src, dst = Path(src_dir), Path(dst_path)
    check_uses_importance(out_type(qtype))  # before the calibration's work, not after
    check_windows(n_ctx, n_chunks)
    check_destination(src, dst, force)
    # A fixed name beside the output (convert writes it through its own partial_file): a run
    # killed before the finally below leaves this one file, which the next calibrated run of
    # the same output overwrites (force) and removes.
    tmp = dst.with_name(f".{dst.name}.calibration-q8_0.gguf")
    written = False
    try:
        first = None if progress is None else (lambda d, t, name: progress(d, t, f"calibration model: {name}"))
        convert(src, tmp, "q8_0", force=True, progress=first)
        written = True
        im = collect_imatrix(tmp, text, n_ctx=n_ctx, n_chunks=n_chunks, dataset=dataset, n_threads=n_threads,
                             progress=calibration_progress)
        return convert(src, dst, qtype, force=force, progress=progress, imatrix=im, awq=awq)
    finally:
        if written:  # else it is not ours: a killed run's, or that of a run writing it now
            tmp.unlink(missing_ok=True)
