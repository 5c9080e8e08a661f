"""Perplexity of a model over a text, and how far its next-token distribution is from a
base model's (KL divergence), computed as llama.cpp's llama-perplexity computes them.

Windows: the text's tokens (BOS first when the vocabulary adds one, as common_tokenize
does) cut into consecutive windows of n_ctx tokens (at most n_chunks of them; the text
must hold two). Each window is evaluated from an empty context with its first token
replaced by BOS (when the vocabulary adds one), and its second half is scored: the logits
after positions first = n_ctx/2 .. n_ctx-2 against the tokens that follow, n_ctx - 1 -
first tokens per window. Perplexity = exp(mean negative log-likelihood); its ± is
llama.cpp's (standard deviation of the NLL / sqrt(count - 1), times the perplexity).

With a base model (the same vocabulary, usually the F16 or Q8_0 file of the same
checkpoint), at every scored position: KL(base || model) = sum_v p_base (log p_base -
log p_model), reported as its mean and 99th percentile over positions; top-1 agreement
(the share of positions where both models' most likely token is the same); and the base's
perplexity on the same windows, with the model's difference from it in percent.
Log-probabilities are computed in float64 (llama.cpp: float logits, double sums).

Imports numpy, cpuq.errors and cpuq.runtime; nothing from the CLI.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from ..runtime.model import Model, load

ROWS_PER_BLOCK = 32  # log-softmax rows at a time: 32 x 152k float64 is 39 MB


@dataclass(frozen=True)
class PerplexityResult:
    """What `perplexity` measured. The base_* / kl_* / top1 fields are None without a base."""
    model: str
    n_ctx: int
    n_chunks: int
    n_scored: int  # tokens scored: n_chunks * (n_ctx - 1 - n_ctx // 2)
    ppl: float
    ppl_error: float  # llama.cpp's +/- estimate
    seconds: float
    base: Optional[str] = None
    base_ppl: Optional[float] = None
    delta_ppl_percent: Optional[float] = None  # (ppl - base_ppl) / base_ppl * 100
    kl_mean: Optional[float] = None
    kl_p99: Optional[float] = None
    top1_agreement: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """float32 (n, n_vocab) -> float64 log-probabilities, row by row."""
    lp = logits.astype(np.float64)
    lp -= lp.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return lp


def windows(tokens: list[int], n_ctx: int, n_chunks: Optional[int], bos_id: Optional[int]) -> list[np.ndarray]:
    """The windows llama-perplexity evaluates: consecutive n_ctx-token slices of `tokens`,
    the first token of each replaced by bos_id when given."""
    count = len(tokens) // n_ctx
    if n_chunks is not None:
        count = min(count, n_chunks)
    out = []
    for i in range(count):
        w = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], np.int64)
        if bos_id is not None:
            w[0] = bos_id
        out.append(w)
    return out


def _score(logits: np.ndarray, targets: np.ndarray, base_logits: Optional[np.ndarray] = None) -> dict:
    """Per row: "nll" = -log p(target) (float64) and "top" = the argmax; with base_logits
    also the base's "base_nll" and "base_top", and "kl" = KL(base || model). Each row's
    log-softmax is computed once, ROWS_PER_BLOCK rows at a time."""
    n = len(targets)
    names = ("nll", "top") + (("base_nll", "base_top", "kl") if base_logits is not None else ())
    out = {name: np.empty(n, np.int64 if name.endswith("top") else np.float64) for name in names}
    for r0 in range(0, n, ROWS_PER_BLOCK):
        rows = slice(r0, min(n, r0 + ROWS_PER_BLOCK))
        at = np.arange(rows.stop - r0), targets[rows]
        lm = log_softmax_rows(logits[rows])
        out["nll"][rows], out["top"][rows] = -lm[at], lm.argmax(axis=1)
        if base_logits is not None:
            lb = log_softmax_rows(base_logits[rows])
            out["base_nll"][rows], out["base_top"][rows] = -lb[at], lb.argmax(axis=1)
            out["kl"][rows] = (np.exp(lb) * (lb - lm)).sum(axis=1)
    return out


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) and llama-perplexity's +/- for it."""
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll ** 2).mean()) - mean * mean
    err = math.sqrt(var / (len(nll) - 1)) * ppl if var > 0 and len(nll) > 1 else 0.0
    return ppl, err


