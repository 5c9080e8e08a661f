"""cpuq.convert on mixture-of-experts checkpoints (qwen3moe, qwen2moe) against llama.cpp
itself: the same tiny HF checkpoint converted by cpuq and by llama.cpp gives byte-identical
GGUF files for f16, q8_0 and q4_k_m (header, every key/value, tensor infos, data, padding).

References, as in test_convert_peer.py (whose helpers this file uses):
* f16 and q8_0: the vendored `convert_hf_to_gguf.py --outtype X` (it stacks the experts,
  Qwen2MoeModel.modify_tensors, and splits a fused gate_up_proj);
* q4_k_m: `convert_hf_to_gguf.py --outtype f16`, then llama-quantize's Q4_K_M mix (not
  pure), whose MoE rules are the subject here (llama_tensor_get_type: with 8 experts
  attn_v and attn_k go to Q8_0 and attn_output to Q5_K; ffn_down_exps and ffn_down_shexp
  count as ffn_down; the routers stay F32).

The cases cover both architectures in both expert layouts (one matrix per expert, and the
fused mlp.experts.gate_up_proj / down_proj stacks), 8 experts (qwen3moe's default, the bumps
above) and 6 (qwen2moe's default, none of them), row length 256 (the stacks in Q4_K and Q6_K
proper) and 64 (their shape fallbacks), and sharded checkpoints, since the converter writes
a layer's stacks when it reads that layer's last expert matrix, which a shard boundary can
separate from the first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import cpuq
from make_tiny_checkpoint import make_tiny_checkpoint
from tests.convert.test_convert_peer import _first_difference, llama_cpp_convert, llama_cpp_quantize

pytestmark = pytest.mark.peer

WIDE = {"hidden_size": 256, "moe_intermediate_size": 256}
# name -> (arch, make_tiny_checkpoint keyword arguments); bf16, as released checkpoints are.
CASES: dict[str, tuple[str, dict]] = {
    # 8 experts, row length 256 everywhere (4 heads of 64: attn_output's input too)
    "qwen3moe": ("qwen3moe", {**WIDE, "head_dim": 64, "seed": 11}),
    "qwen3moe_fused_sharded": ("qwen3moe", {"fused_experts": True, "sharded": True, "seed": 12}),
    "qwen2moe_fused": ("qwen2moe", {**WIDE, "shared_expert_intermediate_size": 256, "fused_experts": True,
                                    "tied": False, "seed": 13}),                   # 6 experts
    "qwen2moe_sharded": ("qwen2moe", {"sharded": True, "num_hidden_layers": 3, "seed": 14}),
}
QTYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def made(module_tmp_factory):
    """Each case's checkpoint and llama.cpp's files of it, built once on first use:
    name -> {"src": dir, qtype: llama.cpp's file}."""
    built: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in built:
            where = module_tmp_factory.mktemp(name)
            arch, kwargs = CASES[name]
            # the directory name feeds general.name, so both converters see the same one
            src = make_tiny_checkpoint(where / f"tiny-{name}", arch=arch, dtype="bf16", **kwargs)
            f16 = llama_cpp_convert(src, where / "llama-f16.gguf", "f16")
            built[name] = {"src": src, "f16": f16, "q8_0": llama_cpp_convert(src, where / "llama-q8_0.gguf", "q8_0"),
                           "q4_k_m": llama_cpp_quantize(f16, where / "llama-q4_k_m.gguf", "Q4_K_M", pure=False)}
        return built[name]
    return get


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_moe_same_bytes_as_llama_cpp(name, qtype, made, tmp_path):
    files = made(name)
    ours = cpuq.convert(files["src"], tmp_path / "cpuq.gguf", qtype).read_bytes()
    theirs = files[qtype].read_bytes()
    assert ours == theirs, f"{name} {qtype}: {_first_difference(ours, theirs)}"


def test_cases_exercise_the_expert_count_rules(made):
    """The Q4_K_M files really take the branches the cases are for: with 8 experts attn_v
    is Q8_0 and attn_output Q5_K (llama-quantize's bumps), with 6 neither; at row length 256
    the expert stacks are K-quants, not a fallback. Read from llama.cpp's own files."""
    def types(name):
        with cpuq.open_gguf(made(name)["q4_k_m"]) as f:
            return {t.name: t.qtype.name for t in f}
    eight, six = types("qwen3moe"), types("qwen2moe_fused")
    assert (eight["blk.0.attn_v.weight"], eight["blk.0.attn_output.weight"]) == ("Q8_0", "Q5_K")
    assert six["blk.0.attn_v.weight"] != "Q8_0" and six["blk.0.attn_output.weight"] != "Q5_K"
    for t in (eight, six):
        assert t["blk.0.ffn_gate_exps.weight"] == "Q4_K" and t["blk.0.ffn_up_exps.weight"] == "Q4_K"
        assert t["blk.0.ffn_down_exps.weight"] in ("Q4_K", "Q6_K")
        assert t["blk.0.ffn_gate_inp.weight"] == "F32"
