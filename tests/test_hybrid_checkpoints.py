"""tools/make_tiny_checkpoint.py's Gated-DeltaNet hybrids (qwen35, qwen35moe, qwen3next): the
tensor names and shapes transformers' modeling files declare (written out here from
modeling_qwen3_5.py, modeling_qwen3_5_moe.py and modeling_qwen3_next.py, not derived from
the tool), the config.json keys of the published releases, the weight draws, determinism,
and that tests/golden/hybrid_logits.npz (tools/make_hybrid_golden.py) is what its recorded
cases rebuild. Loading in transformers and llama.cpp's converter were checked when the
tool was written (they need torch, which CI lacks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from make_hybrid_golden import CASES, IDS
from make_tiny_checkpoint import make_tiny_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden" / "hybrid_logits.npz"
SMALL = {"vocab_size": 512}  # the embedding is the bulk of a tiny checkpoint; shapes do not care


def read_header(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of every tensor in the folder's safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        out.update({n: (h["dtype"], tuple(h["shape"])) for n, h in header.items()})
    return out


def read_tensor(folder: Path, name: str) -> np.ndarray:
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])[name]
    assert h["dtype"] == "F32"
    start, end = h["data_offsets"]
    return np.frombuffer(raw[8 + n + start:8 + n + end], "<f4").reshape(h["shape"])


# Per layer kind, transformers' parameter names and shapes for the tiny defaults: hidden 64,
# 4 heads / 2 KV heads of 64 (q_proj twice as wide: query and output gate per head),
# linear heads of 16 with a conv kernel of 4.
def linear_attention(nk: int, nv: int, qwen3next: bool = False) -> dict[str, tuple[int, ...]]:
    conv = 2 * nk * 16 + nv * 16
    shapes = {"linear_attn.A_log": (nv,), "linear_attn.dt_bias": (nv,), "linear_attn.conv1d.weight": (conv, 1, 4),
              "linear_attn.norm.weight": (16,), "linear_attn.out_proj.weight": (64, nv * 16)}
    if qwen3next:
        shapes.update({"linear_attn.in_proj_qkvz.weight": (conv + nv * 16, 64),
                       "linear_attn.in_proj_ba.weight": (2 * nv, 64)})
    else:
        shapes.update({"linear_attn.in_proj_qkv.weight": (conv, 64), "linear_attn.in_proj_z.weight": (nv * 16, 64),
                       "linear_attn.in_proj_b.weight": (nv, 64), "linear_attn.in_proj_a.weight": (nv, 64)})
    return shapes


FULL_ATTENTION = {"self_attn.q_proj.weight": (512, 64), "self_attn.k_proj.weight": (128, 64),
                  "self_attn.v_proj.weight": (128, 64), "self_attn.o_proj.weight": (64, 256),
                  "self_attn.q_norm.weight": (64,), "self_attn.k_norm.weight": (64,)}
NORMS = {"input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,)}
DENSE_MLP = {"mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64), "mlp.down_proj.weight": (64, 128)}
SHARED = {"mlp.gate.weight": (8, 64), "mlp.shared_expert.gate_proj.weight": (64, 64),
          "mlp.shared_expert.up_proj.weight": (64, 64), "mlp.shared_expert.down_proj.weight": (64, 64),
          "mlp.shared_expert_gate.weight": (1, 64)}
FUSED = {**SHARED, "mlp.experts.gate_up_proj": (8, 64, 64), "mlp.experts.down_proj": (8, 64, 32)}
SPLIT = {**SHARED, **{f"mlp.experts.{e}.{p}_proj.weight": (32, 64) for e in range(8) for p in ("gate", "up")},
         **{f"mlp.experts.{e}.down_proj.weight": (64, 32) for e in range(8)}}


def expected(kind: str, mlp: dict, split_mtp: dict | None, prefix: str = "model.", tied: bool = True,
             nk: int = 4, nv: int = 4) -> dict[str, tuple[int, ...]]:
    out = {prefix + "embed_tokens.weight": (512, 64), prefix + "norm.weight": (64,)}
    for i in range(4):
        attn = FULL_ATTENTION if i == 3 else linear_attention(nk, nv, kind == "qwen3next")
        out.update({f"{prefix}layers.{i}.{n}": s for n, s in {**attn, **NORMS, **mlp}.items()})
    if not tied:
        out["lm_head.weight"] = (512, 64)
    if split_mtp is not None:  # one full-attention layer, experts one matrix per expert
        out.update({"mtp.fc.weight": (64, 128), "mtp.norm.weight": (64,), "mtp.pre_fc_norm_embedding.weight": (64,),
                    "mtp.pre_fc_norm_hidden.weight": (64,)})
        out.update({f"mtp.layers.0.{n}": s for n, s in {**FULL_ATTENTION, **NORMS, **split_mtp}.items()})
    return out


@pytest.mark.parametrize("arch, kwargs, want", [
    ("qwen35", {}, expected("qwen35", DENSE_MLP, None)),
    ("qwen35", {"mtp": True, "linear_num_key_heads": 2}, expected("qwen35", DENSE_MLP, DENSE_MLP, nk=2)),
    ("qwen35moe", {"tied": False}, expected("qwen35moe", FUSED, None, tied=False, nk=2)),
    ("qwen35moe", {"fused_experts": False, "mtp": True}, expected("qwen35moe", SPLIT, SPLIT, nk=2)),
    ("qwen35moe", {"mtp": True}, expected("qwen35moe", FUSED, SPLIT, nk=2)),
    ("qwen3next", {"tied": False, "mtp": True}, expected("qwen3next", SPLIT, SPLIT, tied=False, nk=2)),
    ("qwen3next", {"fused_experts": True}, expected("qwen3next", FUSED, None, nk=2)),
], ids=["qwen35", "qwen35-mtp-nk2", "qwen35moe", "qwen35moe-split-mtp", "qwen35moe-fused-mtp", "qwen3next-mtp",
        "qwen3next-fused"])
def test_tensor_names_and_shapes_are_transformers(tmp_path, arch, kwargs, want):
    got = read_header(make_tiny_checkpoint(tmp_path / "c", arch=arch, dtype="f32", **kwargs, **SMALL))
    assert {n: s for n, (_, s) in got.items()} == want
    assert {d for d, _ in got.values()} == {"F32"}


@pytest.mark.parametrize("arch, outer, vision", [("qwen35", "Qwen3_5ForConditionalGeneration", "qwen3_5_vision"),
                                                  ("qwen35moe", "Qwen3_5MoeForConditionalGeneration",
                                                   "qwen3_5_moe_vision")])
def test_conditional_layout(tmp_path, arch, outer, vision):
    src = make_tiny_checkpoint(tmp_path / "c", arch=arch, dtype="f32", conditional=True, tied=False, **SMALL)
    config = json.loads((src / "config.json").read_text())
    assert config["architectures"] == [outer] and config["model_type"] == arch.replace("35", "3_5").replace(
        "moe", "_moe")
    text = config["text_config"]
    # llama.cpp's converter would take a text_config's architectures for the model's; the real ones have none
    assert "architectures" not in text and text["model_type"].endswith("_text") and text["vocab_size"] == 512
    assert config["vision_config"]["model_type"] == vision and config["vision_config"]["out_hidden_size"] == 64
    names = read_header(src)
    mlp = DENSE_MLP if arch == "qwen35" else FUSED
    text_part = expected(arch, mlp, None, prefix="model.language_model.", tied=False, nk=4 if arch == "qwen35" else 2)
    assert {n: s for n, (_, s) in names.items() if not n.startswith("model.visual.")} == text_part
    visual = {n: s for n, (_, s) in names.items() if n.startswith("model.visual.")}
    assert visual["model.visual.patch_embed.proj.weight"] == (32, 3, 2, 4, 4)
    assert visual["model.visual.blocks.0.attn.qkv.weight"] == (96, 32)
    assert visual["model.visual.merger.linear_fc2.weight"] == (64, 128)
    assert len(visual) == 21  # patch embedding 2, positions 1, one block 12, merger 6


def test_config_keys_are_the_published_ones(tmp_path):
    c35 = json.loads((make_tiny_checkpoint(tmp_path / "a", arch="qwen35", **SMALL) / "config.json").read_text())
    # Qwen/Qwen3.5-0.8B text_config's keys (values shrunk)
    assert c35["architectures"] == ["Qwen3_5ForCausalLM"] and c35["model_type"] == "qwen3_5_text"
    assert c35["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] and c35["full_attention_interval"] == 4
    assert c35["attn_output_gate"] is True and c35["mtp_num_hidden_layers"] == 0
    rope = c35["rope_parameters"]
    assert rope["mrope_interleaved"] is True and rope["rope_theta"] == 10000000
    # the sections cover the rotated half-dimensions: 64 * 0.25 / 2
    assert sum(rope["mrope_section"]) * 2 == c35["head_dim"] * rope["partial_rotary_factor"]
    c8 = json.loads((make_tiny_checkpoint(tmp_path / "b", arch="qwen35", num_hidden_layers=8, mtp=True, **SMALL)
                     / "config.json").read_text())
    assert c8["layer_types"] == (["linear_attention"] * 3 + ["full_attention"]) * 2 and c8["mtp_num_hidden_layers"] == 1
    moe = json.loads((make_tiny_checkpoint(tmp_path / "c", arch="qwen35moe", **SMALL) / "config.json").read_text())
    assert moe["model_type"] == "qwen3_5_moe_text" and "intermediate_size" not in moe
    assert (moe["num_experts"], moe["num_experts_per_tok"], moe["shared_expert_intermediate_size"]) == (8, 2, 64)
    nxt = json.loads((make_tiny_checkpoint(tmp_path / "d", arch="qwen3next", **SMALL) / "config.json").read_text())
    # Qwen/Qwen3-Next-80B-A3B-Instruct: rope keys at the top level, no layer_types, no MTP count
    assert nxt["model_type"] == "qwen3_next" and "layer_types" not in nxt and "mtp_num_hidden_layers" not in nxt
    assert (nxt["rope_theta"], nxt["partial_rotary_factor"], nxt["norm_topk_prob"]) == (5000000, 0.25, True)


def test_weight_draws_fit_the_modules(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "c", arch="qwen35", dtype="f32", seed=3, **SMALL)
    la = "model.layers.0.linear_attn."
    a_log, dt_bias = read_tensor(src, la + "A_log"), read_tensor(src, la + "dt_bias")
    assert np.all((a_log >= 0) & (a_log <= np.log(16)))  # A in [1, 16]
    dt = np.log1p(np.exp(dt_bias))  # softplus
    assert np.all((dt > 0.9e-3) & (dt < 0.11))
    # zero-centred RMSNorms (x * (1 + w)) near 0; the gated norm (x * w) near 1
    assert abs(read_tensor(src, "model.layers.0.input_layernorm.weight").mean()) < 0.05
    assert abs(read_tensor(src, la + "norm.weight").mean() - 1) < 0.1
    w = read_tensor(src, la + "in_proj_qkv.weight")
    assert 0.8 / 8 < w.std() < 1.2 / 8  # N(0, 1 / fan_in), fan_in 64


def test_deterministic_in_the_seed(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", arch="qwen35moe", seed=7, mtp=True, conditional=True, **SMALL)
    b = make_tiny_checkpoint(tmp_path / "b", arch="qwen35moe", seed=7, mtp=True, conditional=True, **SMALL)
    c = make_tiny_checkpoint(tmp_path / "c", arch="qwen35moe", seed=8, mtp=True, conditional=True, **SMALL)
    for name in ("config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"arch": "qwen3", "mtp": True}, "mtp"),
    ({"arch": "qwen3next", "conditional": True}, "conditional"),
    ({"arch": "qwen35", "layer_types": ["full_attention"]}, "layer_types"),
    ({"arch": "qwen35", "linear_num_value_heads": 6, "linear_num_key_heads": 4}, "linear_num_value_heads"),
    ({"arch": "qwen35", "linear_key_head_dim": 0}, "linear_key_head_dim"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, fragment):
    from toolcli import ToolError
    with pytest.raises(ToolError, match=fragment):
        make_tiny_checkpoint(tmp_path / "c", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_the_golden_file_matches_its_cases():
    g = np.load(GOLDEN)
    assert g["ids"].tolist() == IDS and len(IDS) == 80 and max(IDS) < 151643  # no special tokens
    assert json.loads(str(g["cases"])) == {k: [a, kw] for k, (a, kw) in CASES.items()}
    assert set(json.loads(str(g["versions"]))) == {"transformers", "torch"}
    for name in CASES:
        cols, hf, top1 = g[f"{name}/columns"], g[f"{name}/hf"], g[f"{name}/hf_top1"]
        assert hf.dtype == np.float32 and hf.shape == (80, len(cols)) and np.isfinite(hf).all()
        assert np.all(np.diff(cols) > 0) and np.isin(top1, cols).all()
        # HF's top-1 over the whole vocabulary is the largest of the kept columns too
        assert np.array_equal(cols[hf.argmax(1)], top1)
