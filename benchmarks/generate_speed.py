"""Prompt (prefill) and generation (decode) speed, cpuq vs llama.cpp, on the same GGUF files.

    .venv/bin/python benchmarks/generate_speed.py [MODEL.gguf ...] [--prompt 128] [--gen 64] [--threads 2]

Without files: the demo model (SmolLM2-135M-Instruct, Q4_1) and, if present, the
llama.cpp-written Q4_K_M / Q8_0 files of it in ~/.cache/cpuq-peer/files
(tools/make_peer_q4km.py). llama.cpp is llama-cpp-python from the peer venv
(tools/peer_env.sh), run in a subprocess with the same thread count, its default
settings, and the same token ids. Prefill: one evaluation of `--prompt` tokens in a
fresh context. Decode: `--gen` greedy tokens one at a time after that prompt. Best of
`--repeat` runs each; one warm-up run first (Numba cache loading, llama.cpp's repack).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
PEER_PYTHON = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "bin" / "python"

_LLAMA = """
import json, sys, time
import numpy as np, llama_cpp
path, ids, n_gen, threads, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = llama_cpp.Llama(path, n_ctx=len(ids) + n_gen + 8, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
# Llama.scores is only written with logits_all=True (and has n_batch rows, so scores[n_tokens - 1]
# is out of range past 512 tokens): read the last token's logits from the context instead.
last_logits = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
best_p = best_d = float("inf")
for r in range(repeat + 1):
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); p = time.perf_counter() - t
    tok = int(np.argmax(last_logits()))
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    d = time.perf_counter() - t
    if r:
        best_p, best_d = min(best_p, p), min(best_d, d)
print(json.dumps({"prefill_s": best_p, "decode_s": best_d}))
"""


def cpuq_speed(path: Path, ids: list[int], n_gen: int, threads: int, repeat: int) -> dict:
    import cpuq
    best_p = best_d = float("inf")
    with cpuq.load(path, n_ctx=len(ids) + n_gen + 8, n_threads=threads) as m:
        for r in range(repeat + 1):
            m.reset()
            t = time.perf_counter()
            logits = m._ingest(ids)
            p = time.perf_counter() - t
            tok = int(np.argmax(logits))
            t = time.perf_counter()
            for _ in range(n_gen):
                tok = int(np.argmax(m._step(tok)))
            d = time.perf_counter() - t
            if r:
                best_p, best_d = min(best_p, p), min(best_d, d)
    return {"prefill_s": best_p, "decode_s": best_d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    models = args.models
    if not models:
        from cpuq.demo import demo_model_path
        models = [demo_model_path()] + sorted((PEER / "files").glob("*.gguf"))
    rng = np.random.default_rng(0)
    print(f"prompt {args.prompt} tokens, {args.gen} generated, {args.threads} threads, best of {args.repeat}\n")
    print("| model | types | cpuq prefill tok/s | llama.cpp prefill tok/s | ratio | cpuq decode tok/s "
          "| llama.cpp decode tok/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    import cpuq
    for path in models:
        s = cpuq.summarize(path)
        ids = rng.integers(100, 10000, args.prompt).tolist()
        ours = cpuq_speed(path, ids, args.gen, args.threads, args.repeat)
        r = subprocess.run([str(PEER_PYTHON), "-c", _LLAMA, str(path), json.dumps(ids), str(args.gen),
                            str(args.threads), str(args.repeat)], capture_output=True, text=True, check=True)
        theirs = json.loads(r.stdout.strip().splitlines()[-1])
        op, tp = args.prompt / ours["prefill_s"], args.prompt / theirs["prefill_s"]
        od, td = args.gen / ours["decode_s"], args.gen / theirs["decode_s"]
        types = ", ".join(f"{k}" for k in s["tensor_types"])
        print(f"| {path.name} | {types} | {op:.1f} | {tp:.1f} | {op / tp:.2f}x | {od:.1f} | {td:.1f} | {od / td:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
