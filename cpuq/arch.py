"""Model architectures cpuq knows: the frozen `ModelConfig` built from an HF config.json
or GGUF metadata through one field map, and the per-architecture config table (ArchSpec:
q/k bias, q/k norm, llama's q/k row permutation, the keys and defaults the converter
writes) that a reader can check line by line against llama.cpp's conversion/{qwen,llama}.py.
What a block holds and computes is the model file's (cpuq.models).

Imports only numpy, the standard library and cpuq.errors.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, InputError, UnsupportedError, abbreviated as _show


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one architecture's checkpoint and GGUF file."""
    gguf_arch: str            # general.architecture
    qkv_bias: bool            # q_proj/k_proj/v_proj carry a bias (qwen2)
    qk_norm: bool             # per-head RMSNorm on q and k (qwen3)
    permute_qk: bool          # llama: q/k rows interleaved for ggml's non-NEOX rope (LlamaModel.permute)
    # Whether the converter writes {arch}.attention.key_length/value_length: it does when
    # transformers' config class exposes `head_dim` (TextModel.set_gguf_parameters): Qwen3Config and
    # LlamaConfig do (transformers 5.x), Qwen2Config does only if config.json names it.
    head_dim_key: str         # "always" | "if_in_config"
    # Keys llama.cpp's LlamaModel.set_gguf_parameters adds after the common ones.
    writes_vocab_size: bool
    writes_rope_dimension_count: bool
    # transformers config-class defaults, used where config.json omits a key (the
    # converter reads AutoConfig.to_dict() in ModelBase.load_hparams).
    default_rope_theta: float
    default_rms_eps: float
    default_context_length: int
    default_head_dim: int | None  # None: hidden_size // num_attention_heads
    # Mixture of experts (cpuq.models.moe): every block's MLP is routed experts; a shared
    # expert gated by sigmoid (qwen2moe); the top-k weights renormalized to sum 1 (llama.cpp's
    # build_moe_ffn norm_w: true for qwen3moe, false for qwen2moe, whatever config.json says).
    moe: bool = False
    shared_expert: bool = False
    norm_topk: bool = False
    # Hybrids (cpuq.models.hybrid): Gated DeltaNet layers among gated full-attention ones.
    # v_tiled: the converter reorders the DeltaNet's value heads so that value head h reads
    # key head h % n_group (qwen35, qwen35moe: _LinearAttentionVReorderBase); else HF's
    # grouped order, h // (n_v / n_group) (qwen3next). fused_inputs: the checkpoint fuses
    # the DeltaNet's input projections (qwen3next's in_proj_qkvz, cut into attn_qkv and
    # attn_gate by the converter, and in_proj_ba, kept whole as ssm_ba).
    hybrid: bool = False
    v_tiled: bool = False
    fused_inputs: bool = False

    @property
    def dense_ffn(self) -> bool:
        return not self.moe

    @property
    def split_inputs(self) -> bool:
        return self.hybrid and not self.fused_inputs


