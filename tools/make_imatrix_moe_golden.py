"""Golden per-expert importance matrices for the CI tests: llama.cpp's own llama-imatrix and
llama-quantize --imatrix (built by tools/peer_env.sh) on tiny deterministic qwen3moe and
qwen2moe checkpoints (tools/make_tiny_checkpoint.py, hidden and expert width 256 so every
expert stack is a k-quant), over tests/data/tempest.txt, so CI (without llama.cpp) checks
cpuq's MoE importance matrix, its file and convert --imatrix against them
(tests/convert/test_imatrix_moe.py).

    .venv/bin/python tools/make_imatrix_moe_golden.py   # tests/golden/imatrix_{arch}.gguf, imatrix_moe.json

Steps per architecture: the checkpoint (rebuilt identically by `moe_checkpoint`); cpuq's F32
conversion of it, which llama-imatrix reads: with F32 weights llama.cpp rounds only its KV
cache's products to F16, so a token picks another expert than cpuq's only where two router
logits all but tie (none at these windows: the per-expert counts agree exactly; from an F16
file about one pick in a thousand moves); cpuq's F16 conversion (what llama-quantize reads, as
convert_hf_to_gguf.py --outtype f16 writes it: tests/convert/test_convert_peer.py), then
llama-quantize --imatrix to Q4_K_M. As in make_imatrix_golden.py the tools run in the
repository root with relative paths, which they store as given. imatrix_moe.json holds, per
architecture, the checkpoint's arguments, the sha256 of the F32 and F16 files, of the
imatrix and of the quantized file, and the exact arguments.

Imports cpuq and the siblings make_tiny_checkpoint and make_imatrix_golden (the tools' runners).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_imatrix_golden import (LLAMA_CPP_PYTHON, LLAMA_IMATRIX, LLAMA_QUANTIZE, TEXT_ARG,  # noqa: E402
                                 llama_imatrix, llama_quantize, sha256)
from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

GOLDEN_JSON = ROOT / "tests" / "golden" / "imatrix_moe.json"
CTX, CHUNKS = 128, 4
QTYPE = "q4_k_m"  # make_imatrix_golden.QUANTS' key: llama-quantize Q4_K_M, not --pure
# The checkpoint folder's name becomes general.name/basename in the GGUF files. qwen3moe:
# 8 experts (llama-quantize's n_expert == 8 bumps), tied embeddings; qwen2moe: 6 experts and
# the gated shared expert, untied (llama.cpp's qwen2moe requires output.weight).
CHECKPOINTS = {
    "qwen3moe": {"name": "tiny-qwen3moe-imatrix", "arch": "qwen3moe", "dtype": "bf16", "seed": 0, "tied": True,
                 "hidden_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 2},
    "qwen2moe": {"name": "tiny-qwen2moe-imatrix", "arch": "qwen2moe", "dtype": "bf16", "seed": 0, "tied": False,
                 "hidden_size": 256, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
                 "num_hidden_layers": 2},
}


def imatrix_arg(arch: str) -> str:
    """The golden imatrix's path relative to ROOT, as the tools are given it (and store it)."""
    return f"tests/golden/imatrix_{arch}.gguf"


def moe_checkpoint(arch: str, where: str | Path) -> Path:
    """The golden's checkpoint of `arch`, written into `where` (the same bytes on every call)."""
    args = dict(CHECKPOINTS[arch])
    return make_tiny_checkpoint(Path(where) / args.pop("name"), **args)


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_imatrix_moe_golden.py takes none")
    sys.path.insert(0, str(ROOT))
    import cpuq

    for tool in (LLAMA_IMATRIX, LLAMA_QUANTIZE):
        if not tool.exists():
            raise ToolError(f"{tool}: not built; run tools/peer_env.sh")
    golden, new_files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        version = None
        for arch in CHECKPOINTS:
            ckpt = moe_checkpoint(arch, tmp / arch)
            f32 = cpuq.convert(ckpt, tmp / f"{arch}-f32.gguf", "f32")
            f16 = cpuq.convert(ckpt, tmp / f"{arch}-f16.gguf", "f16")
            # A stand-in root until the end, so llama-quantize reads (and stores) the path
            # imatrix_arg(arch) while the committed golden stays whole on failure.
            stand_in = tmp / "root"
            (stand_in / imatrix_arg(arch)).parent.mkdir(parents=True, exist_ok=True)
            new = llama_imatrix(f32, stand_in / imatrix_arg(arch), TEXT_ARG, CTX, CHUNKS)
            out = tmp / f"{arch}-{QTYPE}.gguf"
            version = llama_quantize(f16, out, QTYPE, imatrix=imatrix_arg(arch), cwd=stand_in)
            golden[arch] = {
                "checkpoint": CHECKPOINTS[arch],
                "f32_sha256": sha256(f32), "f16_sha256": sha256(f16),
                "imatrix": imatrix_arg(arch), "imatrix_sha256": sha256(new),
                "quantized": {QTYPE: {"llama_quantize_type": "Q4_K_M", "sha256": sha256(out),
                                      "bytes": out.stat().st_size}},
            }
            print(arch, golden[arch]["quantized"])
            new_files[arch] = tmp / f"{arch}-imatrix.gguf"
            shutil.copyfile(new, new_files[arch])
        golden = {"text": TEXT_ARG, "ctx": CTX, "chunks": CHUNKS, "archs": golden,
                  "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp": version}
        for arch, path in new_files.items():
            with output_file(ROOT / imatrix_arg(arch)) as part:
                shutil.copyfile(path, part)
    with output_file(GOLDEN_JSON) as part:
        part.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {', '.join(imatrix_arg(a) for a in CHECKPOINTS)} and {GOLDEN_JSON.relative_to(ROOT)}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
