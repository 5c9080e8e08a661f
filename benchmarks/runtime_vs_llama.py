"""Runtime speed and memory, cpuq next to llama.cpp, on GGUF files written by llama.cpp.

    .venv/bin/python benchmarks/runtime_vs_llama.py [--models qwen2.5-0.5b,qwen3-0.6b] [--types q4_k_m,q8_0]
        [--depths 128,1024,4096] [--prompt 512] [--gen 32] [--repeat 3] [--threads 2] [--flash-attn]
        [--out benchmarks/results] [--skip-build]
    .venv/bin/python benchmarks/runtime_vs_llama.py --files qwen3-30b-a3b-12l=PATH.gguf [--depths 128] ...

Inputs (benchmarks/peer_inputs.py, built once into $CPUQ_BENCH_HOME, default ~/.cache/cpuq-bench):
checkpoints with the exact shapes of Qwen2.5-0.5B and Qwen3-0.6B (random N(0, 0.02) bf16
weights, the real Qwen2 tokenizer; tools/make_tiny_checkpoint.py), converted by llama.cpp
(`convert_hf_to_gguf.py --outtype f16`, then llama-quantize to Q4_K_M and Q8_0). Type
`cpuq-q4_k_m` adds `cpuq convert`'s own Q4_K_M file; whenever Q4_K_M is benchmarked, cpuq's
file is written too and compared byte for byte with llama.cpp's.

llama.cpp is llama-cpp-python from the peer venv (tools/peer_env.sh) with its defaults
except n_ctx, n_batch = n_ubatch = 512 (cpuq's prompt chunk), the thread count (n_threads
and n_threads_batch) and --flash-attn (default off, llama-cpp-python's default). Both
runtimes get the same token ids: seeded random ordinary Qwen2 tokens (no control tokens).

Per file, one long-lived worker process per runtime (this script with --worker) loads the
model once with n_ctx = max(prompt, depths) + gen + 8 and answers timed requests; after
one warm-up request (Numba's kernel cache, page faults, llama.cpp's weight repacking) the
parent alternates the two workers test by test, and swaps which one goes first on every
repetition. The tests, llama-bench's names:
  pp512           reset, then evaluate --prompt tokens in one call: prefill tok/s
  tg32 @ d1024    make the context hold exactly the first 1024 prompt ids (only what it lacks
                  is evaluated, as a chat turn does; not timed), then --gen single-token steps,
                  each feeding back the argmax of the previous logits: decode tok/s at that depth
With --files, those GGUF files (llama.cpp-written, e.g. llama-quantize's Q4_K_M of a
Qwen3-30B-A3B-shaped checkpoint from tools/make_wide_checkpoint.py; docs/performance.md)
are benchmarked instead of the shapes, and decode is also reported as the bytes a token
reads (every tensor of the blocks and the output matrix, of an expert stack only the
used / count share: the experts a token runs) times tok/s, in GB/s.
Reported: mean ± sample standard deviation over --repeat repetitions, and cpuq / llama.cpp.
Peak RSS is each worker's ru_maxrss (os.wait4) over its whole run, i.e. while generating
at the deepest context. Time to first token: a fresh process per run (Numba's cache and
the page cache warm) that imports the runtime, loads the file with n_ctx 4096, evaluates a
32-token prompt and samples one token greedily (cpuq: `Model.generate`; llama.cpp:
`Llama.generate`), timed from just before the parent spawns it; its ru_maxrss is reported too.
Children run with Python's default bytecode caching (PYTHONDONTWRITEBYTECODE removed), so
the workers leave compiled modules for the time-to-first-token processes.

Writes OUT/runtime_vs_llama.md (also printed), .json (every sample) and .png (decode
tok/s against context depth, one line per model/type and runtime; needs the `bench`
extra, matplotlib). The parent process imports only the standard library until the last
measurement (a child's ru_maxrss starts from its parent's RSS). Linux only (/proc, wait4).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer_inputs import (BENCH_HOME, PEER_PYTHON, ROOT, SHAPES, check_peer, ensure_cpuq_gguf, ensure_llama_gguf,
                         probe)

MIB = 1024 * 1024
N_BATCH = 512  # llama.cpp's n_batch and n_ubatch; cpuq evaluates prompts in chunks of 512 (runtime.model.N_BATCH)
TTFT_N_CTX = 4096
TTFT_PROMPT = 32
WARMUP_STEPS = 4
# --types name -> (what writes the file, label)
TYPES = {"q4_k_m": ("llama", "Q4_K_M"), "q8_0": ("llama", "Q8_0"), "cpuq-q4_k_m": ("cpuq", "Q4_K_M (cpuq convert)")}
RUNTIMES = ("cpuq", "llama.cpp")


# the worker: runs in .venv (cpuq) or in the peer venv (llama.cpp) ---------------------

class CpuqRuntime:
    """cpuq through the calls its generate/chat make: _ingest (evaluate what the KV cache lacks
    of a prompt) and _step (one generated token)."""

    def __init__(self, path: str, n_ctx: int, threads: int, flash_attn: bool):
        import cpuq
        self.m = cpuq.load(path, n_ctx=n_ctx, n_threads=threads)

    def reset(self) -> None:
        self.m.reset()

    def fill(self, ids: list[int]):
        return self.m._ingest(ids)

    def step(self, token: int):
        return self.m._step(token)


class LlamaRuntime:
    """llama-cpp-python's Llama.eval, with the same prefix reuse as cpuq's _ingest. The
    logits come from llama_get_logits_ith: Llama.scores is only filled with logits_all=True
    (and has n_batch rows, so indexing it at n_tokens - 1 fails past 512 tokens)."""

    def __init__(self, path: str, n_ctx: int, threads: int, flash_attn: bool):
        import llama_cpp
        import numpy as np
        self._llama_cpp, self._np = llama_cpp, np
        self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _logits(self):
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def reset(self) -> None:
        self.llm.reset()

    def fill(self, ids: list[int]):
        held = self.llm.input_ids[:self.llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # the last id is always evaluated, for its logits
        if keep < self.llm.n_tokens:  # a recurrent state cannot drop cells (llama_decode fails): start over
            self.llm.reset()
            keep = 0
        self.llm.n_tokens = keep  # Llama.eval first removes cache cells from n_tokens on
        self.llm.eval(ids[keep:])
        return self._logits()

    def step(self, token: int):
        self.llm.eval([token])
        return self._logits()


def worker(runtime: str, path: str, n_ctx: int, threads: int, flash_attn: bool) -> None:
    """Answer JSON requests on stdin with JSON lines. Requests: {"ids": [...]} first, then
    {"op": "warmup"|"prefill"|"decode", "n": tokens, "depth": ...}."""
    import numpy as np
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the native libraries print goes to the log, not into the replies

    def send(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    ids = json.loads(sys.stdin.readline())["ids"]
    t = time.perf_counter()
    rt = (CpuqRuntime if runtime == "cpuq" else LlamaRuntime)(path, n_ctx, threads, flash_attn)
    send({"load_s": time.perf_counter() - t})
    for line in sys.stdin:
        req = json.loads(line)
        op, n = req["op"], req["n"]
        if op in ("warmup", "prefill"):
            rt.reset()
            t = time.perf_counter()
            logits = rt.fill(ids[:n])
            seconds = time.perf_counter() - t
            if op == "warmup":
                tok = int(np.argmax(logits))
                for _ in range(WARMUP_STEPS):
                    tok = int(np.argmax(rt.step(tok)))
                rt.reset()
            send({"seconds": seconds})
        elif op == "decode":
            t = time.perf_counter()
            logits = rt.fill(ids[:req["depth"]])
            fill_s = time.perf_counter() - t
            tok = int(np.argmax(logits))
            t = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(rt.step(tok)))
            send({"seconds": time.perf_counter() - t, "fill_s": fill_s})
        else:
            raise ValueError(f"unknown request {req!r}")


# time to first token: a fresh process each ------------------------------------------

_TTFT = {
    "cpuq": """\