# HF `architectures[0]` -> spec (the names llama.cpp registers for Qwen2Model, Qwen3Model, LlamaModel).
ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen2ForCausalLM": ArchSpec("qwen2", qkv_bias=True, qk_norm=False, permute_qk=False,
                                 head_dim_key="if_in_config", writes_vocab_size=False,
                                 writes_rope_dimension_count=False, default_rope_theta=10000.0,
                                 default_rms_eps=1e-6, default_context_length=32768, default_head_dim=None),
    "Qwen3ForCausalLM": ArchSpec("qwen3", qkv_bias=False, qk_norm=True, permute_qk=False,
                                 head_dim_key="always", writes_vocab_size=False,
                                 writes_rope_dimension_count=False, default_rope_theta=10000.0,
                                 default_rms_eps=1e-6, default_context_length=32768, default_head_dim=128),
    "LlamaForCausalLM": ArchSpec("llama", qkv_bias=False, qk_norm=False, permute_qk=True,
                                 head_dim_key="always", writes_vocab_size=True,
                                 writes_rope_dimension_count=True, default_rope_theta=10000.0,
                                 default_rms_eps=1e-6, default_context_length=2048, default_head_dim=None),
    # Qwen2MoeModel, Qwen3MoeModel (conversion/qwen.py): TextModel's keys, then the expert sizes.
    "Qwen2MoeForCausalLM": ArchSpec("qwen2moe", qkv_bias=True, qk_norm=False, permute_qk=False,
                                    head_dim_key="if_in_config", writes_vocab_size=False,
                                    writes_rope_dimension_count=False, default_rope_theta=10000.0,
                                    default_rms_eps=1e-6, default_context_length=32768, default_head_dim=None,
                                    moe=True, shared_expert=True, norm_topk=False),
    "Qwen3MoeForCausalLM": ArchSpec("qwen3moe", qkv_bias=False, qk_norm=True, permute_qk=False,
                                    head_dim_key="always", writes_vocab_size=False,
                                    writes_rope_dimension_count=False, default_rope_theta=10000.0,
                                    default_rms_eps=1e-6, default_context_length=32768, default_head_dim=128,
                                    moe=True, shared_expert=False, norm_topk=True),
}
# The hybrids (Qwen3NextModel, Qwen3_5TextModel, Qwen3_5MoeTextModel in conversion/qwen.py):
# the text part of the vision-language classes too. Experts always renormalized and the
# shared expert gated (build_moe_ffn's norm_w is true in qwen3next.cpp and qwen35moe.cpp).
_HYBRID = dict(qkv_bias=False, qk_norm=True, permute_qk=False, head_dim_key="always", writes_vocab_size=False,
               writes_rope_dimension_count=False, default_rope_theta=10000.0, default_rms_eps=1e-6,
               default_context_length=32768, default_head_dim=256, hybrid=True)
_QWEN35 = ArchSpec("qwen35", **_HYBRID, v_tiled=True)
_QWEN35MOE = ArchSpec("qwen35moe", **_HYBRID, v_tiled=True, moe=True, shared_expert=True, norm_topk=True)
ARCHITECTURES.update({
    "Qwen3_5ForCausalLM": _QWEN35,
    "Qwen3_5ForConditionalGeneration": _QWEN35,
    "Qwen3_5MoeForCausalLM": _QWEN35MOE,
    "Qwen3_5MoeForConditionalGeneration": _QWEN35MOE,
    "Qwen3NextForCausalLM": ArchSpec("qwen3next", **_HYBRID, fused_inputs=True, moe=True, shared_expert=True,
                                     norm_topk=True),
})

MAX_U32 = 2**32 - 1
# rope_scaling keys that hold numbers (TextModel.set_gguf_parameters, LlamaModel.generate_extra_tensors).
ROPE_NUMBERS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                "extrapolation_factor", "attention_factor", "attn_factor", "beta_fast", "beta_slow")


