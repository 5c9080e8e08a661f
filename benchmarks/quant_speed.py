"""Codec speed, cpuq next to llama.cpp in one run, on the machine it runs on.

    .venv/bin/python benchmarks/quant_speed.py [--rows 4096 --cols 4096 --threads 2 --repeat 3]

Quantize: cpuq.quantize (Numba, parallel over rows) vs llama.cpp's ggml_quantize_chunk
called from `--threads` Python threads on disjoint row ranges (ctypes drops the GIL; this
is how llama-quantize splits a tensor). Dequantize: cpuq.dequantize vs llama.cpp's
to_float on the same thread split and gguf-py (numpy). Prints a Markdown
table: M weights/s for quantize, GB/s of float32 output for dequantize, and the ratio.
Needs the peer library (tools/peer_env.sh).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

import cpuq  # noqa: E402
import ggml_oracle  # noqa: E402
from tests import data  # noqa: E402

TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def over_row_ranges(fn, x, threads: int):
    """Run fn on `threads` disjoint row ranges of x at once (ctypes releases the GIL)."""
    bounds = np.linspace(0, x.shape[0], threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: fn(x[bounds[i]:bounds[i + 1]]), range(threads)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    import numba
    numba.set_num_threads(args.threads)

    x = data.normal(args.rows, args.cols, seed=1)
    imp = data.importance(args.cols, seed=1)
    n = x.size
    print(f"# codec speed: {args.rows} x {args.cols} float32 (normal), {args.threads} threads, best of {args.repeat}")
    print(f"# machine: {os.cpu_count()} cpus; llama.cpp from {ggml_oracle.library_path()}\n")
    print("| type | imatrix | cpuq quantize Mw/s | llama.cpp Mw/s | ratio | cpuq dequant GB/s | llama.cpp GB/s | gguf-py GB/s | ratio vs llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.types.split(","):
        gt = G[name]
        for use_imp in (False, True):
            if use_imp and not cpuq.get_qtype(name).uses_importance:
                continue
            w = imp if use_imp else None
            cpuq.quantize(x[:8], name, importance=w)  # JIT warm-up
            t_c = best_of(lambda: cpuq.quantize(x, name, importance=w), args.repeat)
            t_l = best_of(lambda: over_row_ranges(lambda part: ggml_oracle.quantize(part, gt, w), x, args.threads), args.repeat)
            row = f"| {name} | {'yes' if use_imp else 'no'} | {n / t_c / 1e6:.0f} | {n / t_l / 1e6:.0f} | {t_l / t_c:.2f}x |"
            if use_imp:
                print(row + " | | | |")
                continue
            q = cpuq.quantize(x, name)
            cpuq.dequantize(q[:8], name, (8, args.cols))
            d_c = best_of(lambda: cpuq.dequantize(q, name, x.shape), args.repeat)
            d_l = best_of(lambda: over_row_ranges(lambda part: ggml_oracle.dequantize(part, gt, args.cols), q, args.threads), args.repeat)
            d_g = best_of(lambda: gguf_dequantize(q, gt), 1)
            gb = x.nbytes / 1e9
            print(row + f" {gb / d_c:.2f} | {gb / d_l:.2f} | {gb / d_g:.2f} | {d_l / d_c:.2f}x |")


if __name__ == "__main__":
    main()
