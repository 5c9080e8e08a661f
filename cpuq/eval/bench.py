"""Prompt (prefill) and generation (decode) speed of a GGUF model, in the manner of
llama.cpp's llama-bench: tests named "pp512" and "tg128", tokens per second as the mean
and sample standard deviation over repetitions, after one warm-up repetition that is not
counted. The data behind `cpuq bench`.

One repetition: reset the context, evaluate the n_prompt-token prompt in one call (ppN),
then n_gen single-token steps, each feeding the argmax of the previous step's logits (tgN).
Unlike llama-bench, whose tg test starts from an empty context, tgN runs after the prompt,
at depth n_prompt (llama-bench's "tg128 @ d512"), as generation does after a real prompt.

Imports numpy, cpuq.errors, cpuq.gguf_io, cpuq.arch and cpuq.runtime; nothing from the CLI.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..arch import ModelConfig
from ..errors import InputError
from ..gguf_io import open_gguf
from ..runtime.model import load
from ..runtime.tokenizer import NORMAL, Tokenizer


@dataclass(frozen=True)
class BenchResult:
    """One test of `bench`: its name ("pp512", "tg128"), the tokens one repetition
    evaluates, the seconds each counted repetition took, the tokens already in the
    context when it starts (0 for ppN, n_prompt for tgN), the thread count and where the
    blocks ran (Model.gpu_status: "CPU only", or "24 of 24 layers and the output on ...")."""
    test: str
    n_tokens: int
    seconds: tuple[float, ...]
    n_depth: int
    n_threads: int
    gpu: str = "CPU only"

    @property
    def samples_per_second(self) -> tuple[float, ...]:
        """Tokens per second of each repetition."""
        return tuple(self.n_tokens / s for s in self.seconds)

    @property
    def mean_tokens_per_second(self) -> float:
        """Mean of the per-repetition rates (llama-bench's avg_ts)."""
        rates = self.samples_per_second
        return sum(rates) / len(rates)

    @property
    def std_tokens_per_second(self) -> float:
        """Sample standard deviation (n - 1) of the per-repetition rates, 0 for one
        repetition (llama-bench's stddev_ts)."""
        rates = self.samples_per_second
        if len(rates) < 2:
            return 0.0
        mean = self.mean_tokens_per_second
        return math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1))

    def to_dict(self) -> dict:
        """JSON-ready; the rate keys are llama-bench's (avg_ts, stddev_ts, samples_ts)."""
        return {"test": self.test, "n_tokens": self.n_tokens, "n_depth": self.n_depth, "n_threads": self.n_threads,
                "gpu": self.gpu,
                "avg_ts": self.mean_tokens_per_second, "stddev_ts": self.std_tokens_per_second,
                "samples_ts": list(self.samples_per_second), "samples_s": list(self.seconds)}


def prompt_ids(tokenizer: Tokenizer, n_prompt: int, seed: int = 0) -> list[int]:
    """A deterministic benchmark prompt of `n_prompt` ids: BOS first if the file adds one
    (as llama-bench), the rest drawn uniformly from the ordinary (NORMAL) tokens, so no
    control, unused or user-defined token appears where text would never put it."""
    ordinary = np.flatnonzero(tokenizer.vocab.attrs == NORMAL)
    if ordinary.size == 0:  # a vocabulary without token types marked NORMAL: take any id
        ordinary = np.arange(tokenizer.n_vocab)
    ids = np.random.default_rng(seed).choice(ordinary, n_prompt).tolist()
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids[0] = tokenizer.bos_id
    return ids


def bench(path: str | os.PathLike, n_prompt: int = 512, n_gen: int = 128, repeat: int = 3,
          n_threads: Optional[int] = None, seed: int = 0,
          progress: Optional[Callable[[str, int, int], None]] = None, gpu_layers: int = 0,
          cpu_moe: bool = False) -> list[BenchResult]:
    """Measure prefill and decode speed of the GGUF model at `path`: [ppN, tgN] results.

    The model is loaded once with a context of exactly n_prompt + n_gen tokens (which must
    fit in the model's context length) and `n_threads` threads (default: physical cores).
    `repeat` timed repetitions follow one warm-up (Numba's compiled-kernel cache, page
    faults on the mapped weights). The prompt is `prompt_ids(tokenizer, n_prompt, seed)`.
    progress(test, repetition, repeat) is called before each test runs; repetition 0 is
    the warm-up. gpu_layers, cpu_moe: as cpuq.load's; each result's `gpu` says where the blocks ran.
    """
    for name, value in (("n_prompt", n_prompt), ("n_gen", n_gen), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, not {value!r}")
    # The context check comes before load: the KV cache is sized by n_ctx.
    with open_gguf(path) as f:
        context_length = ModelConfig.from_gguf(f).context_length
    n_ctx = n_prompt + n_gen
    if n_ctx > context_length:
        raise InputError(f"{path}: n_prompt + n_gen = {n_prompt} + {n_gen} = {n_ctx} tokens, more than the model's "
                         f"context length of {context_length}")
    pp, tg = f"pp{n_prompt}", f"tg{n_gen}"
    prefill: list[float] = []
    decode: list[float] = []
    with load(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, cpu_moe=cpu_moe) as m:
        ids = prompt_ids(m.tokenizer, n_prompt, seed)
        for rep in range(repeat + 1):
            if progress:
                progress(pp, rep, repeat)
            m.reset()
            start = time.perf_counter()
            logits = m.eval(ids)
            prefill_s = time.perf_counter() - start
            if progress:
                progress(tg, rep, repeat)
            start = time.perf_counter()
            for _ in range(n_gen):
                logits = m.eval([int(np.argmax(logits))])
            decode_s = time.perf_counter() - start
            if rep:
                prefill.append(prefill_s)
                decode.append(decode_s)
        n_threads, gpu = m.n_threads, m.gpu_status
    return [BenchResult(pp, n_prompt, tuple(prefill), 0, n_threads, gpu),
            BenchResult(tg, n_gen, tuple(decode), n_prompt, n_threads, gpu)]
