"""`cpuq.load(path)`: a GGUF model ready to run — tokenize, logits, generate, chat.

A Model owns its memory map, weights, tokenizer, chat template and one KV cache; nothing
is global, so several models can live in one process. The cache remembers which tokens
it holds: a new prompt (or a chat turn, whose rendered conversation starts with the
previous one) only evaluates the tokens after the longest common prefix.

Context limit: a prompt that does not fit in n_ctx (generate, chat, eval, logits) raises
InputError with the numbers; generation that reaches n_ctx stops there with finish_reason
"n_ctx" (no context shift), and `reset()` (or a shorter conversation) makes room again.
The KV cache is mapped lazily, so a large n_ctx costs memory only as it fills; an n_ctx
whose whole cache could never fit in the machine's memory is refused at load.

Threads: two Models run at the same time from two threads (nothing is global; Numba's
tbb and omp threading layers take parallel regions from several threads, and where only
its workqueue layer exists, which aborts the process on that, forward passes take turns
through one lock). One Model runs one call at a time: a
call from a second thread while another thread's generate/chat stream is unfinished, or
while a call is running, raises InputError at once (it does not wait). See Model.

Imports numpy, numba (thread count), cpuq.arch, cpuq.gguf_io, cpuq.errors and the
runtime modules.
"""
from __future__ import annotations

import itertools
import os
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numba
import numpy as np

from ..arch import ModelConfig
from ..errors import GpuFallbackWarning, InputError, UnsupportedError
from ..gguf_io import open_gguf
from .chunk import Observer
from .forward import KVCache, Paths, Rope, step_pack
from .gemm import Gemm
from .guard import CallGuard, Stream
from ..info import human_bytes
from .host import ONE_AT_A_TIME, memory_bytes, physical_cores, sigint_deferred, threadsafe_layer
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer, utf8_text
from .warmup import StepCompiler, cold_marker
from .weights import load_weights

if TYPE_CHECKING:
    from .template import ChatTemplate

N_BATCH = 512  # prompt tokens per forward call: bounds activation memory, keeps matmuls wide


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


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


