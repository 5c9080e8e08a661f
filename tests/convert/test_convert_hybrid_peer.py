"""cpuq.convert on the Gated-DeltaNet hybrids (qwen35, qwen35moe, qwen3next) against llama.cpp
itself: the same tiny HF checkpoint converted by cpuq and by llama.cpp gives byte-identical
GGUF files for f16, q8_0 and q4_k_m (header, every key/value, tensor infos, data, padding).

References (tools/make_hybrid_convert_golden.llama_cpp_files):
* f16 and q8_0: the vendored `convert_hf_to_gguf.py --outtype X` (Qwen3NextModel,
  Qwen3_5TextModel, Qwen3_5MoeTextModel: ssm_a = -exp(A_log), the +1 norms, the V-head
  reorder, in_proj_qkvz cut into attn_qkv and attn_gate, mtp.* as nextn blocks, the vision
  tower skipped); `--no-mtp` for checkpoints without mtp.* tensors, which it otherwise refuses;
* q4_k_m: that f16 file through llama-quantize's Q4_K_M mix (ssm_conv1d and the routers left
  F32, attn_qkv counted with attn_v, the schedules over every block, prediction blocks too).

The cases: the golden file's three (row length 256, with prediction blocks) and small ones
at row length 64 (the mix's shape fallbacks): the ForConditionalGeneration layout sharded
and without mtp, Qwen3.5-MoE with one matrix per expert, Qwen3-Next with stacked experts,
and a Qwen3.5 whose config names its own layer_types and interval and no rope sections
(the [11, 11, 10, 0] default).
"""
from __future__ import annotations

from pathlib import Path

import pytest

import cpuq
from make_hybrid_convert_golden import CONVERT_CASES, build_convert_case, llama_cpp_files
from make_runtime_golden import HF_PYTHON
from make_moe_golden import LLAMA_CPP, LLAMA_QUANTIZE
from tests.convert.test_convert_peer import _first_difference

pytestmark = pytest.mark.peer

CASES: dict[str, tuple[str, dict]] = {
    **CONVERT_CASES,
    "qwen35_conditional_sharded": ("qwen35", {"dtype": "bf16", "seed": 61, "conditional": True, "sharded": True}),
    "qwen35moe_split_mtp": ("qwen35moe", {"dtype": "bf16", "seed": 62, "fused_experts": False, "num_experts": 6,
                                          "mtp": True}),
    "qwen3next_fused_sharded": ("qwen3next", {"dtype": "bf16", "seed": 63, "fused_experts": True, "sharded": True}),
    "qwen35_own_layer_types": ("qwen35", {"dtype": "bf16", "seed": 64, "full_attention_interval": 2,
                                          "layer_types": ["linear_attention", "full_attention"] * 2,
                                          "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000000,
                                                              "rope_type": "default"}}),
}
QTYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def made(module_tmp_factory):
    """Each case's checkpoint and llama.cpp's files of it, built once on first use."""
    for path, what in ((HF_PYTHON, "torch+transformers venv"), (LLAMA_CPP / "convert_hf_to_gguf.py", "llama.cpp"),
                       (LLAMA_QUANTIZE, "llama-quantize")):
        if not path.exists():
            pytest.skip(f"{path} missing ({what}; tools/peer_env.sh)")
    built: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in built:
            where = module_tmp_factory.mktemp(name)
            src = build_convert_case(name, where, CASES)
            built[name] = {"src": src, **llama_cpp_files(src, where, CASES[name][1].get("mtp", False))}
        return built[name]
    return get


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_same_bytes_as_llama_cpp(name, qtype, made, tmp_path):
    files = made(name)
    ours = cpuq.convert(files["src"], tmp_path / "cpuq.gguf", qtype).read_bytes()
    theirs = files[qtype].read_bytes()
    assert ours == theirs, f"{name} {qtype}: {_first_difference(ours, theirs)}"


def _types(path: Path) -> dict[str, str]:
    with cpuq.open_gguf(path) as f:
        return {t.name: t.qtype.name for t in f}


def test_cases_exercise_the_quantize_rules(made):
    """The Q4_K_M files take the branches the cases are for, read from llama.cpp's own files:
    attn_qkv is attn_v's category (Q8_0 with 8 experts; otherwise Q6_K/Q4_K by use_more_bits
    over all 8 blocks of qwen3next_mtp, 7 trunk + 1 prediction: block 5 gets Q4_K, which
    counting only the trunk would make Q6_K); ssm_conv1d and the routers stay F32; the
    DeltaNet's other matrices take the default type at row length 256."""
    moe = _types(made("qwen35moe_conditional_mtp")["q4_k_m"])
    assert moe["blk.0.attn_qkv.weight"] == "Q8_0" and moe["blk.3.attn_v.weight"] == "Q8_0"
    nxt = _types(made("qwen3next_mtp")["q4_k_m"])
    assert [nxt.get(f"blk.{i}.attn_qkv.weight", nxt.get(f"blk.{i}.attn_v.weight")) for i in range(8)] == \
        ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert nxt["blk.7.ffn_down_exps.weight"] == "Q6_K" and nxt["blk.5.ffn_down_exps.weight"] == "Q4_K"
    dense = _types(made("qwen35_mtp")["q4_k_m"])
    for t in (moe, nxt, dense):
        assert t["blk.0.ssm_conv1d.weight"] == "F32" and t["blk.0.ssm_a"] == "F32"
        assert t["blk.0.attn_gate.weight"] == "Q4_K" and t["blk.0.ssm_out.weight"] == "Q4_K"
    assert moe["blk.0.ffn_gate_inp.weight"] == "F32" and nxt["blk.0.ssm_ba.weight"] == "Q4_K"
    assert dense["blk.0.ssm_alpha.weight"] == "Q4_K" and dense["blk.4.nextn.eh_proj.weight"] == "Q4_K"
