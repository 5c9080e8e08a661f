"""HF bf16 checkpoint -> Q4_K_M, cpuq next to llama.cpp: wall time and peak memory per process.

    .venv/bin/python benchmarks/convert_vs_llama.py [--repeat N] [--threads 2] [--json out.json]

Needs the llama.cpp peer (tools/peer_env.sh): llama-cpp-python in $CPUQ_PEER_VENV (default
~/.cache/cpuq-peer/venv) for llama-quantize, the torch+transformers venv $CPUQ_HF_VENV
(default ~/.cache/cpuq-peer/hf-venv) and the vendored llama.cpp source for
convert_hf_to_gguf.py. The input is a checkpoint with the exact shapes of Qwen2.5-0.5B
(494M parameters, random N(0, 0.02) bf16 weights, the real Qwen2 tokenizer), built once by
tools/make_tiny_checkpoint.py into ~/.cache/cpuq-bench/ ($CPUQ_BENCH_HOME) and reused
(benchmarks/peer_inputs.py, which also holds the peer's paths and the commands below).

Compared, each as its own process:
  cpuq       `cpuq convert SRC -o OUT.gguf --type q4_k_m --force`       (NUMBA_NUM_THREADS=threads)
  llama.cpp  1. `convert_hf_to_gguf.py SRC --outtype f16 --outfile F16.gguf`
             2. llama_model_quantize(F16.gguf -> OUT.gguf, Q4_K_M, nthread=threads), i.e. llama-quantize
Wall time and the child's own rusage (ru_maxrss, user+sys CPU) come from os.wait4. The runs
are interleaved, each starts after os.sync(), and the checkpoint is read once beforehand so
every run sees a warm page cache (dropping the cache needs root). Prints a Markdown table
(best of N for time, peak RSS over all runs; cpuq's first run, which includes any Numba
compilation, as its own row), the versions and the exact commands, and checks that the two
Q4_K_M files hold the same tensor data.

The parent stays small on purpose: on Linux a child's ru_maxrss starts from the RSS of the
process that spawned it (exec records the old address space's high-water mark), so the
checkpoint is built in a subprocess and cpuq is imported only after the last timed run.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer_inputs import (BENCH_HOME, CONVERT_HF, HF_PYTHON, LLAMA_CPP, PEER_PYTHON, ROOT, check_peer, checkpoint_dir,
                         convert_hf_cmd, cpuq_convert_cmd, ensure_checkpoint, probe, quantize_cmd)

MIB = 1024 * 1024
SHAPE = "qwen2.5-0.5b"


@dataclass
class Run:
    wall_s: float
    cpu_s: float        # user + sys of the child
    peak_rss_mib: float  # the child's ru_maxrss


@dataclass
class Step:
    label: str
    cmd: list[str]
    env: dict[str, str]  # variables set on top of the inherited environment
    output: Path
    runs: list[Run] = field(default_factory=list)

    def best_wall(self) -> float:
        return min(r.wall_s for r in self.runs)

    def best_run(self) -> Run:
        return min(self.runs, key=lambda r: r.wall_s)

    def peak_rss(self) -> float:
        return max(r.peak_rss_mib for r in self.runs)

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.cmd)])


def measure(cmd: list[str], env: dict[str, str], log: Path) -> Run:
    """Run `cmd` to completion; its wall time and its own rusage (not the parent's)."""
    os.sync()  # no dirty pages of the previous run left to write back during this one
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{shlex.join(cmd)[:200]} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


# the input ----------------------------------------------------------------------

def n_parameters(src: Path) -> int:
    """Sum of tensor sizes from the safetensors headers (nothing else is read)."""
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def warm_page_cache(src: Path) -> float:
    """Read every file of `src` once (in chunks, so this process stays small); GB/s."""
    t0, n = time.perf_counter(), 0
    for path in sorted(src.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 * MIB):
                    n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e9


# context ------------------------------------------------------------------------

def versions(threads: int) -> dict[str, str]:
    from importlib.metadata import version
    gguf_py = next((line.split('"')[1] for line in (LLAMA_CPP / "gguf-py" / "pyproject.toml").read_text().splitlines()
                    if line.startswith("version")), "?")
    return {
        "cpuq": version("cpuq"),
        "numba": version("numba"),
        "numpy": version("numpy"),
        "python": platform.python_version(),
        "llama-cpp-python": probe(PEER_PYTHON, "import importlib.metadata as m; print(m.version('llama-cpp-python'))"),
        "llama.cpp system info": probe(PEER_PYTHON, "import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())"),
        "gguf-py (vendored, used by convert_hf_to_gguf.py)": gguf_py,
        "torch (convert_hf_to_gguf.py)": probe(HF_PYTHON, "import torch; print(torch.__version__, '-', torch.get_num_threads(), 'threads')"),
        "threads": f"cpuq NUMBA_NUM_THREADS={threads}; llama_model_quantize nthread={threads}; "
                   f"convert_hf_to_gguf.py has no thread option (torch default above); {os.cpu_count()} CPUs",
    }


def numba_cache_files() -> int:
    return sum(1 for _ in (ROOT / "cpuq").rglob("*.nbi"))


# the check ----------------------------------------------------------------------

def compare_tensor_data(a: Path, b: Path) -> dict:
    """Same tensor names, types, shapes and bytes in both files; and whether the whole files
    (metadata included) are byte-identical, which is a stronger claim than the check needs."""
    import numpy as np

    import cpuq  # only now: see the module docstring
    fa, fb = cpuq.open_gguf(a), cpuq.open_gguf(b)
    names = list(fa.tensors)
    differ = [n for n in names if n not in fb.tensors
              or (fa.tensors[n].qtype.name, fa.tensors[n].shape) != (fb.tensors[n].qtype.name, fb.tensors[n].shape)
              or not np.array_equal(fa.tensors[n].data, fb.tensors[n].data)]
    differ += [n for n in fb.tensors if n not in fa.tensors]
    types: dict[str, int] = {}
    for t in fa.tensors.values():
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return {"identical": not differ, "files_identical": filecmp.cmp(a, b, shallow=False),
            "n_tensors": len(names), "n_tensors_other": len(fb.tensors),
            "differ": differ, "types": dict(sorted(types.items(), key=lambda kv: -kv[1]))}


# report -------------------------------------------------------------------------

def size_mib(path: Path) -> str:
    return f"{path.stat().st_size / MIB:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool; time is the best of them")
    ap.add_argument("--threads", type=int, default=2, help="cpuq's Numba threads and llama-quantize's nthread")
    ap.add_argument("--checkpoint", type=Path, default=checkpoint_dir(SHAPE))
    ap.add_argument("--workdir", type=Path, default=BENCH_HOME / "work", help="outputs and logs (overwritten)")
    ap.add_argument("--cpuq", type=Path, default=ROOT / ".venv" / "bin" / "cpuq")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    if not args.cpuq.exists():
        raise SystemExit(f"{args.cpuq} missing (cpuq CLI: pip install -e .)")
    check_peer(HF_PYTHON, PEER_PYTHON, CONVERT_HF)

    src = ensure_checkpoint(SHAPE, args.checkpoint)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "llama-f16.gguf"
    cpuq_out = work / "cpuq-q4_k_m.gguf"
    cpuq_step = Step("cpuq convert", *cpuq_convert_cmd(src, cpuq_out, "q4_k_m", args.threads, args.cpuq), cpuq_out)
    llama_steps = [
        Step("llama.cpp 1: convert_hf_to_gguf.py -> F16", *convert_hf_cmd(src, f16), f16),
        Step("llama.cpp 2: llama-quantize F16 -> Q4_K_M",
             *quantize_cmd(f16, work / "llama-q4_k_m.gguf", "q4_k_m", args.threads), work / "llama-q4_k_m.gguf"),
    ]
    steps = [cpuq_step, *llama_steps]

    info = versions(args.threads)
    floor = measure(["/bin/true"], {}, work / "true.log").peak_rss_mib
    n_params = n_parameters(src)
    src_mib = sum(p.stat().st_size for p in src.glob("*.safetensors")) / MIB
    nbi_before = numba_cache_files()
    warm_gbs = warm_page_cache(src)

    for i in range(args.repeat):
        for step in steps:
            step.output.unlink(missing_ok=True)  # every run writes a fresh file
            log = work / f"{step.output.stem}.run{i + 1}.log"
            step.runs.append(measure(step.cmd, step.env, log))
            r = step.runs[-1]
            print(f"run {i + 1}/{args.repeat} {step.label}: {r.wall_s:.1f} s, {r.peak_rss_mib:,.0f} MiB", file=sys.stderr)

    check = compare_tensor_data(cpuq_step.output, llama_steps[1].output)

    first = cpuq_step.runs[0]
    llama_wall = sum(s.best_wall() for s in llama_steps)
    llama_cpu = sum(s.best_run().cpu_s for s in llama_steps)
    llama_rss = max(s.peak_rss() for s in llama_steps)
    cache = f"Numba cache warm, {nbi_before} index files" if nbi_before else "Numba cache cold: includes compilation"
    n = args.repeat
    rows = [
        (f"cpuq convert, first run ({cache})", first.wall_s, first.cpu_s, first.peak_rss_mib, size_mib(cpuq_step.output)),
        (f"cpuq convert, best of {n}", cpuq_step.best_wall(), cpuq_step.best_run().cpu_s, cpuq_step.peak_rss(),
         size_mib(cpuq_step.output)),
        *[(f"{s.label}, best of {n}", s.best_wall(), s.best_run().cpu_s, s.peak_rss(), size_mib(s.output))
          for s in llama_steps],
        ("llama.cpp total (sum of times, max of peaks)", llama_wall, llama_cpu, llama_rss,
         size_mib(llama_steps[1].output)),
    ]
    time_ratio, rss_ratio = cpuq_step.best_wall() / llama_wall, cpuq_step.peak_rss() / llama_rss

    print(f"# HF bf16 -> Q4_K_M: cpuq vs llama.cpp (convert_hf_to_gguf.py + llama-quantize)\n")
    print(f"- checkpoint: `{src}`: Qwen2.5-0.5B shapes (Qwen2ForCausalLM, {n_params / 1e6:.2f}M parameters, "
          f"tied embeddings), random N(0, 0.02) bf16 weights, {src_mib:,.1f} MiB safetensors")
    print(f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- page cache: warm for both tools. It cannot be dropped without root, so the checkpoint was read "
          f"once before timing ({warm_gbs:.1f} GB/s); every run starts after os.sync() and writes a fresh output")
    print(f"- time: best of {n} interleaved runs (wall; CPU = user + sys of the same run); peak RSS: the largest "
          f"ru_maxrss of the process over all runs (os.wait4; a /bin/true child reads {floor:.0f} MiB)\n")
    print("| tool / step | wall s | CPU s | peak RSS MiB | output |")
    print("|---|---:|---:|---:|---:|")
    for label, wall, cpu, rss, out in rows:
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {rss:,.0f} | {out} |")
    print(f"\ncpuq / llama.cpp: time {time_ratio:.2f}x ({1 / time_ratio:.1f}x faster), "
          f"peak RSS {rss_ratio:.2f}x\n")
    verdict = "yes" if check["identical"] else f"NO ({len(check['differ'])} differ, first {check['differ'][:3]})"
    print(f"tensor data identical: {verdict} ({check['n_tensors']} tensors; "
          f"{', '.join(f'{k}: {v}' for k, v in check['types'].items())}); "
          f"whole files byte-identical: {'yes' if check['files_identical'] else 'no'}\n")
    print("Versions:\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print("\nCommands:\n\n```sh")
    for step in steps:
        print(step.shell())
    print("```")

    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": str(src), "n_parameters": n_params, "safetensors_mib": src_mib, "repeat": n,
            "threads": args.threads, "cpus": os.cpu_count(), "warm_read_gbs": warm_gbs, "rss_floor_mib": floor,
            "numba_cache_index_files_before": nbi_before, "versions": info,
            "steps": [{"label": s.label, "command": s.shell(), "output_bytes": s.output.stat().st_size,
                       "runs": [asdict(r) for r in s.runs]} for s in steps],
            "summary": {"cpuq_first_wall_s": first.wall_s, "cpuq_best_wall_s": cpuq_step.best_wall(),
                        "cpuq_peak_rss_mib": cpuq_step.peak_rss(), "llama_cpp_wall_s": llama_wall,
                        "llama_cpp_peak_rss_mib": llama_rss, "time_ratio": time_ratio, "rss_ratio": rss_ratio},
            "tensor_data_identical": check["identical"], "files_identical": check["files_identical"],
            "tensors": check["n_tensors"], "differ": check["differ"],
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