import json, sys, time
path, ids, n_ctx, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import cpuq
t_import = time.time()
m = cpuq.load(path, n_ctx=n_ctx, n_threads=threads)
t_load = time.time()
text = "".join(m.generate(ids, max_tokens=1, temperature=0, ignore_eos=True))
print(json.dumps({"import": t_import, "load": t_load, "token": time.time()}))
""",
    "llama.cpp": """\
import json, sys, time
path, ids, n_ctx, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fa = sys.argv[5] == "1"
import llama_cpp
t_import = time.time()
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                      flash_attn=fa, verbose=False)
t_load = time.time()
text = llm.detokenize([next(llm.generate(ids, temp=0.0))])
print(json.dumps({"import": t_import, "load": t_load, "token": time.time()}))
""",
}


def _wait(proc: subprocess.Popen) -> float:
    """Reap `proc`; its own ru_maxrss in MiB. Raises if it failed."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}")
    return usage.ru_maxrss / 1024


def ttft(runtime: str, path: Path, ids: list[int], threads: int, flash_attn: bool, log: Path) -> dict:
    python = sys.executable if runtime == "cpuq" else str(PEER_PYTHON)
    cmd = [python, "-c", _TTFT[runtime], str(path), json.dumps(ids), str(TTFT_N_CTX), str(threads),
           "1" if flash_attn else "0"]
    with open(log, "ab") as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=_env(runtime, threads))
        out = proc.stdout.read()
        proc.stdout.close()
        try:
            rss = _wait(proc)
        except RuntimeError as e:
            raise SystemExit(f"{runtime} time-to-first-token run failed ({e}); end of {log}:\n{_tail(log)}")
    t = json.loads(out.decode().strip().splitlines()[-1])
    return {"ttft_s": t["token"] - t0, "start_import_s": t["import"] - t0, "load_s": t["load"] - t["import"],
            "prompt_s": t["token"] - t["load"], "peak_rss_mib": rss}


