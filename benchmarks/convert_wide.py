"""Converter memory and time at Qwen2.5-72B width: a synthetic checkpoint with the real
72B shapes (hidden 8192, intermediate 29568, 64 / 8 heads, vocab 152064, untied) and a few
layers, converted to Q4_K_M; time and RSS per layer, extrapolated to the real 80 layers.

    .venv/bin/python benchmarks/convert_wide.py [--layers 4] [--type q4_k_m] [--json out.json]

The checkpoint (~1.6 GiB bf16 per layer + 4.6 GiB of embeddings) is built once with
tools/make_wide_checkpoint.py into $CPUQ_BENCH_HOME (default ~/.cache/cpuq-bench) and
reused. The conversion runs in a child process (this script with --child) that records,
at every progress callback, the time, VmRSS and VmHWM from /proc/self/status; the
parent also reads the child's ru_maxrss from wait4. Linux only (/proc).

Extrapolation: output size for 80 layers is exact (the converter's own per-tensor type
choice for an 80-layer config times each type's bytes). Time for 80 layers is the
measured non-layer time plus, per layer of the 80, the measured time of a layer with
the same ffn_down type (Q4_K_M gives some layers Q6_K ffn_down; llama.cpp's
use_more_bits). Peak RSS is not extrapolated: it is the per-layer HWM, shown flat.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_HOME = Path(os.environ.get("CPUQ_BENCH_HOME", Path.home() / ".cache" / "cpuq-bench"))
FULL_LAYERS = 80


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(src: str, dst: str, qtype: str, events_path: str) -> None:
    import cpuq
    events = [("start", 0, 0, time.perf_counter(), _status_kib("VmRSS"), _status_kib("VmHWM"))]

    def progress(done: int, total: int, name: str) -> None:
        events.append((name, done, total, time.perf_counter(), _status_kib("VmRSS"), _status_kib("VmHWM")))

    cpuq.convert(src, dst, qtype=qtype, force=True, progress=progress)
    events.append(("end", 0, 0, time.perf_counter(), _status_kib("VmRSS"), _status_kib("VmHWM")))
    Path(events_path).write_text(json.dumps(events))


def _group(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("blk.") else "non-layer"


def _layer_types(cfg_dir: Path, n_layer: int, qtype: str) -> tuple[dict[str, str], int]:
    """ffn_down type per layer and exact output tensor bytes of an n_layer model with
    this checkpoint's shapes, from the converter's own type choice."""
    from cpuq.arch import ModelConfig
    from cpuq.models import expected_tensors, gguf_tensor_name
    from cpuq.convert.pipeline import out_type, tensor_qtype
    import numpy as np
    config = json.loads((cfg_dir / "config.json").read_text())
    config["num_hidden_layers"] = n_layer
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config))
        cfg = ModelConfig.from_hf_config(Path(d) / "config.json")
    out = out_type(qtype)
    tied = bool(config.get("tie_word_embeddings"))
    down, total = {}, 0
    for hf_name, shape in expected_tensors(cfg, not tied).items():
        name = gguf_tensor_name(cfg, hf_name)
        qt = tensor_qtype(name, shape, out, cfg, tied)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        total += rows * qt.row_bytes(shape[-1])
        if name.endswith("ffn_down.weight"):
            down[name.split(".")[1]] = qt.name
    return down, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    src = BENCH_HOME / f"qwen2.5-72b-width-{args.layers}l"
    if not (src / "config.json").exists():
        print(f"building {src} ...", flush=True)
        subprocess.run([sys.executable, ROOT / "tools" / "make_wide_checkpoint.py", src, "--shape", "qwen2.5-72b",
                        "--layers", str(args.layers)], check=True)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    dst = BENCH_HOME / "work" / f"wide-{args.layers}l-{args.type}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.safetensors")):  # warm the page cache, as a second run would see it
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass

    events_path = dst.with_suffix(".events.json")
    cmd = [sys.executable, __file__, "--child", str(src), str(dst), args.type, str(events_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"conversion failed (status {status})")
    events = json.loads(events_path.read_text())

    # Per group (non-layer tensors, then blk.0 ...): time from the previous group's last
    # event to this group's last, and the RSS / HWM at its end.
    groups: OrderedDict[str, dict] = OrderedDict()
    prev_t = events[0][3]
    for name, done, total, t, rss, hwm in events[1:-1]:
        g = groups.setdefault(_group(name), {"start": prev_t})
        g.update(end=t, rss=rss, hwm=hwm, bytes=done)
        prev_t = t
    start_rss, start_hwm = events[0][4], events[0][5]
    convert_s = events[-1][3] - events[0][3]

    down_here, _ = _layer_types(src, args.layers, args.type)
    down_full, full_bytes = _layer_types(src, FULL_LAYERS, args.type)
    out_bytes = dst.stat().st_size

    print(f"\ncpuq convert {src.name} -> {args.type}: {src_bytes / 2**30:.2f} GiB bf16 -> "
          f"{out_bytes / 2**30:.2f} GiB, child wall {wall:.1f} s (convert {convert_s:.1f} s), "
          f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB (ru_maxrss); RSS after imports {start_rss / 2**20:.2f} GiB\n")
    print("| part | ffn_down | time s | checkpoint GiB | RSS at end GiB | peak RSS so far GiB |")
    print("|---|---|---:|---:|---:|---:|")
    prev_bytes = 0
    layer_s: dict[str, list[float]] = {}
    rows = []
    for g, v in groups.items():
        secs = v["end"] - v["start"]
        kind = down_here.get(g.split(".")[1], "") if g != "non-layer" else ""
        if kind:
            layer_s.setdefault(kind, []).append(secs)
        rows.append({"part": g, "ffn_down": kind, "seconds": secs, "bytes": v["bytes"] - prev_bytes,
                     "rss_kib": v["rss"], "hwm_kib": v["hwm"]})
        print(f"| {g} | {kind or '-'} | {secs:.1f} | {(v['bytes'] - prev_bytes) / 2**30:.2f} | "
              f"{v['rss'] / 2**20:.2f} | {v['hwm'] / 2**20:.2f} |")
        prev_bytes = v["bytes"]
    non_layer = groups["non-layer"]["end"] - groups["non-layer"]["start"]
    mean = {k: sum(v) / len(v) for k, v in layer_s.items()}
    counts: dict[str, int] = {}
    for k in down_full.values():
        counts[k] = counts.get(k, 0) + 1
    missing = [k for k in counts if k not in mean]
    if missing:
        raise SystemExit(f"no measured layer with ffn_down {missing}; use more layers")
    est = non_layer + sum(mean[k] * n for k, n in counts.items())
    print(f"\n80-layer extrapolation: {non_layer:.1f} s non-layer + "
          + " + ".join(f"{n} x {mean[k]:.1f} s ({k} ffn_down)" for k, n in counts.items())
          + f" = {est:.0f} s ({est / 60:.1f} min); output {full_bytes / 2**30:.1f} GiB of tensor data; "
          f"peak RSS stays at the per-layer HWM above ({usage.ru_maxrss / 2**20:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "wall": wall, "convert_s": convert_s,
                                         "ru_maxrss_kib": usage.ru_maxrss, "start_rss_kib": start_rss,
                                         "start_hwm_kib": start_hwm, "out_bytes": out_bytes,
                                         "src_bytes": src_bytes, "extrapolated_s": est,
                                         "extrapolated_out_bytes": full_bytes, "layer_counts": counts}, indent=1))


if __name__ == "__main__":
    main()
