"""Golden importance matrix for the CI tests: llama.cpp's own llama-imatrix and
llama-quantize --imatrix (built by tools/peer_env.sh against the peer's libraries) on a
tiny deterministic Qwen2 checkpoint (tools/make_tiny_checkpoint.py, hidden 256 so every
block matrix is a k-quant, none a fallback) over tests/data/tempest.txt, so CI (without
llama.cpp) still checks cpuq's imatrix reading/writing, collection and convert --imatrix
against them (tests/convert/test_imatrix.py).

    .venv/bin/python tools/make_imatrix_golden.py   # writes tests/golden/imatrix.gguf, imatrix.json

Steps: the checkpoint (rebuilt identically by `tiny_checkpoint`), cpuq's F16 conversion of
it (byte-identical to convert_hf_to_gguf.py --outtype f16: tests/convert/test_convert_peer.py),
llama-imatrix over the text (IMATRIX_ARGS), then llama-quantize --imatrix to each of
QUANTS. Both tools run in the repository root with relative paths, because the paths are
stored as given: the text's in imatrix.datasets, the imatrix's in quantize.imatrix.file.
imatrix.json holds the sha256 of the F16 file, of the imatrix and of each quantized file,
and the exact arguments.

Imports cpuq and the sibling make_tiny_checkpoint; runs the llama.cpp tools in subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

GOLDEN_JSON = ROOT / "tests" / "golden" / "imatrix.json"
# Relative to ROOT, as the tools are given them (and store them).
TEXT_ARG = "tests/data/tempest.txt"
IMATRIX_ARG = "tests/golden/imatrix.gguf"
CTX, CHUNKS, THREADS = 64, 8, 2
# The checkpoint folder's name becomes general.name/basename in the GGUF files.
CHECKPOINT_NAME = "tiny-qwen2-imatrix"
CHECKPOINT = {"arch": "qwen2", "dtype": "bf16", "seed": 0, "tied": True, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2}
# cpuq type -> (llama-quantize type, --pure). q4_k_m: Q4_K and Q6_K (attn_v/ffn_down of
# use_more_bits layers) with importance, tied token_embd Q6_K without (no entry); q5_0:
# a legacy type's importance path (quantize_row_q5_0_impl).
QUANTS = {"q4_k_m": ("Q4_K_M", False), "q5_0": ("Q5_0", True)}
LLAMA_CPP_PYTHON = "0.3.36"

PEER = Path(os.environ.get("CPUQ_PEER_HOME", Path.home() / ".cache" / "cpuq-peer"))
LLAMA_IMATRIX = PEER / "llama-imatrix"
LLAMA_QUANTIZE = PEER / "llama-quantize"
PEER_LIB = Path(os.environ.get("CPUQ_PEER_VENV", PEER / "venv")) / "lib" / "python3.11" / "site-packages" / "lib"


def tiny_checkpoint(where: str | os.PathLike) -> Path:
    """The golden's checkpoint, written into `where` (the same bytes on every call)."""
    return make_tiny_checkpoint(Path(where) / CHECKPOINT_NAME, **CHECKPOINT)


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(args: list, cwd: Path = ROOT) -> str:
    """Run a llama.cpp tool (arguments str()-ed) in `cwd`; its stdout and stderr."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "LD_LIBRARY_PATH": str(PEER_LIB)}, timeout=600)
    if r.returncode != 0:
        last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{Path(args[0]).name} failed (exit {r.returncode}): {last}")
    return r.stdout + r.stderr


def llama_imatrix(f16: Path, out: Path, text: str = TEXT_ARG, ctx: int = CTX, chunks: int = CHUNKS) -> Path:
    """llama-imatrix over `text` (a path, relative to ROOT or absolute, stored as given) in
    `chunks` windows of `ctx` tokens, to `out`."""
    _run([LLAMA_IMATRIX, "-m", f16, "-f", text, "-o", out, "-t", THREADS, "-c", ctx, "--chunks", chunks])
    return out


def llama_quantize(f16: Path, out: Path, qtype: str, imatrix: str = IMATRIX_ARG, cwd: Path = ROOT) -> str:
    """llama-quantize --imatrix `imatrix` (stored as given, relative to `cwd`) of `f16` to
    cpuq type `qtype`; returns the version line it prints."""
    ftype, pure = QUANTS[qtype]
    log = _run([LLAMA_QUANTIZE, *(["--pure"] if pure else []), "--imatrix", imatrix, f16, out, ftype, THREADS],
               cwd)
    found = re.search(r"^version: .*$", log, re.M)
    return found.group(0) if found else "unknown"


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_imatrix_golden.py takes none")
    sys.path.insert(0, str(ROOT))
    import cpuq

    for tool in (LLAMA_IMATRIX, LLAMA_QUANTIZE):
        if not tool.exists():
            raise ToolError(f"{tool}: not built; run tools/peer_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f16 = cpuq.convert(tiny_checkpoint(tmp), tmp / "f16.gguf", "f16")
        # The new imatrix lives in a stand-in root until the end, so llama-quantize still reads
        # (and stores) the path IMATRIX_ARG while the committed golden stays whole on failure.
        stand_in = tmp / "root"
        (stand_in / IMATRIX_ARG).parent.mkdir(parents=True)
        new_imatrix = llama_imatrix(f16, stand_in / IMATRIX_ARG)
        quants, version = {}, None
        for qtype in QUANTS:
            out = tmp / f"{qtype}.gguf"
            version = llama_quantize(f16, out, qtype, cwd=stand_in)
            quants[qtype] = {"llama_quantize_type": QUANTS[qtype][0], "pure": QUANTS[qtype][1],
                             "sha256": sha256(out), "bytes": out.stat().st_size}
            print(qtype, quants[qtype])
        golden = {
            "checkpoint": {"name": CHECKPOINT_NAME, **CHECKPOINT},
            "f16_sha256": sha256(f16),
            "text": TEXT_ARG, "ctx": CTX, "chunks": CHUNKS, "threads": THREADS,
            "imatrix": IMATRIX_ARG, "imatrix_sha256": sha256(new_imatrix),
            "quantized": quants,
            "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp": version,
        }
        with output_file(ROOT / IMATRIX_ARG) as part:
            shutil.copyfile(new_imatrix, part)
    with output_file(GOLDEN_JSON) as part:
        part.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {ROOT / IMATRIX_ARG} and {GOLDEN_JSON}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
