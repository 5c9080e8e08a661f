"""tests/golden/hybrid_convert.json: the sha256 and size of llama.cpp's own f16, q8_0 and
q4_k_m files (convert_hf_to_gguf.py, then llama-quantize Q4_K_M, the mix) of small bf16
Gated-DeltaNet hybrid checkpoints (qwen35, qwen35moe, qwen3next), so
tests/convert/test_convert_hybrid.py checks cpuq's files are byte-identical without llama.cpp.

    .venv/bin/python tools/make_hybrid_convert_golden.py

Needs the peer venvs, llama.cpp's source and llama-quantize (tools/peer_env.sh): CPUQ_HF_VENV
(torch + transformers, runs convert_hf_to_gguf.py), CPUQ_PEER_VENV (llama-cpp-python's
libraries). The checkpoints are rebuilt by the tests from the same arguments, which
make_tiny_checkpoint draws deterministically; the golden file keeps those arguments.

Imports the sibling tools (make_moe_golden does the work); runs torch and llama.cpp only in subprocesses.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_moe_golden as moe  # noqa: E402
from make_moe_golden import LLAMA_CPP, LLAMA_QUANTIZE  # noqa: E402
from make_runtime_golden import HF_PYTHON, PEER_PYTHON  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONVERT_OUT = ROOT / "tests" / "golden" / "hybrid_convert.json"

# Row length 256 where the Q4_K_M mix is the point (hidden 256, 4 heads of 64, value width
# 256): the matrices in Q4_K/Q6_K/Q8_0 proper rather than their shape fallbacks.
WIDE = {"hidden_size": 256, "head_dim": 64, "linear_value_head_dim": 64}
# name -> (arch, make_tiny_checkpoint keyword arguments); bf16, as released checkpoints are.
CONVERT_CASES: dict[str, tuple[str, dict]] = {
    # dense, 2 key / 4 value heads (the V-head reorder), a prediction block
    "qwen35_mtp": ("qwen35", {**WIDE, "dtype": "bf16", "seed": 51, "intermediate_size": 256,
                              "linear_num_key_heads": 2, "linear_num_value_heads": 4, "mtp": True}),
    # ForConditionalGeneration (vision tower skipped), 8 stacked experts (llama-quantize's 8-expert
    # bumps reach attn_qkv), a prediction block whose experts are stored one matrix each
    "qwen35moe_conditional_mtp": ("qwen35moe", {**WIDE, "dtype": "bf16", "seed": 52, "moe_intermediate_size": 256,
                                                "shared_expert_intermediate_size": 256, "conditional": True,
                                                "mtp": True, "tied": False}),
    # in_proj_qkvz / in_proj_ba, 6 experts one matrix each, 7 trunk blocks + 1 prediction block:
    # the attn_qkv/attn_v and ffn_down schedules count 8 blocks
    "qwen3next_mtp": ("qwen3next", {**WIDE, "dtype": "bf16", "seed": 53, "num_hidden_layers": 7, "num_experts": 6,
                                    "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
                                    "mtp": True, "tied": False}),
}
QTYPES = ("f16", "q8_0", "q4_k_m")


def build_convert_case(name: str, where: Path, cases: dict[str, tuple[str, dict]] = CONVERT_CASES) -> Path:
    """The checkpoint in a folder named tiny-<name>: the name becomes general.name."""
    return moe.build_convert_case(name, where, cases)


def convert_args(kwargs: dict) -> tuple[str, ...]:
    """convert_hf_to_gguf.py refuses a checkpoint without mtp.* tensors unless told --no-mtp."""
    return () if kwargs.get("mtp", False) else ("--no-mtp",)


def llama_cpp_files(src: Path, where: Path, mtp: bool) -> dict[str, Path]:
    """llama.cpp's f16, q8_0 and q4_k_m files of the checkpoint `src` (make_moe_golden's)."""
    return moe.llama_cpp_files(src, where, convert_args({"mtp": mtp}))


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_hybrid_convert_golden.py takes none")
    for python in (HF_PYTHON, PEER_PYTHON):
        if not python.is_file():
            raise ToolError(f"{python}: reference venv missing; run tools/peer_env.sh")
    for path in (LLAMA_CPP / "convert_hf_to_gguf.py", LLAMA_QUANTIZE):
        if not path.is_file():
            raise ToolError(f"{path}: missing; run tools/peer_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        converted = moe.convert_golden(Path(tmp), CONVERT_CASES, convert_args)
    with output_file(CONVERT_OUT) as part:
        part.write_text(json.dumps(converted, indent=2) + "\n")
    print(f"wrote {CONVERT_OUT}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
