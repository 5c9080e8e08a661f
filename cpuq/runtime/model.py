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
import signal
import threading
import time
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numba
import numpy as np

from ..arch import ModelConfig
from ..errors import InputError, UnsupportedError
from ..gguf_io import open_gguf
from .forward import KVCache, Observer, Rope, StepPack, forward
from .gemm import Gemm
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer, utf8_text
from .warmup import StepCompiler
from .weights import load_weights

if TYPE_CHECKING:
    from .template import ChatTemplate

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


def memory_bytes() -> int | None:
    """RAM plus swap (/proc/meminfo), else RAM (sysconf), else None: what a KV cache
    could ever be given."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.split()}
        return info["MemTotal"] + info.get("SwapTotal", 0)
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def human_bytes(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB' (the CLI prints its sizes with this too)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


_ONE_AT_A_TIME = threading.Lock()  # every Model's forward passes, under Numba's workqueue layer
_layer_is_threadsafe: bool | None = None


def _threadsafe_layer() -> bool:
    """Whether Numba's threading layer runs parallel regions launched from several threads
    at once (tbb, omp) rather than aborting the process (workqueue, Numba's fallback where
    neither TBB nor OpenMP is found)."""
    global _layer_is_threadsafe
    if _layer_is_threadsafe is None:
        try:
            from numba.np.ufunc import parallel
            parallel._launch_threads()  # picks the layer, as the first parallel region would
            _layer_is_threadsafe = numba.threading_layer() != "workqueue"
        except Exception:  # noqa: BLE001  (an internal of Numba's moved: assume the worst)
            _layer_is_threadsafe = False
    return _layer_is_threadsafe


@contextmanager
def _sigint_deferred():
    """Ctrl-C held until the block ends, then raised as KeyboardInterrupt. Raised inside
    Numba's dispatcher instead (the main thread loads and compiles kernels too: its share
    of a prompt chunk, one-token steps), it can leave Numba's compiler lock taken; the next
    kernel a worker thread loads then waits forever (a chat hung after Ctrl-C in a long
    prompt). Only in the main thread, where Python runs signal handlers, and only over
    Python's own handler (an application's handler is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    hit = []
    signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hit:
        raise KeyboardInterrupt


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


class GpuFallbackWarning(UserWarning):
    """gpu_layers was asked for but the model runs on the CPU (no CuPy, no CUDA device, a
    tensor type the GPU kernels lack, or too little GPU memory); the message says which."""


