"""Token sampling: the next token id from a row of logits, as llama.cpp's default sampler
chain picks it (common/sampling.cpp, src/llama-sampler.cpp; version pinned in docs/llama_cpp_conventions.md):

    penalties -> top_k -> top_p -> min_p -> temperature -> dist

* penalties: every token among the last `repeat_last_n` of the history (-1: all of it) has
  its logit divided by `repeat_penalty` when positive, multiplied when <= 0 (once, however
  often it occurs); 1.0 or repeat_last_n 0 turns it off;
* top_k: the k largest logits (k <= 0 or >= n_vocab: all);
* top_p: of those, sorted, the shortest prefix whose softmax mass (at temperature 1) reaches
  p, never less than one token (p >= 1: all);
* min_p: of those, the tokens whose logit is at least the largest + log(p), i.e. probability
  at least p times the top one's (p <= 0: all);
* temperature: logits / T, then one draw from their softmax. T <= 0 is greedy: the argmax of
  the penalized logits, lowest id on ties (the filters above never remove the argmax, so
  llama.cpp picks the same token up to tie order).

Where this differs from llama.cpp, on purpose:
* the draws: llama.cpp's come from std::mt19937, these from a numpy Generator seeded with
  `seed` (None: fresh entropy). Same seed, logits and history -> same tokens;
* top_p sums probabilities in float64 where llama.cpp sums in float32; over a whole
  vocabulary (top_k off) llama.cpp's softmax total comes out ~4e-4 low, which moves its cut
  by a dozen tokens of ~1e-5 probability each (tests/runtime/test_sampling.py, peer test);
* tokens tied at the top-k boundary are kept lowest id first (llama.cpp: in whatever order
  its partial sort leaves them).

Cost for a 151,936-token vocabulary: no sort and no argpartition over the vocabulary (the
latter alone takes ~1 ms). Top-k: the maxima of 1024 interleaved groups bound the k-th
largest logit from below (k groups hold a logit at least that large), so only the groups
reaching it are searched, and the few dozen survivors sorted. Exponentials are float32 (as
llama.cpp's expf) with float64 sums; a draw over many tokens searches block sums first.
About 0.1 ms per sample with the defaults (tests/runtime/test_sampling.py measures it).
The one slow case is llama.cpp's too: top_k off and top_p < 1 on a flat distribution,
where the 256 largest do not reach p and everything is sorted (~10 ms).

Imports from cpuq: errors only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from ..errors import InputError

_GROUPS = 1024          # interleaved groups whose maxima bound the top-k threshold (k <= _GROUPS // 4)
_WIDE_SEARCH = 256      # tokens sorted at first when top_p runs over the whole vocabulary (llama.cpp's k)
_BLOCK = 1024           # a draw over more than 4 blocks of tokens finds the block first
_GREEDY_TEMPERATURE = 1e-30  # and below: greedy (1/T overflows float32 near 1e-39; softmax = argmax by then)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample with; the names and defaults of cpuq.Model.generate (llama.cpp's
    defaults). Checked on construction: InputError names the argument."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        _real("temperature", self.temperature, ">= 0 (0 samples greedily)", lambda x: x >= 0)
        _integer("top_k", self.top_k, ">= 0 (0 keeps every token)", lambda x: x >= 0)
        _real("top_p", self.top_p, "in (0, 1] (1 keeps every token)", lambda x: 0 < x <= 1)
        _real("min_p", self.min_p, "in [0, 1] (0 keeps every token)", lambda x: 0 <= x <= 1)
        _real("repeat_penalty", self.repeat_penalty, "> 0 (1 is no penalty)", lambda x: x > 0)
        _integer("repeat_last_n", self.repeat_last_n, ">= -1 (-1: the whole history, 0: none)", lambda x: x >= -1)
        if self.seed is not None:
            _integer("seed", self.seed, ">= 0 or None", lambda x: x >= 0)


def _real(name: str, value: object, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise InputError(f"{name} must be a finite number {rule}, not {value!r}")


def _integer(name: str, value: object, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or not ok(value):
        raise InputError(f"{name} must be an integer {rule}, not {value!r}")


class Sampler:
    """Draws token ids with `params`; holds the random generator, so successive calls
    continue one seeded stream."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)
        # Scratch rows for whole-vocabulary arithmetic: allocating 600 KB temporaries per
        # token can cost more in page faults than the arithmetic (malloc hands big blocks
        # back to the OS), so the penalized logits and exponentials live here.
        self._penalized = np.empty(0, np.float32)
        self._work = np.empty(0, np.float32)

    def _scratch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._work.size != n:
            self._penalized, self._work = np.empty(n, np.float32), np.empty(n, np.float32)
        return self._penalized, self._work

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id. `logits`: float32 (n_vocab,), not modified; `history`: the
        token ids so far (prompt and generated), for the repetition penalty."""
        logits, ids = self._filter(logits, history)
        if ids is None:
            return _draw(logits, self.params.temperature, self.rng, self._work)
        if len(ids) == 1:
            return int(ids[0])
        return int(ids[_draw(logits[ids], self.params.temperature, self.rng)])

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """What `sample` draws from: the token ids left after penalties, top_k, top_p and
        min_p (largest logit first where top_k/top_p sorted them) and their probabilities
        at the temperature (float64, summing to 1). Greedy: the argmax, probability 1."""
        logits, ids = self._filter(logits, history)
        if ids is None:
            ids = np.arange(logits.size)
        scaled = (logits[ids].astype(np.float64) - float(logits[ids].max())) / max(self.params.temperature, 1e-300)
        probs = np.exp(scaled) if len(ids) > 1 else np.ones(1)
        return ids, probs / probs.sum()

    def _filter(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(the penalized logits, the candidate ids, None meaning every token)."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise InputError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        penalized, work = self._scratch(logits.size)
        logits = _penalize(logits, history, p.repeat_penalty, p.repeat_last_n, penalized)
        top = logits.max()  # NaN propagates through max, so this catches a NaN anywhere
        if not np.isfinite(top):
            raise InputError(f"logits: the largest is {top} (a NaN somewhere, or no finite logit)")
        if p.temperature <= _GREEDY_TEMPERATURE:
            return logits, np.array([np.argmax(logits)])  # the first of the largest: lowest id on ties
        ids = None
        if 0 < p.top_k < logits.size:
            ids = _top_sorted(logits, p.top_k)
        if p.top_p < 1:
            ids = _top_p(logits, ids, top, p.top_p, work)
        if p.min_p > 0:
            floor = np.float32(top) + np.float32(math.log(p.min_p))  # llama.cpp: max_logit + logf(p)
            # the max survives top_k and top_p, so this is the floor of the current candidates too
            ids = np.flatnonzero(logits >= floor) if ids is None else ids[logits[ids] >= floor]
        return logits, ids


def _penalize(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int,
              out: np.ndarray) -> np.ndarray:
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return logits
    recent = np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64)
    if recent.min() < 0 or recent.max() >= logits.size:
        raise InputError(f"history: token ids must be in [0, {logits.size}), got {recent.min()}..{recent.max()}")
    ids = np.unique(recent)
    out[:] = logits
    vals = out[ids]
    out[ids] = np.where(vals <= 0, vals * np.float32(penalty), vals / np.float32(penalty))
    return out


def _top_sorted(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits (fewer if fewer are finite), largest first, ties lowest
    id first."""
    n = logits.size
    if k <= _GROUPS // 4 and n >= 8 * _GROUPS:
        rows = n // _GROUPS
        group_max = logits[:rows * _GROUPS].reshape(rows, _GROUPS).max(axis=0)  # group g: ids = g mod _GROUPS
        floor = np.partition(group_max, _GROUPS - k)[_GROUPS - k]  # k groups reach it: the k-th largest does too
        groups = np.flatnonzero(group_max >= floor)
        ids = np.concatenate([(groups + _GROUPS * np.arange(rows)[:, None]).ravel(), np.arange(rows * _GROUPS, n)])
        ids = np.sort(ids[logits[ids] >= floor])
    else:
        ids = np.flatnonzero(logits > -np.inf)
    vals = logits[ids]
    if len(ids) > 4 * k:  # narrow to the k-th value before sorting (ties with it all kept)
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        keep = vals >= kth
        ids, vals = ids[keep], vals[keep]
    order = np.argsort(-vals, kind="stable")[:k]  # ids ascend, so stable = lowest id first
    return ids[order]


