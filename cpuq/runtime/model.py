"""`cpuq.load(path)`: a GGUF model ready to run — tokenize, logits, generate, chat.

A Model owns its memory map, weights, tokenizer, chat template and one KV cache; nothing
is global, so several models can live in one process. The cache remembers which tokens
it holds: a new prompt (or a chat turn, whose rendered conversation starts with the
previous one) only evaluates the tokens after the longest common prefix.

Context limit: a prompt that does not fit in n_ctx raises InputError with the numbers;
generation that reaches n_ctx stops there with finish_reason "length" (no context
shift), and `reset()` (or a shorter conversation) makes room again.

Imports numpy, numba (thread count), cpuq.arch, cpuq.gguf_io, cpuq.errors and the
runtime modules.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numba
import numpy as np

from ..arch import ModelConfig
from ..errors import InputError, UnsupportedError
from ..gguf_io import open_gguf
from .forward import KVCache, Observer, Rope, forward
from .gemm import Gemm
from .sampling import Sampler, SamplingParams
from .template import ChatTemplate
from .tokenizer import Tokenizer
from .weights import load_weights

N_BATCH = 512  # prompt tokens per forward call: bounds activation memory, keeps matmuls wide


def physical_cores() -> int:
    """Physical cores (what llama.cpp uses by default): distinct (package, core id) pairs
    in /proc/cpuinfo, else os.cpu_count()."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass
class Timings:
    """Of the last generate/chat call: prompt tokens evaluated (after cache reuse) and
    tokens generated, with the seconds each took."""
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


class GpuFallbackWarning(UserWarning):
    """gpu_layers was asked for but the model runs on the CPU (no CuPy, no CUDA device, a
    tensor type the GPU kernels lack, or too little GPU memory); the message says which."""