class Model(CallGuard):
    """A loaded GGUF model. See cpuq.load.

    Not reentrant: a Model holds one KV cache, so it runs one call at a time. generate,
    chat, logits, eval, reset and close called while another thread is inside one of them,
    or while another thread's generate/chat stream is unfinished (not yet exhausted,
    closed or garbage-collected), raise InputError("... is in use by another thread ...")
    at once instead of waiting; use one Model per thread, or serialize the calls. A stream
    may be consumed from any thread. In the thread that left a stream unfinished, a new
    call ends that stream (resuming it raises InputError), as a new prompt replaces the
    old one; logits, which runs in a fresh context, leaves it be. tokenize and detokenize
    are safe from any thread at any time."""

    gpu_status = "CPU only"  # where the blocks run, in words (set when gpu_layers is asked for)

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 gpu_layers: int = 0, kv_type: str = "f16", cpu_moe: bool = False):
        if not isinstance(gpu_layers, int) or isinstance(gpu_layers, bool) or gpu_layers < -1:
            raise InputError(f"gpu_layers must be -1 (all) or a number of layers >= 0, not {gpu_layers!r}")
        if not isinstance(cpu_moe, bool):
            raise InputError(f"cpu_moe must be True or False, not {cpu_moe!r}")
        self._cpu_moe = cpu_moe
        if not _is_int(n_ctx) or n_ctx < 1:
            raise InputError(f"n_ctx must be a positive integer, not {n_ctx!r}")
        n_ctx = int(n_ctx)
        if not isinstance(kv_type, str) or kv_type not in KVCache.TYPES:
            raise InputError(f"kv_type must be one of {', '.join(KVCache.TYPES)}, not {kv_type!r}")
        # Numba's pool is sized once per process (NUMBA_NUM_THREADS, default: the CPUs), and
        # a parallel region cannot use more: so no oversubscription, and 0 is not "default"
        # (llama.cpp's -t 0); None is.
        max_threads = numba.config.NUMBA_NUM_THREADS
        if n_threads is None:
            n_threads = min(physical_cores(), max_threads)
        if not _is_int(n_threads) or not 1 <= n_threads <= max_threads:
            raise InputError(f"n_threads must be between 1 and {max_threads} (Numba's thread pool, "
                             f"NUMBA_NUM_THREADS), or None for the physical cores, not {n_threads!r}")
        n_threads = int(n_threads)
        self._init_guard()
        self.path = Path(path)
        self._file = open_gguf(self.path)
        try:
            self.config = ModelConfig.from_gguf(self._file)
            self.weights = load_weights(self._file, self.config)
            self._steps = step_pack(self.weights, self.config, self._file.mapped)
            self.tokenizer = Tokenizer.from_gguf(self._file)
            self._template_source = self._file.get("tokenizer.chat_template")  # compiled by the template property
            self._template: ChatTemplate | None = None
            if self.tokenizer.n_vocab > self.config.n_vocab:
                raise InputError(f"{self.path}: the tokenizer has {self.tokenizer.n_vocab} tokens but token_embd "
                                 f"only {self.config.n_vocab} rows")
            self.n_ctx = min(n_ctx, self.config.context_length) if n_ctx == 4096 else n_ctx
            self.n_threads = n_threads
            self._rope = Rope.from_config(self.config)
            self.kv_type = kv_type
            self._cache = self._new_cache(self.n_ctx)
            self._gemm = Gemm(n_threads)  # prompt chunks' matmuls (threads start on first use)
            self._turns = nullcontext() if threadsafe_layer() else ONE_AT_A_TIME
        except BaseException:
            self._file.close()
            raise
        try:
            self._gpu = self._offload(gpu_layers) if gpu_layers else None
            self._cache.gpu = self._gpu_cache(self.n_ctx)
        except BaseException:
            self.close()
            raise
        # a cold cache's step kernels, compiled on the other core meanwhile (runtime.warmup)
        step_compiler = None if self._gpu is not None else StepCompiler.start(self.path, self.weights, self.config,
                                                                              kv_type, self._steps is not None)
        if step_compiler is not None:
            weakref.finalize(self, step_compiler.stop)
        # Numba's cache lacks this kind of model's kernels: the first answer waits for them
        marker = cold_marker(self.weights, self.config, kv_type, self._steps is not None)
        self.first_run = step_compiler is not None or marker is not None
        self._paths = Paths(self.weights, self.config, self._rope, self._gemm, self._gpu, self._steps, step_compiler)
        if step_compiler is None and self._gpu is None and marker is not None:
            self._paths.compiled_marker = (marker, self.path)  # this process compiles the step's kernels
        self._tokens: list[int] = []  # what the cache holds, position by position
        # The last token of a generation that max_tokens ended: in the context but not yet in
        # the cache (evaluating it would cost a step whose logits nobody reads); eval runs it first.
        self._pending: list[int] = []
        self.finish_reason: str | None = None  # of the last generate/chat: "stop", "eos", "length", "n_ctx"
        self.timings = Timings()

    @property
    def template(self) -> "ChatTemplate":
        """The file's chat template (ChatML if it has none), compiled on first use: jinja2's
        import and first compile are ~0.1 s of a load that generate does not need.
        FormatError if it does not compile (`cpuq chat` asks for it right after loading)."""
        if self._template is None:
            from .template import ChatTemplate
            tok = self.tokenizer
            self._template = ChatTemplate(self._template_source,
                                          bos_token=tok.token_text(tok.bos_id) if tok.bos_id is not None else "",
                                          eos_token=tok.token_text(tok.eos_id) if tok.eos_id is not None else "")
        return self._template

    def _offload(self, gpu_layers: int):
        """The GPU part for gpu_layers, or None with a warning (one line: why) when there is
        no usable GPU, in which case everything runs on the CPU."""
        from .gpu import GpuOffload, find_gpu  # imports cupy only now
        cp, why = find_gpu()
        if cp is not None:
            try:
                gpu = GpuOffload(self.weights, self.config, self._rope, gpu_layers, self.kv_type,
                                 cpu_moe=self._cpu_moe)
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

    def _new_cache(self, n_ctx: int) -> KVCache:
        """The CPU KV cache for n_ctx positions: mapped lazily, so it costs memory as it
        fills; InputError if even its whole could never fit (RAM + swap) or the system
        refuses the mapping, since the failure would otherwise come mid-generation."""
        cfg = self.config
        # a DeltaNet block's pages of the cache stay untouched
        per_token = cfg.kv_bytes_per_token(np.dtype(KVCache.TYPES[self.kv_type]).itemsize)
        memory = memory_bytes()
        advice = f"load with a smaller n_ctx (at most {memory // per_token} here)" if memory else "use a smaller n_ctx"
        if memory is not None and n_ctx * per_token > memory:
            raise InputError(f"n_ctx={n_ctx}: its KV cache would take {human_bytes(n_ctx * per_token)} "
                             f"({per_token} bytes per token), more than this machine's {human_bytes(memory)} of "
                             f"memory; {advice}")
        try:
            return KVCache(cfg, n_ctx, self.kv_type)
        except (OSError, MemoryError, OverflowError, ValueError) as e:
            raise InputError(f"n_ctx={n_ctx}: cannot map its KV cache of {human_bytes(n_ctx * per_token)} "
                             f"({type(e).__name__}: {e}); {advice}") from None

    def _gpu_cache(self, n_ctx: int):
        """The offloaded blocks' KV cache (allocated whole on the GPU), or None."""
        if self._gpu is None:
            return None
        try:
            return self._gpu.new_cache(n_ctx)
        except self._gpu.cp.cuda.memory.OutOfMemoryError as e:
            raise InputError(f"n_ctx={n_ctx}: the GPU part of the KV cache does not fit in GPU memory ({e}); "
                             f"use a smaller n_ctx or fewer gpu_layers") from None

    # tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, special: bool = False) -> list[int]:
        """Token ids of `text` (BOS added if the file asks for it). special=True parses
        control-token text such as <|im_start|> as those tokens; plain text never does.
        bytes are taken as UTF-8; InputError for invalid UTF-8 or a str with lone
        surrogates (runtime.tokenizer.utf8_text)."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        if isinstance(ids, (str, bytes, bytearray)):
            raise InputError(f"expected token ids, got {type(ids).__name__} (tokenize text first)")
        try:
            arr = np.asarray(list(ids))
        except TypeError:
            raise InputError(f"token ids must be a sequence of integers, not {type(ids).__name__}") from None
        if arr.size == 0:
            raise InputError("no token ids: the sequence is empty")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":  # floats, bools, nested lists, ints past int64
            raise InputError(f"token ids must be a flat sequence of integers, got {arr.dtype} values "
                             f"of shape {arr.shape}")
        arr = arr.astype(np.int64)
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
        if arr.size > self.n_ctx:
            raise InputError(f"{arr.size} token ids do not fit in the context of {self.n_ctx} "
                             f"(load with a larger n_ctx)")
        if not _is_int(first) or not 0 <= first < arr.size:
            raise InputError(f"first must be a position in 0..{arr.size - 1}, not {first!r}")
        first = int(first)
        if observe is not None and self._gpu is not None:
            raise InputError("observe needs the whole model on the CPU (load with gpu_layers=0)")
        with self._using("logits", side=True):
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
        keep = self._cache.rewind(keep)  # a hybrid's recurrent state: back to a snapshot
        del self._tokens[keep:]
        self._pending = []
        start = time.perf_counter()
        self.timings = Timings(prompt_tokens=len(ids) - keep)
        if self._cache.recurrent and len(ids) - 1 > keep:
            # the state before the prompt's last token, where the next turn (or the same
            # prompt again) comes back to: templates drop a reply's thinking from the history
            self._append(arr[keep:-1])
            self._cache.snapshot()
            keep = len(ids) - 1
        logits = self._append(arr[keep:])
        self.timings.prompt_seconds = time.perf_counter() - start
        return logits

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Evaluate `ids` after the tokens the context already holds (nothing is re-evaluated
        or reused, as llama.cpp's llama_decode) and return float32 (n_vocab,): the logits
        after the last one. InputError if they do not fit in n_ctx; `reset()` empties the
        context. The same forward pass generate/chat run; `cpuq bench` times it. After a
        generation that max_tokens ended, the context holds its last token unevaluated (a step
        whose logits nobody would read), and eval runs it first."""
        arr = self._check_ids(ids)
        with self._using("eval"):
            held = len(self._tokens) + len(self._pending)
            if held + arr.size > self.n_ctx:
                raise InputError(f"{arr.size} more tokens do not fit: the context holds {held} of "
                                 f"{self.n_ctx} (reset(), or load with a larger n_ctx)")
            arr = np.concatenate([np.array(self._pending, np.int64), arr])
            self._cache.rewind(len(self._tokens))  # as _ingest: the token list is the truth
            self._pending = []
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
        with self._using("reset"):
            self._cache.clear()
            self._tokens = []
            self._pending = []

    # generation -------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream the continuation of `prompt` (text, tokenized with special tokens parsed;
        bytes, taken as UTF-8; or token ids) as text pieces. Stops at EOS (unless
        ignore_eos), a stop string (not included in the output), max_tokens (None or -1:
        no limit), or a full context; `finish_reason` says which ("eos", "stop", "length",
        "n_ctx"). An empty text prompt starts from the BOS token (as llama-cpp-python and
        transformers do; llama.cpp adds it only where the model adds BOS), or is an
        InputError when the vocabulary has none; empty token ids are an InputError.
        Prompt errors (too long, invalid UTF-8, bad ids) raise here, not when iterating."""
        if isinstance(prompt, (str, bytes, bytearray, memoryview)):
            ids = self.tokenizer.encode(utf8_text(prompt, "prompt"), special=True)
            if not ids:
                if self.tokenizer.bos_id is None:
                    raise InputError(f"the prompt is empty and {self.path.name} has no BOS token to start from "
                                     f"(give some text)")
                ids = [self.tokenizer.bos_id]
        else:
            ids = self._check_ids(prompt).tolist()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        return self._stream("generate", ids, params, max_tokens, stop, ignore_eos)

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]),
        rendered with the file's chat template (ChatML if it has none). The KV cache is
        reused across turns: only the new part of the conversation is evaluated. An empty
        list is an InputError; an empty content is a message like any other."""
        if isinstance(messages, Iterator):
            messages = list(messages)  # a generator of messages; the template checks the rest
        if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
            for i, message in enumerate(messages):
                if isinstance(message, Mapping):  # name the message, not a place in the rendered text
                    for key, value in message.items():
                        if isinstance(value, str):
                            utf8_text(value, f"messages[{i}][{key!r}]")
        text = self.template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, special=True)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        return self._stream("chat", ids, params, max_tokens, stop, ignore_eos)

    def _stream(self, what: str, ids: list[int], params: SamplingParams, max_tokens: int | None,
                stop: Sequence[str], ignore_eos: bool) -> Iterator[str]:
        if max_tokens is None or (_is_int(max_tokens) and max_tokens == -1):
            max_tokens = None  # llama.cpp's -n -1: until EOS, a stop string or a full context
        elif not _is_int(max_tokens) or max_tokens < 0:
            raise InputError(f"max_tokens must be an integer >= 0, or -1 / None for no limit (until the "
                             f"context is full), not {max_tokens!r}")
        if isinstance(stop, str):
            stop = (stop,)  # a lone string is one stop string, not one per character
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise InputError("stop strings must be non-empty strings")
        sampler = Sampler(params)
        call = self._begin(what)
        try:
            self.finish_reason = None
            logits = self._ingest(ids)  # errors (too long, bad ids) surface here, before iteration
        except BaseException:
            self._end(call)
            raise
        with self._guard:
            call.running = False
        return Stream(self, call, self._decode_loop(logits, sampler, max_tokens, stop, ignore_eos))

    def _decode_loop(self, logits, sampler, max_tokens, stop, ignore_eos) -> Iterator[str]:
        eos = set() if ignore_eos else self.tokenizer.eos_ids
        decoder = self.tokenizer.stream_decoder()
        held = ""  # text not yet yielded because it may be the start of a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        self.finish_reason = "length"
        start = time.perf_counter()
        for i in (range(max_tokens) if max_tokens is not None else itertools.count()):
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
            if max_tokens is not None and i == max_tokens - 1:
                self._pending = [token]  # the context's, evaluated only if eval continues it
                break
            logits = self._step(token)
            self.timings.generate_seconds = time.perf_counter() - start
        held += decoder.flush()  # a character cut off at the end: U+FFFD, which a stop string may hold
        hit = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            held = held[:hit]
            self.finish_reason = "stop"
        if held:
            yield held

    def _step(self, token: int) -> np.ndarray:
        return self._append(np.array([token], np.int64))

    def _forward(self, tokens: np.ndarray, cache: KVCache, logits_from: int,
                 observe: Observer | None = None) -> np.ndarray:
        with self._turns, sigint_deferred():  # Ctrl-C stops after this chunk or token
            return self._paths.run(tokens, cache, logits_from, observe)

    def close(self) -> None:
        """Release the file mapping, the workers and the GPU memory. InputError if another
        thread is using the Model (its forward pass reads the mapping)."""
        with self._using("close"):
            if hasattr(self, "_gemm"):
                self._gemm.close()
            if getattr(self, "_paths", None) is not None and self._paths.step_compiler is not None:
                self._paths.step_compiler.stop()
            self._gpu = None  # the GPU memory goes back to CuPy's pool
            if getattr(self, "_paths", None) is not None:
                self._paths.gpu = None
            if hasattr(self, "_cache"):
                self._cache.gpu = None
            self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None, gpu_layers: int = 0,
         kv_type: str = "f16", cpu_moe: bool = False) -> Model:
    """Load a GGUF model (qwen2, qwen3, llama, qwen2moe or qwen3moe; F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/
    Q5_K/Q6_K tensors). Weights stay memory-mapped; nothing is dequantized up front.
    n_ctx: context length in tokens (default 4096, or the model's trained context if
    smaller); n_threads: default the number of physical cores; kv_type: the KV cache's
    element type, "f16" (default, as llama.cpp's) or "f32" (twice the memory, no rounding
    of keys and values); gpu_layers: run the last N transformer blocks on a CUDA GPU through
    CuPy (-1: all of them and the output matrix; needs the `gpu` extra), else (no CuPy or
    no GPU) a GpuFallbackWarning and the CPU; cpu_moe: an MoE's experts stay in RAM and
    run on the CPU, the rest of the offloaded blocks on the GPU (llama.cpp's --cpu-moe)."""
    return Model(path, n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, kv_type=kv_type, cpu_moe=cpu_moe)