class Model:
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
                 gpu_layers: int = 0, kv_type: str = "f16"):
        if not isinstance(gpu_layers, int) or isinstance(gpu_layers, bool) or gpu_layers < -1:
            raise InputError(f"gpu_layers must be -1 (all) or a number of layers >= 0, not {gpu_layers!r}")
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
        self._guard = threading.Lock()  # guards _call; never held while the model computes
        self._call: _Call | None = None  # the call that holds the model (see _begin)
        self.path = Path(path)
        self._file = open_gguf(self.path)
        try:
            self.config = ModelConfig.from_gguf(self._file)
            self.weights = load_weights(self._file, self.config)
            self._steps = StepPack.build(self.weights, self._file.mapped)
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
            self._turns = nullcontext() if _threadsafe_layer() else _ONE_AT_A_TIME
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
        self._step_compiler = None if self._gpu is not None else StepCompiler.start(self.path, self.weights, kv_type,
                                                                                    self._steps is not None)
        if self._step_compiler is not None:
            weakref.finalize(self, self._step_compiler.stop)
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

    def _new_cache(self, n_ctx: int) -> KVCache:
        """The CPU KV cache for n_ctx positions: mapped lazily, so it costs memory as it
        fills; InputError if even its whole could never fit (RAM + swap) or the system
        refuses the mapping, since the failure would otherwise come mid-generation."""
        cfg = self.config
        per_token = 2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * np.dtype(KVCache.TYPES[self.kv_type]).itemsize
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
        self._cache.n_past = keep
        del self._tokens[keep:]
        self._pending = []
        start = time.perf_counter()
        self.timings = Timings(prompt_tokens=len(ids) - keep)
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
            self._cache.n_past = len(self._tokens)  # as _ingest: the token list is the truth
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

    # one call at a time -------------------------------------------------------------------
    def _begin(self, what: str) -> "_Call":
        """Take the model for a call, or raise InputError if it is taken: by a call running
        now (in any thread: reentry from a callback too), or by another thread's unfinished
        stream. A stream this thread left unfinished is ended (superseded) instead."""
        me = threading.get_ident()
        with self._guard:
            held = self._call
            if held is not None and (held.running or held.thread != me):
                if held.thread == me:
                    raise InputError(f"{self.path.name}: {what}() called while {held.what}() is running in the "
                                     f"same thread (a Model is not reentrant)")
                state = "is running" if held.running else "has an unfinished stream, not yet exhausted or closed"
                raise InputError(f"{self.path.name}: this Model is in use by another thread ({held.what}() "
                                 f"{state}); a Model holds one KV cache and runs one call at a time: use one "
                                 f"Model per thread, or serialize the calls")
            self._call = call = _Call(what, me)
        return call

    def _end(self, call: "_Call") -> None:
        with self._guard:
            call.running = False
            if self._call is call:
                self._call = None

    @contextmanager
    def _using(self, what: str, side: bool = False):
        """Hold the model for a call. side: a call that leaves the conversation alone
        (logits, in a fresh context of its own), which in the thread of a suspended stream
        runs without ending it, the stream marked running meanwhile."""
        me = threading.get_ident()
        with self._guard:
            held = self._call
            borrowed = side and held is not None and not held.running and held.thread == me
            if borrowed:
                held.running = True
        if borrowed:
            try:
                yield
            finally:
                with self._guard:
                    held.running = False
            return
        call = self._begin(what)
        try:
            yield
        finally:
            self._end(call)

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
        return _Stream(self, call, self._decode_loop(logits, sampler, max_tokens, stop, ignore_eos))

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
        # token by token (gemm.STEP_TOKENS_INT8; measured on the CPU, so not with GPU offload)
        if 1 < tokens.size < self._gemm.step_tokens and observe is None and self._gpu is None:
            return np.concatenate([self._forward(tokens[i:i + 1], cache, 0 if i >= logits_from else 1)
                                   for i in range(tokens.size)])
        if tokens.size == 1 and self._step_compiler is not None:  # its kernels from the cache, not compiled again
            self._step_compiler.wait()
            self._step_compiler = None
        if tokens.size < self._gemm.min_tokens:
            with self._turns, _sigint_deferred():
                return forward(self.weights, self.config, self._rope, tokens, cache, logits_from, observe=observe,
                               gpu=self._gpu, steps=self._steps)
        with self._turns, self._gemm.session(), _sigint_deferred():  # Ctrl-C stops after this chunk
            return forward(self.weights, self.config, self._rope, tokens, cache, logits_from, self._gemm, observe,
                           self._gpu)

    def close(self) -> None:
        """Release the file mapping, the workers and the GPU memory. InputError if another
        thread is using the Model (its forward pass reads the mapping)."""
        with self._using("close"):
            if hasattr(self, "_gemm"):
                self._gemm.close()
            if getattr(self, "_step_compiler", None) is not None:
                self._step_compiler.stop()
            self._gpu = None  # the GPU memory goes back to CuPy's pool
            if hasattr(self, "_cache"):
                self._cache.gpu = None
            self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Call:
    """One call that holds a Model: its name, the thread that last ran it, and whether it
    is running now (a generate/chat stream between two pieces is not)."""
    __slots__ = ("what", "thread", "running")

    def __init__(self, what: str, thread: int):
        self.what, self.thread, self.running = what, thread, True


class _Stream:
    """The iterator generate() and chat() return: the decode loop, holding the Model from
    the call until it is exhausted, closed or garbage-collected. A class, not a generator,
    so that one dropped before its first piece still lets the Model go."""

    def __init__(self, model: Model, call: _Call, pieces: Iterator[str]):
        self._model, self._call, self._pieces = model, call, pieces
        self._done = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        model, call = self._model, self._call
        with model._guard:
            if model._call is not call:
                self._done = True
                raise InputError(f"this {call.what}() stream was ended by a later call on the same Model "
                                 f"(a Model holds one conversation); start a new one")
            if call.running:  # another thread is inside this stream's __next__
                raise InputError(f"this {call.what}() stream is being read by another thread")
            call.running, call.thread = True, threading.get_ident()
        try:
            piece = next(self._pieces)
        except BaseException:  # StopIteration, an error, Ctrl-C: the stream is over
            with model._guard:
                call.running = False
            self.close()
            raise
        with model._guard:
            call.running = False
        return piece

    def close(self) -> None:
        """End the stream early; the Model is free again. InputError while another thread
        is reading it."""
        with self._model._guard:
            if self._done:
                return
            if self._call.running:
                raise InputError(f"this {self._call.what}() stream is being read by another thread")
            self._done = True
        self._pieces.close()
        self._model._end(self._call)

    def __del__(self) -> None:
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