def perplexity(model: str | os.PathLike | Model, text: str, n_ctx: int = 512, n_chunks: Optional[int] = None,
               kl_base: str | os.PathLike | Model | None = None, n_threads: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None, gpu_layers: int = 0,
               cpu_moe: bool = False) -> PerplexityResult:
    """Perplexity of `model` (a path, or a loaded Model) over `text`, in windows of n_ctx
    tokens (at most n_chunks), optionally against `kl_base`. progress(done, total) is called
    after each window. InputError: n_ctx < 4 or odd, a text shorter than two windows, a base
    whose vocabulary or tokenization differs. gpu_layers, cpu_moe: as cpuq.load's, for
    models given as paths (the base's too)."""
    if not isinstance(n_ctx, int) or n_ctx < 4 or n_ctx % 2:
        raise InputError(f"n_ctx must be an even number of tokens >= 4, not {n_ctx!r}")
    if n_chunks is not None and (not isinstance(n_chunks, int) or n_chunks < 1):
        raise InputError(f"n_chunks must be a positive number of windows, not {n_chunks!r}")
    opened = []
    try:
        m = model if isinstance(model, Model) else _open(model, n_ctx, n_threads, gpu_layers, cpu_moe, opened)
        base = None
        if kl_base is not None:
            base = kl_base if isinstance(kl_base, Model) else _open(kl_base, n_ctx, n_threads, gpu_layers, cpu_moe,
                                                                    opened)
        return _measure(m, base, text, n_ctx, n_chunks, progress)
    finally:
        for m in opened:
            m.close()


def _open(path, n_ctx: int, n_threads: Optional[int], gpu_layers: int, cpu_moe: bool, opened: list) -> Model:
    m = load(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, cpu_moe=cpu_moe)
    opened.append(m)
    return m


def _measure(m: Model, base: Optional[Model], text: str, n_ctx: int, n_chunks: Optional[int],
             progress) -> PerplexityResult:
    tok = m.tokenizer
    tokens = tok.encode(text)
    if len(tokens) < 2 * n_ctx:
        raise InputError(f"the text is {len(tokens)} tokens; perplexity with n_ctx={n_ctx} needs at least "
                         f"{2 * n_ctx} (two windows)")
    if base is not None:
        if base.config.n_vocab != m.config.n_vocab or base.tokenizer.encode(text) != tokens:
            raise InputError(f"{base.path}: the base model's vocabulary differs from {m.path}'s "
                             f"(KL divergence needs the same tokens)")
    bos = tok.bos_id if tok.vocab.add_bos else None
    wins = windows(tokens, n_ctx, n_chunks, bos)
    first = n_ctx // 2
    scores = []
    start = time.perf_counter()
    for i, w in enumerate(wins):
        # logits after positions first .. n_ctx-2, against the tokens that follow them
        base_logits = base.logits(w, first)[:-1] if base is not None else None
        scores.append(_score(m.logits(w, first)[:-1], w[first + 1:], base_logits))
        if progress is not None:
            progress(i + 1, len(wins))
    seconds = time.perf_counter() - start
    joined = {name: np.concatenate([s[name] for s in scores]) for name in scores[0]}
    ppl, err = _ppl(joined["nll"])
    result = dict(model=str(m.path), n_ctx=n_ctx, n_chunks=len(wins), n_scored=len(joined["nll"]), ppl=ppl,
                  ppl_error=err, seconds=seconds)
    if base is not None:
        base_ppl, _ = _ppl(joined["base_nll"])
        kls = joined["kl"]
        result.update(base=str(base.path), base_ppl=base_ppl, delta_ppl_percent=(ppl - base_ppl) / base_ppl * 100,
                      kl_mean=float(kls.mean()), kl_p99=float(np.percentile(kls, 99)),
                      top1_agreement=float((joined["top"] == joined["base_top"]).mean()))
    return PerplexityResult(**result)