# the parent ---------------------------------------------------------------------

def _env(runtime: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # Python's default: modules' bytecode cached on first import, as on a user's machine
    # (pip compiles an installed package's). With PYTHONDONTWRITEBYTECODE set (this
    # sandbox sets it), every time-to-first-token process compiled cpuq's ~30 modules
    # from source (~0.1 s; an editable install) while llama_cpp's came compiled.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if runtime == "cpuq":
        env["NUMBA_NUM_THREADS"] = str(threads)
    return env


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


class Worker:
    """A --worker child of one runtime, with its model loaded."""

    def __init__(self, runtime: str, path: Path, n_ctx: int, threads: int, flash_attn: bool, ids: list[int],
                 log: Path):
        python = sys.executable if runtime == "cpuq" else str(PEER_PYTHON)
        self.runtime, self.log = runtime, log
        self.cmd = [python, str(Path(__file__).resolve()), "--worker", runtime, str(path), str(n_ctx), str(threads),
                    "1" if flash_attn else "0"]
        self._err = open(log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env=_env(runtime, threads), text=True)
        self.load_s = self._call({"ids": ids})["load_s"]

    def _call(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"{self.runtime} worker died (exit {self.proc.returncode}); end of {self.log}:\n"
                             f"{_tail(self.log)}")
        return json.loads(line)

    def warmup(self, n: int) -> float:
        return self._call({"op": "warmup", "n": n})["seconds"]

    def prefill(self, n: int) -> float:
        return self._call({"op": "prefill", "n": n})["seconds"]

    def decode(self, depth: int, n: int) -> dict:
        return self._call({"op": "decode", "n": n, "depth": depth})

    def close(self) -> float:
        """Stop the worker; its peak RSS in MiB."""
        self.proc.stdin.close()
        try:
            rss = _wait(self.proc)
        except RuntimeError as e:
            raise SystemExit(f"{self.runtime} worker failed ({e}); end of {self.log}:\n{_tail(self.log)}")
        self.proc.stdout.close()
        self._err.close()
        return rss


@dataclass
class Result:
    """Everything measured for one file and one runtime."""
    load_s: float = 0.0
    warmup_s: float = 0.0
    prefill_s: list[float] = field(default_factory=list)
    decode_s: dict[int, list[float]] = field(default_factory=dict)  # depth -> seconds of --gen steps
    fill_s: dict[int, list[float]] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    ttft: list[dict] = field(default_factory=list)


def stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def benchmark_file(path: Path, ids: list[int], args, log_dir: Path, tag: str) -> dict[str, Result]:
    n_ctx = max([args.prompt, *args.depths]) + args.gen + 8
    results = {rt: Result() for rt in RUNTIMES}
    workers = {}
    for rt in RUNTIMES:
        log = log_dir / f"{tag}.{rt}.log"
        log.unlink(missing_ok=True)
        workers[rt] = Worker(rt, path, n_ctx, args.threads, args.flash_attn, ids, log)
        results[rt].load_s = workers[rt].load_s
        results[rt].warmup_s = workers[rt].warmup(args.prompt)
    for rep in range(args.repeat):
        order = RUNTIMES if rep % 2 == 0 else RUNTIMES[::-1]
        for rt in order:
            results[rt].prefill_s.append(workers[rt].prefill(args.prompt))
        for depth in args.depths:
            for rt in order:
                r = workers[rt].decode(depth, args.gen)
                results[rt].decode_s.setdefault(depth, []).append(r["seconds"])
                results[rt].fill_s.setdefault(depth, []).append(r["fill_s"])
        line = "; ".join(f"{rt} pp{args.prompt} {args.prompt / results[rt].prefill_s[-1]:.1f}, tg " + ", ".join(
            f"{args.gen / results[rt].decode_s[d][-1]:.1f}" for d in args.depths) for rt in RUNTIMES)
        print(f"  {tag} repetition {rep + 1}/{args.repeat}: {line} tok/s", file=sys.stderr, flush=True)
    for rt in RUNTIMES:
        results[rt].peak_rss_mib = workers[rt].close()
    for rep in range(args.repeat):
        for rt in (RUNTIMES if rep % 2 == 0 else RUNTIMES[::-1]):
            results[rt].ttft.append(ttft(rt, path, ids[:TTFT_PROMPT], args.threads, args.flash_attn,
                                         log_dir / f"{tag}.{rt}.log"))
    print(f"  {tag} time to first token: " + ", ".join(
        f"{rt} {stats([t['ttft_s'] for t in results[rt].ttft])[0]:.2f} s" for rt in RUNTIMES), file=sys.stderr)
    return results


# context ------------------------------------------------------------------------

READ_BANDWIDTH = r"""
import sys, time
import numpy as np
from numba import njit, prange

@njit(parallel=True)
def total(a):
    s = 0
    for i in prange(a.shape[0]):
        s += a[i]
    return s

a = np.ones(int(sys.argv[1]) // 8, np.int64)
total(a[:4096])
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    total(a)
    best = min(best, time.perf_counter() - t)
print(a.nbytes / best / 1e9)
"""


def read_bandwidth(threads: int, nbytes: int = 2 << 30) -> float:
    """GB/s of `threads` threads summing a 2 GiB array (larger than any last-level cache),
    best of 5: what the machine's memory delivers to a plain read, decode's ceiling."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", READ_BANDWIDTH, str(nbytes)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def machine() -> dict[str, str]:
    model, cores = "?", set()
    phys = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "physical id":
                phys = value
            elif key == "core id":
                cores.add((phys, value))
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {"cpu": model, "cores": f"{len(cores) or '?'} physical cores, {os.cpu_count()} logical CPUs",
            "memory": mem, "os": f"Linux {platform.release()} {platform.machine()}"}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"
    dirty = git("status", "--porcelain", "--", "cpuq")
    return {
        "cpuq": f"{version('cpuq')}, git {git('rev-parse', '--short', 'HEAD')}"
                + (" + uncommitted changes in cpuq/" if dirty else ""),
        "numba": version("numba"), "numpy": version("numpy"), "python": platform.python_version(),
        "llama-cpp-python": probe(PEER_PYTHON, "import importlib.metadata as m; print(m.version('llama-cpp-python'))"),
        "llama.cpp system info": probe(PEER_PYTHON, "import llama_cpp; print(llama_cpp.llama_print_system_info()"
                                                    ".decode().strip())"),
    }


# report -------------------------------------------------------------------------

def _cell(values: list[float]) -> str:
    mean, std = stats(values)
    return f"{mean:,.1f} ± {std:,.1f}" if mean < 100 else f"{mean:,.0f} ± {std:,.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


_TOKEN_BYTES = """
import json, sys, cpuq
with cpuq.open_gguf(sys.argv[1]) as f:
    arch = f.get("general.architecture")
    n_expert, n_used = f.get(arch + ".expert_count") or 0, f.get(arch + ".expert_used_count") or 0
    total = types = 0
    for t in f:
        if t.name == "token_embd.weight" and "output.weight" in f.tensors:
            continue  # one row per token is read from it
        share = n_used / n_expert if "_exps." in t.name else 1.0
        total += t.n_bytes * share
    print(json.dumps({"bytes": total, "types": sorted({t.qtype.name for t in f})}))
"""


def _file_facts(path: Path) -> dict:
    """Computed in a child: this process imports only the standard library (see the docstring)."""
    r = subprocess.run([sys.executable, "-c", _TOKEN_BYTES, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def token_bytes(path: Path) -> float:
    """Bytes one decoded token reads from the file: every block tensor and the output matrix,
    of an expert stack the used / count share."""
    return _file_facts(path)["bytes"]


def _file_types(path: Path) -> str:
    return ", ".join(_file_facts(path)["types"])


def report(rows: list[dict], args, info: dict, identical: dict[str, bool], floor_mib: float) -> str:
    p, g = args.prompt, args.gen
    tests = [(f"pp{p}", None)] + [(f"tg{g} @ d{d}", d) for d in args.depths]

    def rates(res: Result, depth: int | None) -> list[float]:
        return [p / s for s in res.prefill_s] if depth is None else [g / s for s in res.decode_s[depth]]

    out = [f"# cpuq vs llama.cpp: prompt and generation speed, time to first token, memory\n",
           f"- date: {info['date']}",
           f"- machine: {info['machine']['cpu']}, {info['machine']['cores']}, {info['machine']['memory']}, "
           f"{info['machine']['os']}; niceness {info['niceness']}, load average (1 min) {info['load_start']:.2f} "
           f"at the start, {info['load_end']:.2f} at the end (other work on the machine skews every number)",
           f"- threads: {args.threads} for both (cpuq n_threads and NUMBA_NUM_THREADS; llama.cpp n_threads and "
           f"n_threads_batch); llama.cpp n_batch = n_ubatch = {N_BATCH}, flash attention "
           f"{'on' if args.flash_attn else 'off'}, KV cache f16; cpuq KV cache f16 (its default)",
           f"- tests: pp{p} = {p} prompt tokens in one call from an empty context; tg{g} @ dN = {g} greedy "
           f"single-token steps after N prompt tokens; mean ± sample std of tok/s over {args.repeat} "
           f"repetition{'s' * (args.repeat != 1)}, the runtimes alternated test by test, after one warm-up",
           f"- time to first token: fresh process, import + load (n_ctx {TTFT_N_CTX}) + {TTFT_PROMPT}-token prompt "
           f"+ one greedy token, page cache and Numba cache warm; peak RSS: ru_maxrss of the benchmark worker "
           f"(n_ctx {max([p, *args.depths]) + g + 8}, up to depth {max(args.depths)} + {g}) and of the "
           f"time-to-first-token process (a /bin/true child reads {floor_mib:.0f} MiB)",
           "- files: written by llama.cpp (convert_hf_to_gguf.py --outtype f16, then llama-quantize), from "
           "checkpoints with the models' exact shapes and random bf16 weights (benchmarks/peer_inputs.py)"
           if not args.files else "- files: given with --files, " + ", ".join(f.replace(str(Path.home()), "~")
                                                                              for f in args.files)]
    for shape, same in identical.items():
        out.append(f"- {shape}: cpuq convert's Q4_K_M file is {'byte-identical to' if same else 'NOT identical to'}"
                   f" llama.cpp's")
    out.append("\nSummary, cpuq / llama.cpp (speed: higher is better for cpuq; time and memory: lower is):\n")
    head = ["model", "type"] + [t for t, _ in tests] + ["time to first token", "peak RSS"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in rows:
        c, l = row["results"]["cpuq"], row["results"]["llama.cpp"]
        cells = [_ratio(stats(rates(c, d))[0], stats(rates(l, d))[0]) for _, d in tests]
        cells.append(_ratio(stats([t["ttft_s"] for t in c.ttft])[0], stats([t["ttft_s"] for t in l.ttft])[0]))
        cells.append(_ratio(c.peak_rss_mib, l.peak_rss_mib))
        out.append(f"| {row['model']} | {row['type']} | " + " | ".join(cells) + " |")

    out.append("\nSpeed, tok/s:\n")
    out += ["| model | type | file MiB | test | cpuq tok/s | llama.cpp tok/s | cpuq / llama.cpp |",
            "|---|---|---:|---|---:|---:|---:|"]
    for row in rows:
        c, l = row["results"]["cpuq"], row["results"]["llama.cpp"]
        for test, d in tests:
            rc, rl = rates(c, d), rates(l, d)
            out.append(f"| {row['model']} | {row['type']} | {row['mib']:,.0f} | {test} | {_cell(rc)} | {_cell(rl)} | "
                       f"{_ratio(stats(rc)[0], stats(rl)[0])} |")

    if any("token_bytes" in row for row in rows):
        out.append("\nDecode as bandwidth: bytes a token reads (the blocks' tensors and the output matrix, of "
                   "an expert stack the experts a token uses) x tok/s:\n")
        read = info.get("read_gb_s")
        if read:
            out.append(f"The machine's read bandwidth, {args.threads} threads summing a 2 GiB array (best of 5): "
                       f"{read:.1f} GB/s.\n")
        out += ["| model | test | MB per token | cpuq GB/s | llama.cpp GB/s |" + (" cpuq / read | llama.cpp / read |"
                                                                               if read else ""),
                "|---|---|---:|---:|---:|" + ("---:|---:|" if read else "")]
        for row in rows:
            if "token_bytes" not in row:
                continue
            c, l = row["results"]["cpuq"], row["results"]["llama.cpp"]
            for test, d in tests[1:]:
                b = row["token_bytes"]
                gc, gl = b * stats(rates(c, d))[0] / 1e9, b * stats(rates(l, d))[0] / 1e9
                line = f"| {row['model']} | {test} | {b / 1e6:,.0f} | {gc:.1f} | {gl:.1f} |"
                if read:
                    line += f" {gc / read:.0%} | {gl / read:.0%} |"
                out.append(line)

    out.append("\nStart-up and memory:\n")
    out += ["| model | type | runtime | time to first token s | of which load s | prompt + token s "
            "| peak RSS MiB, TTFT process | peak RSS MiB, benchmark worker |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for rt in RUNTIMES:
            r = row["results"][rt]
            t = lambda key: stats([x[key] for x in r.ttft])  # noqa: E731
            out.append(f"| {row['model']} | {row['type']} | {rt} | {t('ttft_s')[0]:.2f} ± {t('ttft_s')[1]:.2f} | "
                       f"{t('load_s')[0]:.2f} | {t('prompt_s')[0]:.2f} | "
                       f"{max(x['peak_rss_mib'] for x in r.ttft):,.0f} | {r.peak_rss_mib:,.0f} |")

    out.append("\nVersions:\n")
    out += [f"- {k}: {v}" for k, v in info["versions"].items()]
    out.append(f"\nCommand: `{info['command']}`")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], args, info: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        for rt, style, marker in (("cpuq", "-", "o"), ("llama.cpp", "--", "s")):
            r = row["results"][rt]
            ms = [stats([args.gen / s for s in r.decode_s[d]]) for d in args.depths]
            ax.errorbar(args.depths, [m for m, _ in ms], yerr=[s for _, s in ms], color=colors[i % len(colors)],
                        linestyle=style, marker=marker, capsize=3, label=f"{row['model']} {row['type']}, {rt}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.depths, [str(d) for d in args.depths])
    ax.set_xlabel("context depth (tokens before the generated ones)")
    ax.set_ylabel(f"decode tok/s (tg{args.gen}, mean ± std of {args.repeat})")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"cpuq (solid) vs llama.cpp (dashed), {args.threads} threads\n"
                 f"{info['machine']['cpu']}, {info['date']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _list(kind, choices=None):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list"
                                             + (f" of {', '.join(choices)}" if choices else ""))
        return items
    return parse


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        runtime, path, n_ctx, threads, fa = sys.argv[2:7]
        worker(runtime, path, int(n_ctx), int(threads), fa == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=_list(str, list(SHAPES)), default=list(SHAPES), help="comma-separated shapes")
    ap.add_argument("--types", type=_list(str, list(TYPES)), default=["q4_k_m", "q8_0"],
                    help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--depths", type=_list(int), default=[128, 1024, 4096], help="decode depths, comma-separated")
    ap.add_argument("--prompt", type=int, default=512, help="prefill test length")
    ap.add_argument("--gen", type=int, default=32, help="decode steps timed at each depth")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention")
    ap.add_argument("--seed", type=int, default=0, help="of the token ids")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--skip-build", action="store_true", help="use the cached files only; fail if one is missing")
    ap.add_argument("--files", type=_list(str), default=[], help="NAME=PATH,...: these llama.cpp-written files "
                                                                "instead of --models/--types")
    args = ap.parse_args()
    args.depths = sorted(set(args.depths))
    if min(args.prompt, args.gen, args.repeat, args.threads, *args.depths) < 1 or args.prompt < TTFT_PROMPT:
        raise SystemExit("--prompt, --gen, --repeat, --threads and depths must be positive; --prompt >= "
                         f"{TTFT_PROMPT}")
    check_peer(PEER_PYTHON)
    build = not args.skip_build

    files: list[tuple[str, str, Path]] = []  # (shape, type, path)
    identical: dict[str, bool] = {}
    for item in args.files:
        name, _, path = item.partition("=")
        if not Path(path).is_file():
            raise SystemExit(f"--files: {path!r} is not a file")
        files.append((name, "file", Path(path)))
    for shape in (args.models if not args.files else []):
        for qtype in args.types:
            producer = TYPES[qtype][0]
            if producer == "llama":
                files.append((shape, qtype, ensure_llama_gguf(shape, qtype, args.threads, build)))
            else:
                files.append((shape, qtype, ensure_cpuq_gguf(shape, qtype.split("-", 1)[1], args.threads, build)))
        if "q4_k_m" in args.types:
            ours = BENCH_HOME / "gguf" / f"{shape}-cpuq-q4_k_m.gguf"
            if build:
                ours = ensure_cpuq_gguf(shape, "q4_k_m", args.threads)
            if ours.exists():
                identical[shape] = filecmp.cmp(ours, ensure_llama_gguf(shape, "q4_k_m", build=False), shallow=False)

    # Qwen2's ordinary tokens are ids 0 .. 151642 (control tokens follow); both shapes share that vocabulary.
    rng = random.Random(args.seed)
    ids = [rng.randrange(1000, 150000) for _ in range(max([args.prompt, *args.depths]))]
    log_dir = BENCH_HOME / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    true_proc = subprocess.Popen(["/bin/true"])
    floor_mib = _wait(true_proc)
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "niceness": os.nice(0),
            "load_start": os.getloadavg()[0], "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    if info["niceness"] or info["load_start"] > 0.5:
        print(f"note: niceness {info['niceness']}, load average {info['load_start']:.2f}: other work will skew "
              f"the numbers", file=sys.stderr)

    if args.files:
        info["read_gb_s"] = read_bandwidth(args.threads)
    rows = []
    for shape, qtype, path in files:
        tag = f"{shape}-{qtype}"
        print(f"{tag}: {path}", file=sys.stderr, flush=True)
        rows.append({"model": shape, "type": TYPES[qtype][1] if qtype in TYPES else _file_types(path),
                     "path": str(path), "mib": path.stat().st_size / MIB,
                     "results": benchmark_file(path, ids, args, log_dir, tag)})
        if args.files:
            rows[-1]["token_bytes"] = token_bytes(path)

    info["load_end"] = os.getloadavg()[0]
    info["versions"] = versions()
    text = report(rows, args, info, identical, floor_mib)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_vs_llama.md").write_text(text)
    (args.out / "runtime_vs_llama.json").write_text(json.dumps({
        **info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpuq_q4_k_m_identical": identical, "rss_floor_mib": floor_mib,
        "rows": [{**{k: v for k, v in row.items() if k != "results"},
                  "results": {rt: vars(r) for rt, r in row["results"].items()}} for row in rows],
    }, indent=1) + "\n")
    written = ["runtime_vs_llama.md", "runtime_vs_llama.json"]
    if plot(rows, args, info, args.out / "runtime_vs_llama.png"):
        written.append("runtime_vs_llama.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)}", file=sys.stderr)


if __name__ == "__main__":
    main()
