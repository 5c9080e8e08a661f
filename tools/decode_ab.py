"""Decode speed of the working tree against another commit, alternated batch by batch.

    python tools/decode_ab.py MODEL.gguf [--rev HEAD~1] [--depth 128] [--rounds 30] [--steps 8] [--prefill]

For kernel work on a noisy machine: one worker process per side (the other side runs from a
temporary `git worktree` of --rev), each loaded once; every round fills --depth prompt
tokens and times --steps greedy one-token steps, the sides taking turns (first side
alternating). Prints each side's median and best ms per token and in how many rounds the
tree was faster. --prefill times the --depth prompt tokens instead (ms per prompt token).
This compares cpuq with itself; speed claims against llama.cpp come from
benchmarks/runtime_vs_llama.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from toolcli import ArgumentParser, ToolError, require_file, run

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import numpy as np
import cpuq
m = cpuq.load(sys.argv[1], n_ctx=int(sys.argv[2]) + 256, n_threads=2)
ids = np.random.default_rng(0).integers(100, 10000, int(sys.argv[2])).tolist()
print("ready", cpuq.__file__, flush=True)
for line in sys.stdin:
    m.reset()
    t = time.perf_counter()
    m._ingest(ids)
    if sys.argv[3] == "prefill":
        print(json.dumps((time.perf_counter() - t) / len(ids) * 1e3), flush=True)
        continue
    t = time.perf_counter()
    for _ in range(int(line)):
        m._step(5)
    print(json.dumps((time.perf_counter() - t) / int(line) * 1e3), flush=True)
"""


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rev", default="HEAD", help="the commit to compare the working tree with")
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", action="store_true", help="time the --depth prompt tokens, not the steps")
    args = ap.parse_args(argv)
    require_file(Path(args.model), "model")
    for name in ("depth", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name} {getattr(args, name)}: expected a positive number")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise ToolError(f"--rev {args.rev}: not a commit of {ROOT}")
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "rev"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(other), args.rev], check=True)
        try:
            procs = {}
            for side, path in (("tree", ROOT), (args.rev, other)):
                # cwd too: `python -c` puts the working directory ahead of PYTHONPATH
                env = dict(os.environ, PYTHONPATH=str(path))
                procs[side] = subprocess.Popen([sys.executable, "-c", WORKER, str(Path(args.model).resolve()),
                                                str(args.depth), "prefill" if args.prefill else "decode"], env=env, cwd=path,
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                print(side, procs[side].stdout.readline().strip())
            times = {side: [] for side in procs}
            sides = list(procs)
            for r in range(args.rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    p = procs[side]
                    p.stdin.write(f"{args.steps}\n")
                    p.stdin.flush()
                    times[side].append(json.loads(p.stdout.readline()))
            for p in procs.values():
                p.stdin.close()
                p.wait()
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    a, b = (np.array(times[s]) for s in sides)
    for side, t in zip(sides, (a, b)):
        print(f"{side}: median {np.median(t):.2f} ms/token, best {t.min():.2f}")
    print(f"{args.rev} / tree per round, median {np.median(b / a):.3f}; the tree faster in {int((a < b).sum())} of "
          f"{len(a)} rounds")


if __name__ == "__main__":
    run(main)