class Model:
    """A loaded GGUF model. See cpuq.load."""

    gpu_status = "CPU only"  # where the blocks run, in words (set when gpu_layers is asked for)

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 gpu_layers: int = 0, kv_type: str = "f16"):
        if not isinstance(gpu_layers, int) or isinstance(gpu_layers, bool) or gpu_layers < -1:
            raise InputError(f"gpu_layers must be -1 (all) or a number of layers >= 0, not {gpu_layers!r}")
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise InputError(f"n_ctx must be a positive integer, not {n_ctx!r}")
        if kv_type not in KVCache.TYPES:
            raise InputError(f"kv_type must be one of {', '.join(KVCache.TYPES)}, not {kv_type!r}")
        max_threads = numba.config.NUMBA_NUM_THREADS
        if n_threads is None:
            n_threads = min(physical_cores(), max_threads)
        if not isinstance(n_threads, int) or not 1 <= n_threads <= max_threads:
            raise InputError(f"n_threads must be between 1 and {max_threads}, not {n_threads!r}")
        self.path = Path(path)
        self._file = open_gguf(self.path)
        try:
            self.config = ModelConfig.from_gguf(self._file)
            self.weights = load_weights(self._file, self.config)
            self.tokenizer = Tokenizer.from_gguf(self._file)
            self.template = ChatTemplate(self._file.get("tokenizer.chat_template"),
                                         bos_token=self.tokenizer.token_text(self.tokenizer.bos_id)
                                         if self.tokenizer.bos_id is not None else "",
                                         eos_token=self.tokenizer.token_text(self.tokenizer.eos_id)
                                         if self.tokenizer.eos_id is not None else "")
        except BaseException:
            self._file.close()
            raise
        if self.tokenizer.n_vocab > self.config.n_vocab:
            raise InputError(f"{self.path}: the tokenizer has {self.tokenizer.n_vocab} tokens but token_embd "
                             f"only {self.config.n_vocab} rows")
        self.n_ctx = min(n_ctx, self.config.context_length) if n_ctx == 4096 else n_ctx
        self.n_threads = n_threads
        self._rope = Rope.from_config(self.config)
        self.kv_type = kv_type
        self._cache = KVCache(self.config, self.n_ctx, kv_type)
        self._gemm = Gemm(n_threads)  # prompt chunks' matmuls (threads start on first use)
        self._gpu = self._offload(gpu_layers) if gpu_layers else None
        self._cache.gpu = self._gpu_cache(self.n_ctx)
        self._tokens: list[int] = []  # what the cache holds, position by position
        self.finish_reason: str | None = None  # of the last generate/chat: "stop", "eos", "length", "n_ctx"
        self.timings = Timings()

    def _offload(self, gpu_layers: int):
        """The GPU part for gpu_layers, or None with a warning (one line: why) when there is
        no usable GPU, in which case everything runs on the CPU."""
        from .gpu import GpuOffload, find_gpu  # imports cupy only now
        cp, why = find_gpu()
        if cp is not None:
            try:
                gpu = GpuOffload(self.weights, self.config, self._rope, gpu_layers, self.kv_type)
            except UnsupportedError as e:
                why = str(e)
            except cp.cuda.memory.OutOfMemoryError as e:
                why = f"not enough GPU memory for {gpu_layers} layers ({e})"
            else:
                self.gpu_status = (f"{gpu.n_layers} of {self.config.n_layer} layers"
                                   f"{' and the output' if gpu.with_output else ''} on {gpu.name}")
                return gpu
        self.gpu_status = f"CPU only: {why}"
        warnings.warn(f"gpu_layers={gpu_layers} ignored, running on the CPU: {why}", GpuFallbackWarning, stacklevel=3)
        return None

    def _gpu_cache(self, n_ctx: int):
        return None if self._gpu is None else self._gpu.new_cache(n_ctx)

    # tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text` (BOS added if the file asks for it). special=True parses
        control-token text such as <|im_start|> as those tokens; plain text never does."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(list(ids), dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise InputError("token ids must be a non-empty sequence of integers")
        bad = np.nonzero((arr < 0) | (arr >= self.config.n_vocab))[0]
        if bad.size:
            raise InputError(f"token id {int(arr[bad[0]])} at position {int(bad[0])} is outside the vocabulary "
                             f"(0..{self.config.n_vocab - 1})")
        return arr

    # evaluation -------------------------------------------------------------------------
    def logits(self, ids: Sequence[int], first: int = 0, observe: Observer | None = None) -> np.ndarray:
        """float32 (len(ids) - first, n_vocab): the logits after positions first .. len(ids)-1
        (by default every position), in a fresh context (the chat cache is left as it was).
        Rows before `first` are not multiplied with the output matrix (perplexity scores the
        second half of a window). observe(x, names): see runtime.forward.forward (the
        importance matrix's collector)."""
        arr = self._check_ids(ids)
        if not isinstance(first, int) or not 0 <= first < arr.size:
            raise InputError(f"first must be a position in 0..{arr.size - 1}, not {first!r}")
        if observe is not None and self._gpu is not None:
            raise InputError("observe needs the whole model on the CPU (load with gpu_layers=0)")
        numba.set_num_threads(self.n_threads)
        cache = KVCache(self.config, arr.size, self.kv_type)
        cache.gpu = self._gpu_cache(arr.size)
        parts = [self._forward(arr[i:i + N_BATCH], cache, first - i, observe)
                 for i in range(0, arr.size, N_BATCH)]
        return np.concatenate(parts)

    def _ingest(self, ids: list[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`, evaluating only what is not already there;
        return the logits after the last one."""
        if len(ids) > self.n_ctx:
            raise InputError(f"the prompt is {len(ids)} tokens; the context holds {self.n_ctx} "
                             f"(load with a larger n_ctx, or shorten the conversation)")
        arr = self._check_ids(ids)
        keep = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # the last token is always evaluated, for its logits
        self._cache.n_past = keep
        del self._tokens[keep:]
        start = time.perf_counter()
        self.timings = Timings(prompt_tokens=len(ids) - keep)
        logits = self._append(arr[keep:])
        self.timings.prompt_seconds = time.perf_counter() - start
        return logits

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Evaluate `ids` after the tokens the context already holds (nothing is re-evaluated
        or reused, as llama.cpp's llama_decode) and return float32 (n_vocab,): the logits
        after the last one. InputError if they do not fit in n_ctx; `reset()` empties the
        context. The same forward pass generate/chat run; `cpuq bench` times it."""
        arr = self._check_ids(ids)
        if len(self._tokens) + arr.size > self.n_ctx:
            raise InputError(f"{arr.size} more tokens do not fit: the context holds {len(self._tokens)} of "
                             f"{self.n_ctx} (reset(), or load with a larger n_ctx)")
        self._cache.n_past = len(self._tokens)  # as _ingest: the token list is the truth
        return self._append(arr)

    def _append(self, arr: np.ndarray) -> np.ndarray:
        """Run the non-empty ids `arr` after the cache's tokens, N_BATCH at a time; the
        logits after the last one."""
        numba.set_num_threads(self.n_threads)
        for i in range(0, arr.size, N_BATCH):
            chunk = arr[i:i + N_BATCH]
            logits = self._forward(chunk, self._cache, chunk.size - 1)
            self._tokens.extend(int(t) for t in chunk)
        return logits[0]

    def reset(self) -> None:
        """Forget the conversation: the next prompt starts from an empty cache."""
        self._cache.clear()
        self._tokens = []

    # generation -------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream the continuation of `prompt` (text, tokenized with special tokens parsed,
        or token ids) as text pieces. Stops at EOS (unless ignore_eos), a stop string
        (not included in the output), max_tokens, or a full context; `finish_reason` says
        which."""
        ids = self.tokenizer.encode(prompt, special=True) if isinstance(prompt, str) else list(prompt)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        return self._stream(ids, params, max_tokens, tuple(stop), ignore_eos)

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]),
        rendered with the file's chat template (ChatML if it has none). The KV cache is
        reused across turns: only the new part of the conversation is evaluated."""
        text = self.template.render(list(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(text, special=True)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        return self._stream(ids, params, max_tokens, tuple(stop), ignore_eos)

    def _stream(self, ids: list[int], params: SamplingParams, max_tokens: int, stop: tuple[str, ...],
                ignore_eos: bool) -> Iterator[str]:
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise InputError(f"max_tokens must be a non-negative integer, not {max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise InputError("stop strings must be non-empty strings")
        sampler = Sampler(params)
        self.finish_reason = None
        logits = self._ingest(ids)  # errors (too long, bad ids) surface here, before iteration
        return self._decode_loop(logits, sampler, max_tokens, stop, ignore_eos)

    def _decode_loop(self, logits, sampler, max_tokens, stop, ignore_eos) -> Iterator[str]:
        eos = set() if ignore_eos else self.tokenizer.eos_ids
        decoder = self.tokenizer.stream_decoder()
        held = ""  # text not yet yielded because it may be the start of a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        self.finish_reason = "length"
        start = time.perf_counter()
        for _ in range(max_tokens):
            token = sampler.sample(logits, self._tokens)
            self.timings.generated_tokens += 1
            self.timings.generate_seconds = time.perf_counter() - start
            if token in eos:
                self.finish_reason = "eos"
                break
            held += decoder.feed(token)
            if stop:
                hit = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
                if hit >= 0:
                    if hit:
                        yield held[:hit]
                    self.finish_reason = "stop"
                    return
                if len(held) > hold:
                    yield held[:len(held) - hold]
                    held = held[len(held) - hold:]
            elif held:
                yield held
                held = ""
            if len(self._tokens) >= self.n_ctx:
                self.finish_reason = "n_ctx"
                break
            logits = self._step(token)
            self.timings.generate_seconds = time.perf_counter() - start
        held += decoder.flush()
        if held:
            yield held

    def _step(self, token: int) -> np.ndarray:
        return self._append(np.array([token], np.int64))

    def _forward(self, tokens: np.ndarray, cache: KVCache, logits_from: int,
                 observe: Observer | None = None) -> np.ndarray:
        if tokens.size < self._gemm.min_tokens:
            return forward(self.weights, self.config, self._rope, tokens, cache, logits_from, observe=observe,
                           gpu=self._gpu)
        with self._gemm.session():
            return forward(self.weights, self.config, self._rope, tokens, cache, logits_from, self._gemm, observe,
                           self._gpu)

    def close(self) -> None:
        self._gemm.close()
        self._gpu = self._cache.gpu = None  # the GPU memory goes back to CuPy's pool
        self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None, gpu_layers: int = 0,
         kv_type: str = "f16") -> Model:
    """Load a GGUF model (qwen2, qwen3 or llama; F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/
    Q5_K/Q6_K tensors). Weights stay memory-mapped; nothing is dequantized up front.
    n_ctx: context length in tokens (default 4096, or the model's trained context if
    smaller); n_threads: default the number of physical cores; kv_type: the KV cache's
    element type, "f16" (default, as llama.cpp's) or "f32" (twice the memory, no rounding
    of keys and values); gpu_layers: run the last N transformer blocks on a CUDA GPU through
    CuPy (-1: all of them and the output matrix; needs the `gpu` extra), else (no CuPy or
    no GPU) a GpuFallbackWarning and the CPU."""
    return Model(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, kv_type=kv_type)
