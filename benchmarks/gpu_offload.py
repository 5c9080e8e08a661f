"""GPU offload speed on one CUDA device: cpuq's prefill and decode tok/s as a function of
--gpu-layers N, and HF transformers fp16 on the same GPU and the same checkpoint.

    python benchmarks/gpu_offload.py --out DIR [--shape qwen2.5-0.5b] [--type q4_k_m]
        [--layers 0,4,8,12,16,20,24,-1] [--prompt 512] [--gen 128] [--repeat 3] [--threads 2]

The checkpoint is peer_inputs' (a real model's exact shapes, random bf16 weights, built by
tools/make_tiny_checkpoint.py), converted in-process by `cpuq.convert` (byte-identical to
llama.cpp's convert + quantize: tests/convert/test_convert_peer.py). cpuq's numbers are
cpuq.eval.bench's (as `cpuq bench`: ppN in one call, then tgN one token at a time after
it); blocks left on the CPU run with --threads threads. transformers: the same prompt
length, fp16 weights on the GPU, ppN = one forward pass over the prompt, tgN = greedy
`generate` of exactly N tokens, its prefill time taken out. Writes gpu_offload.json,
gpu_offload.md and gpu_offload.png (tok/s by N) to --out.

Needs CuPy and a CUDA device (and torch + transformers for the reference; --skip-hf
without them).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpuq  # noqa: E402
from cpuq.eval.bench import bench  # noqa: E402
from cpuq.runtime.gpu import describe_gpu  # noqa: E402
from peer_inputs import BENCH_HOME, ensure_checkpoint  # noqa: E402


def cpuq_runs(gguf: Path, layers: list[int], args) -> list[dict]:
    rows = []
    for n in layers:
        t0 = time.perf_counter()
        pp, tg = bench(gguf, n_prompt=args.prompt, n_gen=args.gen, repeat=args.repeat, n_threads=args.threads,
                       gpu_layers=n)
        rows.append({"gpu_layers": n, "where": pp.gpu, "pp": pp.to_dict(), "tg": tg.to_dict()})
        print(f"cpuq -ngl {n:3d}: pp{args.prompt} {pp.mean_tokens_per_second:8.1f} ± {pp.std_tokens_per_second:.1f}  "
              f"tg{args.gen} {tg.mean_tokens_per_second:7.1f} ± {tg.std_tokens_per_second:.1f} tok/s  ({pp.gpu}; "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def hf_run(ckpt: Path, args) -> dict:
    """transformers fp16 on the GPU: ppN (one forward pass) and tgN (greedy generate of N
    tokens minus its prefill), mean and spread over --repeat after a warm-up."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16).cuda().eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([np.random.default_rng(0).integers(0, min(vocab, 151643), args.prompt).tolist()],
                       device="cuda")
    pp, tg = [], []
    with torch.no_grad():
        for rep in range(args.repeat + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False,
                                 pad_token_id=0)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            assert out.shape[1] == args.prompt + args.gen
            if rep:
                pp.append(args.prompt / prefill)
                tg.append((args.gen - 1) / (total - prefill))  # the first new token comes from the prefill
    r = {"torch": torch.__version__, "transformers": transformers.__version__,
         "pp": {"avg_ts": statistics.mean(pp), "stddev_ts": statistics.stdev(pp) if len(pp) > 1 else 0.0,
                "samples_ts": pp},
         "tg": {"avg_ts": statistics.mean(tg), "stddev_ts": statistics.stdev(tg) if len(tg) > 1 else 0.0,
                "samples_ts": tg}}
    print(f"transformers fp16: pp{args.prompt} {r['pp']['avg_ts']:8.1f}  tg{args.gen} {r['tg']['avg_ts']:7.1f} tok/s",
          flush=True)
    return r


def write(out: Path, result: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_offload.json").write_text(json.dumps(result, indent=2) + "\n")
    hf = result.get("transformers")
    lines = [f"GPU offload, {result['device']}, {result['date']}: {result['model']} "
             f"(prompt {args.prompt}, then {args.gen} tokens; CPU blocks on {args.threads} threads)", "",
             f"| --gpu-layers | where | pp{args.prompt} tok/s | tg{args.gen} tok/s |", "|---|---|---:|---:|"]
    for r in result["cpuq"]:
        lines.append(f"| {r['gpu_layers']} | {r['where']} | {r['pp']['avg_ts']:.1f} ± {r['pp']['stddev_ts']:.1f} | "
                     f"{r['tg']['avg_ts']:.1f} ± {r['tg']['stddev_ts']:.1f} |")
    if hf:
        lines.append(f"| transformers fp16 | all on GPU | {hf['pp']['avg_ts']:.1f} ± {hf['pp']['stddev_ts']:.1f} | "
                     f"{hf['tg']['avg_ts']:.1f} ± {hf['tg']['stddev_ts']:.1f} |")
    (out / "gpu_offload.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    n_layer = result["n_layer"]
    xs = [n_layer + 1 if r["gpu_layers"] < 0 else r["gpu_layers"] for r in result["cpuq"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, test, label in ((axes[0], "tg", f"decode (tg{args.gen})"), (axes[1], "pp", f"prefill (pp{args.prompt})")):
        ax.plot(xs, [r[test]["avg_ts"] for r in result["cpuq"]], "o-", label="cpuq")
        if hf:
            ax.axhline(hf[test]["avg_ts"], color="gray", ls="--", label="transformers fp16 (all on GPU)")
        ax.set_yscale("log")
        ax.set_xlabel(f"--gpu-layers ({n_layer + 1} = all + output)")
        ax.set_ylabel("tokens/s")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "gpu_offload.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,-1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    gpu = describe_gpu()
    if not gpu["available"]:
        raise SystemExit(f"no GPU: {gpu['reason']}")
    ckpt = ensure_checkpoint(args.shape)
    gguf = BENCH_HOME / "gguf" / f"{args.shape}-cpuq-{args.type}.gguf"
    if not gguf.exists() or gguf.stat().st_mtime < ckpt.stat().st_mtime:
        gguf.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cpuq.convert(ckpt, gguf, args.type, force=True)
        print(f"converted {gguf.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    with cpuq.load(gguf, n_ctx=64) as m:
        n_layer = m.config.n_layer
    result = {"model": gguf.name, "n_layer": n_layer, "device": gpu["devices"][0]["name"], "gpu": gpu,
              "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "args": vars(args) | {"out": str(args.out)},
              "cpuq": cpuq_runs(gguf, [int(x) for x in args.layers.split(",")], args)}
    if not args.skip_hf:
        result["transformers"] = hf_run(ckpt, args)
    write(args.out, result, args)


if __name__ == "__main__":
    main()