def _top_p(logits: np.ndarray, ids: np.ndarray | None, top: np.float32, p: float, work: np.ndarray) -> np.ndarray:
    """The shortest prefix of the candidates `ids` (sorted, largest first) whose probability
    mass reaches p. `ids` None means every token: the mass is then normalized over the whole
    vocabulary, and the 256 largest are tried before sorting everything, as llama.cpp does."""
    if ids is not None:
        cum = np.cumsum(np.exp(logits[ids] - top), dtype=np.float64)
        return ids[:_cut(cum, p * cum[-1])]
    np.subtract(logits, top, out=work)
    total = np.sum(np.exp(work, out=work), dtype=np.float64)
    for k in (min(_WIDE_SEARCH, logits.size), logits.size):
        ids = _top_sorted(logits, k)
        cum = np.cumsum(np.exp(logits[ids] - top), dtype=np.float64)
        if cum[-1] >= p * total:
            break
    return ids[:_cut(cum, p * total)]


def _cut(cum: np.ndarray, target: float) -> int:
    """Tokens kept: up to and including the first whose cumulative mass reaches target
    (all if none does, as with float rounding at p close to 1)."""
    return min(int(np.searchsorted(cum, target, side="left")) + 1, len(cum))


def _draw(logits: np.ndarray, temperature: float, rng: np.random.Generator, work: np.ndarray | None = None) -> int:
    """Index drawn from softmax(logits / temperature), by llama.cpp's rule: the first whose
    running sum reaches a uniform fraction of the total. `work`: scratch of logits' size."""
    weights = np.subtract(logits, logits.max(), out=work)
    weights *= np.float32(1 / temperature)
    np.exp(weights, out=weights)
    u = rng.random()
    if len(weights) <= 4 * _BLOCK:
        cum = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(cum, u * cum[-1], side="left")), len(cum) - 1)
    block_cum = np.cumsum(np.add.reduceat(weights, np.arange(0, len(weights), _BLOCK), dtype=np.float64))
    target = u * block_cum[-1]
    b = min(int(np.searchsorted(block_cum, target, side="left")), len(block_cum) - 1)
    cum = np.cumsum(weights[b * _BLOCK:(b + 1) * _BLOCK], dtype=np.float64) + (block_cum[b - 1] if b else 0.0)
    return b * _BLOCK + min(int(np.searchsorted(cum, target, side="left")), len(cum) - 1)