# llama3 rope_scaling's keys and their defaults where absent (LlamaModel.generate_extra_tensors).
LLAMA3_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def _finite_number(v: Any) -> bool:
    """A finite int or float (not a bool); an int too big for a float is not."""
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters of one model, whatever file they came from."""
    arch: str                 # GGUF architecture name: "qwen2", "qwen3", "llama", "qwen2moe", "qwen3moe"
    hf_architecture: str      # e.g. "Qwen2ForCausalLM"
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    rope_theta: float
    context_length: int
    tied_embeddings: bool
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # normalised rope_parameters, sorted items
    head_dim_in_config: bool = False  # config (as transformers sees it) names head_dim
    # Mixture of experts (0 for a dense model): experts per block, experts each token uses,
    # an expert's intermediate size, the shared expert's (qwen2moe).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    # Hybrids (0 / empty otherwise): rotary dimensions of a head (0: all of it), the
    # DeltaNet's conv kernel, key head size, key (group) heads, value heads and value width
    # (value heads x value head size), llama.cpp's ssm_* names; per block whether it is a
    # DeltaNet (recurrent) one; the rope sections (mrope; text positions make them plain
    # rope); the multi-token-prediction blocks after the trunk (unused by the runtime).
    n_rot: int = 0
    ssm_d_conv: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 0
    ssm_dt_rank: int = 0
    ssm_d_inner: int = 0
    recurrent: tuple[bool, ...] = ()
    rope_sections: tuple[int, ...] = ()
    n_nextn: int = 0

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.hf_architecture]

    @property
    def rot_dim(self) -> int:
        """Rotary dimensions of a head (the first rot_dim of each)."""
        return self.n_rot or self.head_dim

    @property
    def q_gate_dim(self) -> int:
        """A gated attention's q projection: each head's query then its output gate."""
        return 2 * self.n_head * self.head_dim

    @property
    def ssm_head_v_dim(self) -> int:
        return self.ssm_d_inner // max(self.ssm_dt_rank, 1)

    @property
    def ssm_ba_dim(self) -> int:
        return 2 * self.ssm_dt_rank

    @property
    def ssm_conv_dim(self) -> int:
        """Channels of the DeltaNet's conv: q and k (n_group heads each), then v."""
        return 2 * self.ssm_n_group * self.ssm_d_state + self.ssm_d_inner

    def is_recurrent(self, il: int) -> bool:
        return bool(self.recurrent) and self.recurrent[il]

    @property
    def n_attention_layers(self) -> int:
        """Blocks with a KV cache (every block but a hybrid's DeltaNet ones)."""
        return self.n_layer - sum(self.recurrent)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """A position's keys and values in every attention block, itemsize bytes a number."""
        return 2 * self.n_attention_layers * self.n_head_kv * self.head_dim * itemsize

    @property
    def rope_type(self) -> str | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling).get("rope_type")

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelConfig":
        """Read `path` (config.json, or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: no such file (an HF checkpoint needs config.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: cannot read: {e}") from None
        try:
            cfg = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
            raise FormatError(f"{path}: not valid JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{path}: top level is not a JSON object")
        return cls.from_hf_dict(cfg, str(path))

    @classmethod
    def from_hf_dict(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        if isinstance(cfg.get("text_config"), dict):  # TextModel.__init__ merges it into the root
            cfg = {**cfg, **cfg["text_config"]}
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise FormatError(f"{where}: key 'architectures' is missing or not a list of names")
        hf_arch = archs[0]
        spec = ARCHITECTURES.get(hf_arch)
        if spec is None:
            raise UnsupportedError(f"{where}: architecture '{hf_arch}' is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")

        def get_int(key: str, default: int | None = None, minimum: int = 1) -> int:
            value = cfg.get(key)
            if value is None:
                if default is None:
                    raise FormatError(f"{where}: key '{key}' is missing")
                return default
            # The GGUF keys these become are 32-bit (and a count that size describes no real model).
            if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_U32:
                raise FormatError(f"{where}: key '{key}' is {_show(value)}, expected an integer from {minimum} "
                                  f"to {MAX_U32}")
            return value

        def get_float(key: str, default: float, value: Any = None) -> float:
            value = cfg.get(key) if value is None else value
            if value is None:
                return default
            if not _finite_number(value) or value <= 0:
                raise FormatError(f"{where}: key '{key}' is {_show(value)}, expected a positive number")
            return float(value)

        n_embd = get_int("hidden_size")
        n_head = get_int("num_attention_heads")
        n_head_kv = get_int("num_key_value_heads", n_head)
        head_dim_in_config = cfg.get("head_dim") is not None
        head_dim = get_int("head_dim", spec.default_head_dim or n_embd // n_head)
        if n_head % n_head_kv:
            raise FormatError(f"{where}: num_attention_heads {n_head} is not a multiple of "
                              f"num_key_value_heads {n_head_kv}")
        if spec.permute_qk and head_dim % 2:
            raise FormatError(f"{where}: head_dim {head_dim} is odd; rope needs an even head size")

        rope = cfg.get("rope_parameters", cfg.get("rope_scaling")) or {}
        if not isinstance(rope, dict):
            raise FormatError(f"{where}: key 'rope_scaling' is {_show(rope)}, expected an object")
        rope = dict(rope)
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        rope_theta = get_float("rope_theta", spec.default_rope_theta, theta)
        rope.pop("rope_theta", None)
        rope.pop("type", None)
        if spec.hybrid:  # partial rotary and mrope keys, which text positions leave plain rope
            partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
            sections = rope.pop("mrope_section", None)
            rope.pop("mrope_interleaved", None)
        rope_type = rope.get("rope_type")
        if rope_type in (None, "default"):
            rope_scaling = None
        else:
            if rope_type not in ROPE_SCALING_TYPES:
                raise UnsupportedError(f"{where}: rope scaling type {_show(rope_type)} is not supported "
                                       f"(supported: default, {', '.join(ROPE_SCALING_TYPES)})")
            # The converter computes with these (and writes factor and the original context to GGUF).
            for k in ROPE_NUMBERS:
                v = rope.get(k)
                if v is not None and not _finite_number(v):
                    raise FormatError(f"{where}: rope_scaling '{k}' is {_show(v)}, expected a number")
            if rope.get("factor") is not None and rope["factor"] <= 0:
                raise FormatError(f"{where}: rope_scaling 'factor' is {rope['factor']!r}, expected a positive number")
            original = rope.get("original_max_position_embeddings")
            if original is not None and not (float(original).is_integer() and 1 <= original <= MAX_U32):
                raise FormatError(f"{where}: rope_scaling 'original_max_position_embeddings' is {original!r}, "
                                  f"expected an integer from 1 to {MAX_U32}")
            if rope_type == "yarn" and rope.get("factor") is not None and original is None:  # llama.cpp needs it
                raise FormatError(f"{where}: yarn rope_scaling lacks 'original_max_position_embeddings'")
            if rope_type == "llama3":  # llama3_rope_freqs divides by these, and by their difference
                values = {k: rope.get(k, d) for k, d in LLAMA3_ROPE_DEFAULTS.items()}
                for k, v in values.items():
                    if v is None:
                        raise FormatError(f"{where}: llama3 rope_scaling '{k}' is null, expected a number")
                low, high = values["low_freq_factor"], values["high_freq_factor"]
                if not 0 < low < high:
                    raise FormatError(f"{where}: llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor, "
                                      f"not {low!r} and {high!r}")
            rope_scaling = tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (dict, list))))

        n_layer = get_int("num_hidden_layers")
        hybrid = {}
        if spec.hybrid:
            hybrid = _hybrid_from_hf(cfg, where, get_int, head_dim, n_layer, partial, sections)

        experts = {}
        if spec.moe:
            # the names llama.cpp's find_hparam tries, in its order
            key = next((k for k in ("num_local_experts", "num_experts") if cfg.get(k) is not None), "num_experts")
            experts = dict(n_expert=get_int(key), n_expert_used=get_int("num_experts_per_tok"),
                           n_ff_exp=get_int("moe_intermediate_size"))
            if spec.shared_expert:
                experts["n_ff_shexp"] = get_int("shared_expert_intermediate_size")
            if experts["n_expert_used"] > experts["n_expert"]:
                raise FormatError(f"{where}: num_experts_per_tok {experts['n_expert_used']} is more than the "
                                  f"{experts['n_expert']} experts")
            # llama.cpp's graphs route every block; HF can make some blocks dense
            if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
                raise UnsupportedError(f"{where}: dense blocks among the expert blocks (decoder_sparse_step "
                                       f"{_show(cfg.get('decoder_sparse_step', 1))}, mlp_only_layers "
                                       f"{_show(cfg.get('mlp_only_layers'))}) are not supported")

        return cls(
            arch=spec.gguf_arch, hf_architecture=hf_arch,
            n_vocab=get_int("vocab_size"), n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=get_int("intermediate_size", 0 if spec.moe else None),  # MoE hybrids have none
            rms_eps=get_float("rms_norm_eps", spec.default_rms_eps), rope_theta=rope_theta,
            context_length=get_int("max_position_embeddings", spec.default_context_length),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling, head_dim_in_config=head_dim_in_config, **experts, **hybrid,
        )

    @classmethod
    def from_gguf(cls, f: Any) -> "ModelConfig":
        """From an open GGUF file's metadata (cpuq.gguf_io.GGUFFile), as llama.cpp reads it
        (llama-model.cpp load_hparams): missing head_count_kv means no grouping, missing
        key_length means n_embd / n_head, rope scaling keys only when a type is named."""
        where = str(f.path)
        arch = f.require("general.architecture", str)
        hf_arch = next((name for name, spec in ARCHITECTURES.items() if spec.gguf_arch == arch), None)
        if hf_arch is None:
            supported = ", ".join(s.gguf_arch for s in ARCHITECTURES.values())
            raise UnsupportedError(f"{where}: architecture {_show(arch)} is not supported (supported: {supported})")
        spec = ARCHITECTURES[hf_arch]

        def get_int(key: str, default: int | None = None) -> int:
            value = f.get(f"{arch}.{key}")
            if value is None:
                if default is None:
                    raise FormatError(f"{where}: metadata key '{arch}.{key}' is missing")
                return default
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise FormatError(f"{where}: metadata key '{arch}.{key}' is {_show(value)}, "
                                  f"expected a positive integer")
            return int(value)

        def get_float(key: str, default: float) -> float:
            value = f.get(f"{arch}.{key}")
            if value is None:
                return default
            if not _finite_number(value) or value <= 0:
                raise FormatError(f"{where}: metadata key '{arch}.{key}' is {_show(value)}, expected a positive number")
            return float(value)

        n_embd = get_int("embedding_length")
        n_head = get_int("attention.head_count")
        n_head_kv = get_int("attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise FormatError(f"{where}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        head_dim = get_int("attention.key_length", n_embd // n_head)
        if get_int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedError(f"{where}: key_length and value_length differ")
        n_rot = get_int("rope.dimension_count", head_dim)
        if spec.hybrid:  # partial rotary: the first n_rot dimensions of each head
            if n_rot > head_dim or n_rot % 2:
                raise FormatError(f"{where}: metadata key '{arch}.rope.dimension_count' is {n_rot}, expected an "
                                  f"even number up to the head size {head_dim}")
        elif n_rot != head_dim or head_dim % 2:
            raise UnsupportedError(f"{where}: rope over part of a head (rope.dimension_count "
                                   f"{get_int('rope.dimension_count', head_dim)}, head size {head_dim}) is not supported")
        tokens = f.array_length("tokenizer.ggml.tokens") if "tokenizer.ggml.tokens" in f.keys() else None
        n_vocab = get_int("vocab_size", tokens or None)
        rope_scaling = None
        rope_type = f.get(f"{arch}.rope.scaling.type")
        if rope_type not in (None, "none"):
            if rope_type not in ("linear", "yarn"):
                raise UnsupportedError(f"{where}: rope scaling type {_show(rope_type)} is not supported (linear, yarn)")
            rope = {"rope_type": rope_type, "factor": get_float("rope.scaling.factor", 1.0)}
            if rope_type == "yarn":
                rope["original_max_position_embeddings"] = get_int("rope.scaling.original_context_length")
                for key, hf_key in (("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                                    ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                    value = f.get(f"{arch}.rope.scaling.{key}")
                    if value is not None:
                        if not _finite_number(value):  # yarn_ext_factor < 0 means the default
                            raise FormatError(f"{where}: metadata key '{arch}.rope.scaling.{key}' is {_show(value)}, "
                                              f"expected a number")
                        rope[hf_key] = float(value)
            rope_scaling = tuple(sorted(rope.items()))
        experts = {}
        if spec.moe:  # llama.cpp: an expert's size defaults to feed_forward_length / expert_used_count
            n_expert, n_used = get_int("expert_count"), get_int("expert_used_count")
            if n_used > n_expert:
                raise FormatError(f"{where}: metadata key '{arch}.expert_used_count' is {n_used}, more than "
                                  f"the {n_expert} experts of '{arch}.expert_count'")
            n_ff_exp = (get_int("expert_feed_forward_length") if f.get(f"{arch}.expert_feed_forward_length") is not None
                        else max(1, get_int("feed_forward_length") // n_used))
            experts = dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp)
            if spec.shared_expert:
                experts["n_ff_shexp"] = get_int("expert_shared_feed_forward_length"
                                                if f.get(f"{arch}.expert_shared_feed_forward_length") is not None
                                                else "feed_forward_length")
        n_layer = get_int("block_count")
        hybrid = {}
        if spec.hybrid:
            hybrid = _hybrid_from_gguf(f, arch, where, get_int, head_dim, n_rot, n_layer)
            n_layer -= hybrid["n_nextn"]  # block_count counts the prediction blocks after the trunk
        return cls(
            arch=arch, hf_architecture=hf_arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=get_int("feed_forward_length", 0 if spec.moe else None),
            rms_eps=get_float("attention.layer_norm_rms_epsilon", spec.default_rms_eps),
            rope_theta=get_float("rope.freq_base", 10000.0),
            context_length=get_int("context_length", spec.default_context_length),
            tied_embeddings="output.weight" not in f.tensors, rope_scaling=rope_scaling, **experts, **hybrid,
        )

    def writes_head_dim(self) -> bool:
        return self.spec.head_dim_key == "always" or self.head_dim_in_config


# rope scaling types the converter handles (TextModel.set_gguf_parameters); "llama3" yields the
# rope_freqs.weight tensor instead of keys (LlamaModel.generate_extra_tensors).
ROPE_SCALING_TYPES = ("linear", "yarn", "longrope", "su", "dynamic", "llama3")


LAYER_TYPES = ("linear_attention", "full_attention")


def _check_linear_heads(where: str, n_group: int, dt_rank: int, d_inner: int, names: tuple[str, str, str]) -> None:
    if dt_rank % n_group:
        raise FormatError(f"{where}: {names[1]} {dt_rank} is not a multiple of {names[0]} {n_group}")
    if d_inner % dt_rank:
        raise FormatError(f"{where}: {names[2]} {d_inner} is not a multiple of {names[1]} {dt_rank}")


def _check_sections(where: str, key: str, sections: Any) -> tuple[int, ...]:
    if (not isinstance(sections, (list, tuple)) or not 1 <= len(sections) <= 4
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_U32
                   for v in sections) or not sum(sections)):
        raise FormatError(f"{where}: {key} is {_show(sections)}, expected 1 to 4 counts of rotary pairs")
    return tuple(int(v) for v in sections)


def _interval_pattern(n_layer: int, interval: int) -> tuple[bool, ...]:
    """Every interval-th block full attention, the others DeltaNet (HF's default layer_types)."""
    return tuple((i + 1) % interval != 0 for i in range(n_layer))


def _hybrid_from_hf(cfg: dict, where: str, get_int, head_dim: int, n_layer: int, partial: Any,
                    sections: Any) -> dict:
    """The hybrid fields of a ModelConfig from config.json (Qwen3_5TextConfig, Qwen3NextConfig)."""
    n_group, dt_rank = get_int("linear_num_key_heads"), get_int("linear_num_value_heads")
    d_inner = get_int("linear_value_head_dim") * dt_rank
    _check_linear_heads(where, n_group, dt_rank, d_inner,
                        ("linear_num_key_heads", "linear_num_value_heads", "linear value width"))
    if not _finite_number(partial) or not 0 < partial <= 1:
        raise FormatError(f"{where}: key 'partial_rotary_factor' is {_show(partial)}, expected a number in (0, 1]")
    n_rot = int(head_dim * partial)  # as the converter writes rope.dimension_count
    if n_rot < 2 or n_rot % 2:
        raise FormatError(f"{where}: head_dim {head_dim} x partial_rotary_factor {partial} gives {n_rot} rotary "
                          f"dimensions, expected an even number")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        recurrent = _interval_pattern(n_layer, get_int("full_attention_interval", 4))
    elif (not isinstance(layer_types, list) or len(layer_types) != n_layer
          or any(t not in LAYER_TYPES for t in layer_types)):
        raise FormatError(f"{where}: key 'layer_types' is {_show(layer_types)}, expected {n_layer} entries of "
                          f"{' or '.join(LAYER_TYPES)}")
    else:
        recurrent = tuple(t == "linear_attention" for t in layer_types)
    n_nextn = cfg.get("mtp_num_hidden_layers", 0)
    if isinstance(n_nextn, bool) or not isinstance(n_nextn, int) or not 0 <= n_nextn <= MAX_U32:
        raise FormatError(f"{where}: key 'mtp_num_hidden_layers' is {_show(n_nextn)}, expected a count")
    return dict(n_rot=n_rot, ssm_d_conv=get_int("linear_conv_kernel_dim"), ssm_d_state=get_int("linear_key_head_dim"),
                ssm_n_group=n_group, ssm_dt_rank=dt_rank, ssm_d_inner=d_inner, recurrent=recurrent,
                rope_sections=() if sections is None else _check_sections(where, "rope 'mrope_section'", sections),
                n_nextn=n_nextn)


def _hybrid_from_gguf(f: Any, arch: str, where: str, get_int, head_dim: int, n_rot: int, n_blocks: int) -> dict:
    """The hybrid fields from GGUF metadata (llama.cpp's llama_model_qwen35::load_arch_hparams)."""
    n_nextn = f.get(f"{arch}.nextn_predict_layers") or 0
    if isinstance(n_nextn, bool) or not isinstance(n_nextn, (int, np.integer)) or not 0 <= n_nextn < n_blocks:
        raise FormatError(f"{where}: metadata key '{arch}.nextn_predict_layers' is {_show(n_nextn)}, expected "
                          f"a count below block_count {n_blocks}")
    n_layer = n_blocks - int(n_nextn)
    n_group, dt_rank, d_inner = get_int("ssm.group_count"), get_int("ssm.time_step_rank"), get_int("ssm.inner_size")
    _check_linear_heads(where, n_group, dt_rank, d_inner,
                        (f"'{arch}.ssm.group_count'", f"'{arch}.ssm.time_step_rank'", f"'{arch}.ssm.inner_size'"))
    key = f"{arch}.attention.recurrent_layers"
    flags = f.get(key)
    if flags is None:
        recurrent = _interval_pattern(n_layer, get_int("full_attention_interval", 4))
    else:
        flags = list(flags) if isinstance(flags, (list, tuple, np.ndarray)) else flags
        if not isinstance(flags, list) or len(flags) != n_blocks or any(v not in (0, 1) for v in flags):
            raise FormatError(f"{where}: metadata key '{key}' is {_show(flags)}, expected {n_blocks} booleans")
        recurrent = tuple(bool(v) for v in flags[:n_layer])
    sections = f.get(f"{arch}.rope.dimension_sections")
    return dict(n_rot=n_rot, ssm_d_conv=get_int("ssm.conv_kernel"), ssm_d_state=get_int("ssm.state_size"),
                ssm_n_group=n_group, ssm_dt_rank=dt_rank, ssm_d_inner=d_inner, recurrent=recurrent,
                rope_sections=() if sections is None else _check_sections(  # a scalar is refused there
                    where, f"metadata key '{arch}.rope.dimension_sections'",
                    list(sections) if isinstance(sections, (list, tuple, np.ndarray)) else sections),
                n_nextn=int(n_nextn))
