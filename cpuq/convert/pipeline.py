"""The HF directory -> GGUF pipeline: validate the checkpoint against its config, choose each
tensor's type, and stream tensors one at a time (load float32 -> quantize -> write) into a
temporary file that is renamed into place only when complete.

For f32/f16/bf16/q8_0 the output is what llama.cpp's convert_hf_to_gguf.py writes (metadata
order, tensor order, types; docs/llama_cpp_conventions.md sections 1-3). The other types
are what `convert --outtype f16` followed by llama-quantize writes: q4_k_m with llama.cpp's
type mix (MIXES), the rest "pure" (one type for every matrix, `llama-quantize --pure`);
both with F16-rounded input, shape fallbacks, llama-quantize's tensor order and
file_type/quantization_version moved to the end (section 4); with an importance matrix,
llama-quantize --imatrix's bytes and keys (section 5).

Imports numpy, the standard library and cpuq (arch, quants, quants.floats, gguf_io, errors,
convert.safetensors_io, convert.hf_vocab, convert.naming, convert.imatrix,
convert.scaling); nothing from the runtime.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGUFValueType

from ..arch import ModelConfig
from ..models import dim, expected_tensors, family, ggml_shape, gguf_tensor_name
from ..models.dense import llama3_rope_freqs, permute_qk, qk_permute_heads
from ..errors import FormatError, InputError, UnsupportedError
from ..gguf_io import GGUFStreamWriter, partial_file
from ..quants import QType, get_qtype, quantize
from ..quants.floats import round_through_f16
from .hf_vocab import tokenizer_metadata
from . import scaling
from .imatrix import Imatrix
from .naming import general_name_keys
from .safetensors_io import open_checkpoint

# (checkpoint bytes done, checkpoint bytes in all, tensor being written); called as each
# tensor starts and after each piece of it.
Progress = Callable[[int, int, str], None]

GGML_QUANT_VERSION = 2  # gguf-py's constants.GGML_QUANT_VERSION

# One line for what a conversion leaves out on purpose; with no logging set up, Python's
# last-resort handler prints it (message only) on stderr.
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutType:
    """One --type value: the type of every quantizable matrix and what it writes."""
    qtype: str
    file_type: int            # general.file_type (llama.h LLAMA_FTYPE_*)
    via_llama_quantize: bool  # reference = convert --outtype f16 + llama-quantize (--pure unless a mix)
    mix: str | None = None    # a llama-quantize type mix (MIXES) instead of one type for all


# --type -> behaviour. file_type values: llama.h's enum llama_ftype; for the pure k-quants the
# value llama-quantize writes when asked for the _M mix with --pure (notes section 4.6).
OUT_TYPES: dict[str, OutType] = {
    "f32": OutType("F32", 0, False),
    "f16": OutType("F16", 1, False),
    "bf16": OutType("BF16", 32, False),
    "q8_0": OutType("Q8_0", 7, False),
    "q4_0": OutType("Q4_0", 2, True),
    "q5_0": OutType("Q5_0", 8, True),
    "q4_k": OutType("Q4_K", 15, True),
    "q5_k": OutType("Q5_K", 17, True),
    "q6_k": OutType("Q6_K", 18, True),
    "q4_k_m": OutType("Q4_K", 15, True, mix="q4_k_m"),
}


def use_more_bits(i: int, n: int) -> bool:
    """llama_tensor_get_type_impl's use_more_bits (C integer division; i >= n/8 wherever the modulo is taken)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# llama_tensor_get_type_impl for LLAMA_FTYPE_MOSTLY_Q4_K_M on Qwen2/Qwen3/Llama and the Qwen MoEs
# (src/llama-quant.cpp; notes section 4.4): GGUF name suffix -> type, where a pair
# (more, less) picks by use_more_bits over the layers. Everything else takes the default.
MIXES: dict[str, dict[str, str | tuple[str, str]]] = {
    "q4_k_m": {
        "output.weight": "Q6_K",                # its output branch (also a tied token_embd, see below)
        "attn_v.weight": ("Q6_K", "Q4_K"),      # its attn_v branch
        # a hybrid's DeltaNet input: category_is_attn_v, counted with attn_v (one of the two
        # per block, so the counter is the block index over block_count)
        "attn_qkv.weight": ("Q6_K", "Q4_K"),
        "ffn_down.weight": ("Q6_K", "Q4_K"),    # its ffn_down branch (every tensor named ffn_down*)
        "ffn_down_exps.weight": ("Q6_K", "Q4_K"),
        "ffn_down_shexp.weight": ("Q6_K", "Q4_K"),
    },
}
# ... and for a model of exactly 8 experts, whatever the layer (the n_expert == 8 branches).
EIGHT_EXPERTS: dict[str, dict[str, str]] = {
    "q4_k_m": {"attn_v.weight": "Q8_0", "attn_qkv.weight": "Q8_0", "attn_k.weight": "Q8_0",
               "attn_output.weight": "Q5_K"},
}

# Kept F32 whatever the type: the converter's SSM_CONV1D (ModelBase.prepare_tensors), which
# llama-quantize leaves as it is (tensor_allows_quantization).
FLOAT32_TENSORS = ("ssm_conv1d.weight",)

# Routers: the converter keeps them F32 (ModelBase.prepare_tensors' FFN_GATE_INP, _SHEXP);
# llama-quantize leaves only names containing "ffn_gate_inp.weight" (tensor_allows_quantization).
ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")

# llama-quantize's tensor_type_fallback (src/llama-quant.cpp) for a row length that
# is not a multiple of the wanted type's block; F16 if the fallback does not fit either.
SHAPE_FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# generation_config.json key -> (general.sampling.* key, GGUF type), in metadata.py's order.
SAMPLING_KEYS: tuple[tuple[tuple[str, ...], str, GGUFValueType], ...] = (
    (("sequence",), "general.sampling.sequence", GGUFValueType.STRING),
    (("top_k",), "general.sampling.top_k", GGUFValueType.INT32),
    (("top_p",), "general.sampling.top_p", GGUFValueType.FLOAT32),
    (("min_p",), "general.sampling.min_p", GGUFValueType.FLOAT32),
    (("xtc_probability",), "general.sampling.xtc_probability", GGUFValueType.FLOAT32),
    (("xtc_threshold",), "general.sampling.xtc_threshold", GGUFValueType.FLOAT32),
    (("temperature",), "general.sampling.temp", GGUFValueType.FLOAT32),
    (("penalty_last_n",), "general.sampling.penalty_last_n", GGUFValueType.INT32),
    (("penalty_repeat", "repetition_penalty"), "general.sampling.penalty_repeat", GGUFValueType.FLOAT32),
    (("mirostat",), "general.sampling.mirostat", GGUFValueType.INT32),
    (("mirostat_tau",), "general.sampling.mirostat_tau", GGUFValueType.FLOAT32),
    (("mirostat_eta",), "general.sampling.mirostat_eta", GGUFValueType.FLOAT32),
)


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str | None       # None for generated tensors (rope_freqs)
    name: str                 # GGUF name
    shape: tuple[int, ...]    # numpy order
    qtype: QType
    # An expert stack's rows, in order: (checkpoint tensor, first row, end row) of the
    # tensor seen as a matrix of its last dimension; None: hf_name whole.
    parts: tuple[tuple[str, int, int], ...] | None = None
    # A model file's conversion quirk on each piece of values read (models.hybrid.quirks).
    values: Callable[[np.ndarray], np.ndarray] | None = None

    def sources(self, ckpt) -> tuple[tuple[str, int, int], ...]:
        return self.parts if self.parts is not None else ((self.hf_name, 0, ckpt.rows(self.hf_name)),)


def out_type(qtype: str) -> OutType:
    t = OUT_TYPES.get(str(qtype).lower())
    if t is None:
        raise UnsupportedError(f"output type '{qtype}' is not supported (supported: {', '.join(OUT_TYPES)})")
    return t


def _mix_type(name: str, out: OutType, cfg: ModelConfig, tied: bool) -> str:
    mix = MIXES[out.mix]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return mix["output.weight"]
    m = re.match(r"blk\.(\d+)\.(.+)$", name)
    if m and cfg.n_expert == 8 and m.group(2) in EIGHT_EXPERTS[out.mix]:
        return EIGHT_EXPERTS[out.mix][m.group(2)]
    choice = mix.get(m.group(2)) if m else None
    if choice is None:
        return out.qtype
    if isinstance(choice, str):
        return choice
    # over every block, a hybrid's prediction blocks too (llama-quantize's n_layer_all)
    want = choice[0] if use_more_bits(int(m.group(1)), cfg.n_layer + cfg.n_nextn) else choice[1]
    # 70B-class models (80 layers; llama only with GQA) get Q5_K for attn_v (LLM_TYPE_70B in
    # llama_tensor_get_type_impl; load_arch_hparams of src/models/qwen2.cpp and llama.cpp).
    if (m.group(2) == "attn_v.weight" and want == "Q4_K" and cfg.n_layer == 80
            and (cfg.arch == "qwen2" or (cfg.arch == "llama" and cfg.n_head != cfg.n_head_kv))):
        want = "Q5_K"
    return want


def tensor_qtype(name: str, shape: tuple[int, ...], out: OutType, cfg: ModelConfig | None = None,
                 tied: bool = False) -> QType:
    """The converter's per-tensor choice (ModelBase.prepare_tensors), then (for the llama-quantize
    types) the type mix and llama-quantize's shape fallback."""
    if len(shape) <= 1 or name.endswith(("_norm.weight", *FLOAT32_TENSORS)) or not name.endswith(".weight"):
        return get_qtype("F32")
    if name.endswith(ROUTERS[0]) or (name.endswith(ROUTERS) and not out.via_llama_quantize):
        return get_qtype("F32")
    if out.mix is not None:
        want = get_qtype(_mix_type(name, out, cfg, tied))
        if want.name == "Q6_K" and (name == "output.weight" or name == "token_embd.weight") \
                and shape[-1] % get_qtype(out.qtype).block_size:
            want = get_qtype("Q8_0")  # the output branch: row not a multiple of the default type's block
    else:
        want = get_qtype(out.qtype)
    cols = shape[-1]
    if cols % want.block_size == 0:
        return want
    if not out.via_llama_quantize:
        return get_qtype("F16")  # gguf-py QuantError -> F16 (ModelBase.prepare_tensors)
    fallback = SHAPE_FALLBACK.get(want.name)
    if fallback is not None:
        try:
            fb = get_qtype(fallback)
        except UnsupportedError:
            raise UnsupportedError(f"tensor '{name}': row length {cols} needs llama.cpp's fallback type "
                                   f"{fallback}, which cpuq cannot write") from None
        if cols % fb.block_size == 0:
            return fb
    return get_qtype("F16")


def _quantize_order(name: str) -> tuple[int, bytes]:
    """llama-quantize's tensor order (llama_model_loader's weight_name_comparer): non-block tensors first,
    then blocks numerically, bytewise by name within each."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name.encode())


def _fused_layers(names, cfg: ModelConfig) -> dict[int, dict[str, str]]:
    """Layer -> {fused HF module: its name} for the layers whose experts come as stacks
    (models.moe.FUSED_EXPERTS; with or without .weight, as llama.cpp accepts); `names`: the
    checkpoint's tensor names as the converter reads them (canonical_names)."""
    fused: dict[int, dict[str, str]] = {}
    if not cfg.spec.moe:
        return fused
    for i in range(cfg.n_layer + cfg.n_nextn):
        found = {}
        for module in family(cfg).FUSED_EXPERTS:
            base = f"model.layers.{i}.{module}"
            found[module] = base + ".weight" if base + ".weight" in names else base
        if any(n in names for n in found.values()):  # then all of them (a missing one is reported)
            fused[i] = found
    return fused


def canonical_names(ckpt, cfg: ModelConfig) -> dict[str, str | None]:
    """Checkpoint name -> the name the converter reads it under (a hybrid's text model out of
    language_model., its mtp.* blocks after the trunk; models.hybrid.canonical_name), None
    for what it skips (a vision tower)."""
    model = family(cfg)
    if not hasattr(model, "canonical_name"):
        return {n: n for n in ckpt.names}
    return {n: model.canonical_name(n, cfg.n_layer) for n in ckpt.names}


def checkpoint_config(ckpt, cfg: ModelConfig, where: Path) -> ModelConfig:
    """cfg with the prediction blocks the checkpoint holds (llama.cpp counts mtp.layers.* where
    config.json has no mtp_num_hidden_layers, Qwen3-Next's); a checkpoint without them
    converts without them (llama.cpp's --no-mtp)."""
    model = family(cfg)
    if not hasattr(model, "nextn_count"):
        return cfg
    found = model.nextn_count(ckpt.names)
    if found > len(ckpt.names):  # before expected_tensors lists a lying index's blocks
        raise FormatError(f"{where}: the checkpoint names prediction block mtp.layers.{found - 1}, more blocks "
                          f"than its {len(ckpt.names)} tensors can hold")
    if found and cfg.n_nextn and found != cfg.n_nextn:
        raise FormatError(f"{where}: config.json says mtp_num_hidden_layers {cfg.n_nextn}, the checkpoint "
                          f"holds {found} (mtp.layers.*)")
    return replace(cfg, n_nextn=found)


def plan_tensors(ckpt, cfg: ModelConfig, out: OutType, where: Path) -> list[TensorPlan]:
    """Check the checkpoint holds exactly the tensors `cfg` implies, and lay out the output."""
    model = family(cfg)
    canonical = canonical_names(ckpt, cfg)
    raw_of = {c: n for n, c in canonical.items() if c is not None}
    prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in ckpt.names) else "model."

    def shown(name: str) -> str:  # the checkpoint's own name, for messages
        if name in raw_of:
            return raw_of[name]
        return model.stored_name(name, cfg.n_layer, prefix) if hasattr(model, "stored_name") else name

    has_lm_head = "lm_head.weight" in raw_of
    if cfg.n_layer > len(ckpt):  # before expected_tensors lists billions of names for a lying count
        raise FormatError(f"{where}: config.json says num_hidden_layers {cfg.n_layer}, more layers than the "
                          f"checkpoint's {len(ckpt)} tensors can hold")
    fused = _fused_layers(raw_of, cfg)
    per_expert_layers = cfg.n_layer + cfg.n_nextn - len(fused) if cfg.spec.moe else 0
    if 3 * cfg.n_expert * per_expert_layers > len(ckpt):  # likewise, for three matrices per expert
        raise FormatError(f"{where}: config.json says {cfg.n_expert} experts in each of {cfg.n_layer} layers, "
                          f"more expert matrices than the checkpoint's {len(ckpt)} tensors can hold")
    expected = expected_tensors(cfg, has_lm_head, fused)
    for hf_name, shape in expected.items():
        if hf_name not in raw_of:
            raise FormatError(f"{where}: tensor '{shown(hf_name)}' is missing from the checkpoint")
        if tuple(ckpt.shape(raw_of[hf_name])) != shape:
            raise FormatError(f"{where}: tensor '{shown(hf_name)}' has shape {list(ckpt.shape(raw_of[hf_name]))}, "
                              f"config.json implies {list(shape)}")
    # Converter order (ModelBase.index_tensors): shards sorted by file name, names sorted within each.
    by_shard: dict[str, list[str]] = {}
    for raw in ckpt.names:
        by_shard.setdefault(ckpt.file_of(raw).name, []).append(raw)
    plans = []
    if cfg.rope_type == "llama3" and cfg.spec.gguf_arch == "llama":  # generate_extra_tensors() comes first
        plans.append(TensorPlan(None, "rope_freqs.weight", (cfg.head_dim // 2,), get_qtype("F32")))

    def plan(raw, name, shape, parts=None, values=None):
        plans.append(TensorPlan(raw, name, shape, tensor_qtype(name, shape, out, cfg, not has_lm_head), parts,
                                values))

    splits = getattr(model, "SPLITS", {})
    # Qwen2MoeModel.modify_tensors: a layer's stacks are written, in HF name order (down, gate,
    # up), when its last expert matrix is read
    stacks = sorted((t for t in model.TENSORS if t.is_experts), key=lambda t: t.hf)
    seen_experts: dict[int, int] = {}
    for shard in sorted(by_shard):
        for raw in sorted(by_shard[shard]):
            hf_name = canonical[raw]
            if hf_name is None:
                continue
            layer = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
            il, rest = (int(layer.group(1)), layer.group(2)) if layer else (-1, None)
            module = next((mod for mod, n in fused.get(il, {}).items() if n == hf_name), None)
            if module is not None:  # one checkpoint tensor, one or two stacks (gate then up)
                n_expert, rows, cols = ckpt.shape(raw)
                for field, first, count in model.FUSED_EXPERTS[module]:
                    first, count = dim(cfg, first), dim(cfg, count)
                    gguf = next(t.gguf for t in model.TENSORS if t.field == field)
                    plan(raw, f"blk.{il}.{gguf}", (n_expert, count, cols),
                         tuple((raw, e * rows + first, e * rows + first + count) for e in range(n_expert)))
                continue
            if rest in splits and hf_name in expected:  # one checkpoint tensor cut in several
                for field, runs in model.split_rows(cfg, rest).items():
                    t = next(t for t in model.TENSORS if t.field == field)
                    plan(raw, f"blk.{il}.{t.gguf}", t.dims(cfg), tuple((raw, a, b) for a, b in runs))
                continue
            name = gguf_tensor_name(cfg, hf_name)
            if name is None:
                continue
            if hf_name not in expected:
                raise UnsupportedError(f"{where}: tensor '{raw}' is not part of a {cfg.hf_architecture} "
                                       f"with this config.json")
            if any(name == f"blk.{il}.{t.gguf}" for t in stacks):  # one expert's matrix of a stack
                seen_experts[il] = seen_experts.get(il, 0) + 1
                if seen_experts[il] == len(stacks) * cfg.n_expert:
                    for t in stacks:
                        names = [raw_of[f"model.layers.{il}.{t.hf.format(e=e)}"] for e in range(cfg.n_expert)]
                        rows = ckpt.shape(names[0])
                        plan(names[0], f"blk.{il}.{t.gguf}", (cfg.n_expert, *rows), tuple((n, 0, rows[0]) for n in names))
                continue
            shape = tuple(ckpt.shape(raw))
            quirk = model.quirks(cfg, rest if rest is not None else hf_name) if hasattr(model, "quirks") else None
            parts = values = None
            if quirk is not None:
                if quirk.squeeze:  # torch's squeeze(): every dimension of 1
                    shape = tuple(d for d in shape if d != 1)
                parts = tuple((raw, a, b) for a, b in quirk.rows) if quirk.rows is not None else None
                values = quirk.values
            plan(raw, name, ggml_shape(shape) if out.via_llama_quantize else shape, parts, values)
    if out.via_llama_quantize:
        plans.sort(key=lambda p: _quantize_order(p.name))
    return plans


def _f32(x: float) -> float:
    return float(np.float32(x))


def _general_metadata(src: Path, raw_config: dict, total_params: int,
                      experts: tuple[int, int] = (0, 0)) -> tuple[dict, dict]:
    """general.type, general.sampling.* (generation_config.json), then the name keys
    (naming.py). README front-matter is not read."""
    values: dict[str, Any] = {"general.type": "model"}
    types: dict[str, GGUFValueType] = {}
    gen_path = src / "generation_config.json"
    gen = {}
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{gen_path}: not valid JSON: {str(e).splitlines()[0]}") from None
        gen = gen if isinstance(gen, dict) else {}
    for hf_keys, key, vtype in SAMPLING_KEYS:
        value = next((gen[k] for k in hf_keys if gen.get(k) is not None), None)
        if value is None:
            continue
        values[key] = _f32(value) if vtype == GGUFValueType.FLOAT32 else value
        types[key] = vtype
    values.update(general_name_keys(raw_config.get("_name_or_path"), src.resolve().name, total_params, experts))
    return values, types


def _ids_in_vocab(config: dict, n_vocab: int) -> dict:
    """config.json without the *_token_id values outside the vocabulary, which llama.cpp's
    SpecialVocab skips (gguf-py vocab.py _set_special_token). Kept, one became a tokenizer key
    the runtime rejects, and one of 2^32 or more a struct.error in the writer."""
    return {k: v for k, v in config.items()
            if not (k.endswith("_token_id") and isinstance(v, int) and not isinstance(v, bool) and v >= n_vocab)}


def _hybrid_metadata(cfg: ModelConfig, raw_config: dict) -> tuple[dict, dict]:
    """The keys a hybrid adds after the MoE ones (_QwenMtpMixin, Qwen3NextModel and
    _Qwen35MRopeMixin.set_gguf_parameters, in that order)."""
    a, u32 = cfg.arch, GGUFValueType.UINT32
    text = {**raw_config, **raw_config.get("text_config", {})}
    values: dict[str, Any] = {}
    if cfg.n_nextn:
        values[f"{a}.nextn_predict_layers"] = cfg.n_nextn
    values.update({f"{a}.ssm.conv_kernel": cfg.ssm_d_conv, f"{a}.ssm.state_size": cfg.ssm_d_state,
                   f"{a}.ssm.group_count": cfg.ssm_n_group, f"{a}.ssm.time_step_rank": cfg.ssm_dt_rank,
                   f"{a}.ssm.inner_size": cfg.ssm_d_inner})
    types = dict.fromkeys(values, u32)
    # transformers' config classes always fill layer_types, so the converter always writes them
    values[f"{a}.attention.recurrent_layers"] = [*cfg.recurrent, *[False] * cfg.n_nextn]
    types[f"{a}.attention.recurrent_layers"] = GGUFValueType.ARRAY
    types[f"{a}.attention.recurrent_layers[]"] = GGUFValueType.BOOL
    # ... and take full_attention_interval out of the config they return unless layer_types was given
    interval = text.get("full_attention_interval", 4) if text.get("layer_types") is not None else 4
    values[f"{a}.full_attention_interval"] = interval
    values[f"{a}.rope.dimension_count"] = cfg.rot_dim
    types[f"{a}.full_attention_interval"] = types[f"{a}.rope.dimension_count"] = u32
    default = family(cfg).DEFAULT_ROPE_SECTIONS.get(cfg.arch)
    if default is not None and not cfg.rope_sections:
        values[f"{a}.rope.dimension_sections"] = list(default)
        types[f"{a}.rope.dimension_sections"] = GGUFValueType.ARRAY
        types[f"{a}.rope.dimension_sections[]"] = GGUFValueType.INT32
    return values, types


def _arch_metadata(cfg: ModelConfig) -> tuple[dict, dict]:
    """{arch}.* keys in the order TextModel.set_gguf_parameters, then LlamaModel's, write them
    (file_type excluded)."""
    a = cfg.arch
    u32 = GGUFValueType.UINT32
    f32 = GGUFValueType.FLOAT32
    values: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}

    def put(key, value, vtype):
        values[key] = _f32(value) if vtype == f32 else value
        types[key] = vtype

    put(f"{a}.block_count", cfg.n_layer + cfg.n_nextn, u32)  # a hybrid's prediction blocks too
    put(f"{a}.context_length", cfg.context_length, u32)
    put(f"{a}.embedding_length", cfg.n_embd, u32)
    if cfg.n_ff or not cfg.spec.hybrid:  # an MoE hybrid's config names no intermediate_size
        put(f"{a}.feed_forward_length", cfg.n_ff, u32)
    put(f"{a}.attention.head_count", cfg.n_head, u32)
    put(f"{a}.attention.head_count_kv", cfg.n_head_kv, u32)
    rope = dict(cfg.rope_scaling or ())
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        put(f"{a}.rope.scaling.type", "linear", GGUFValueType.STRING)
        put(f"{a}.rope.scaling.factor", factor, f32)
    elif rope_type == "yarn" and factor is not None:
        put(f"{a}.rope.scaling.type", "yarn", GGUFValueType.STRING)
        put(f"{a}.rope.scaling.factor", factor, f32)
        put(f"{a}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), u32)
        for hf_keys, suffix in ((("extrapolation_factor",), "yarn_ext_factor"),
                                (("attention_factor", "attn_factor"), "yarn_attn_factor"),
                                (("beta_fast",), "yarn_beta_fast"), (("beta_slow",), "yarn_beta_slow")):
            value = next((rope[k] for k in hf_keys if rope.get(k) is not None), None)
            if value is not None:
                put(f"{a}.rope.scaling.{suffix}", value, f32)
    elif rope_type in ("su", "longrope"):
        put(f"{a}.rope.scaling.type", "longrope", GGUFValueType.STRING)
    if cfg.rope_sections:  # mrope's, padded to four
        put(f"{a}.rope.dimension_sections", [*cfg.rope_sections, 0, 0, 0][:4], GGUFValueType.ARRAY)
        types[f"{a}.rope.dimension_sections[]"] = GGUFValueType.INT32
    put(f"{a}.rope.freq_base", cfg.rope_theta, f32)
    put(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_eps, f32)
    if cfg.spec.moe:
        put(f"{a}.expert_count", cfg.n_expert, u32)
        put(f"{a}.expert_used_count", cfg.n_expert_used, u32)
    if cfg.writes_head_dim():
        put(f"{a}.attention.key_length", cfg.head_dim, u32)
        put(f"{a}.attention.value_length", cfg.head_dim, u32)
    return values, types


# Weights per piece when a tensor is streamed in blocks of rows: 64 MiB as float32, big
# enough that the parallel quantizers stay busy, small enough that peak memory does not
# follow the largest tensor (a 72B-class embedding is 1.2 G weights).
PIECE_WEIGHTS = 1 << 24


def _encode(x: np.ndarray, plan: TensorPlan, out: OutType, importance: np.ndarray | None = None) -> np.ndarray:
    """Float32 values (whole tensor or a block of its rows) -> the bytes of plan.qtype,
    each column's rounding error weighted by `importance` where the type uses it."""
    if out.via_llama_quantize and plan.qtype.name != "F32" and len(plan.shape) > 1 and not plan.name.endswith(ROUTERS):
        # llama-quantize reads the F16 file the converter wrote (notes section 0).
        x = np.ascontiguousarray(x, dtype=np.float32)
        round_through_f16(x if x.flags.writeable else (x := x.copy()))
    if plan.qtype.name == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    return quantize(x.reshape(-1, plan.shape[-1]), plan.qtype, importance)


def _tensor_pieces(ckpt, cfg: ModelConfig, plan: TensorPlan, out: OutType,
                   importance: np.ndarray | None = None,
                   transform: Callable[[np.ndarray, int], np.ndarray] | None = None
                   ) -> Iterator[tuple[np.ndarray, int]]:
    """The encoded bytes of one tensor in consecutive pieces, each with the number of
    checkpoint bytes it consumed. transform(values, first row): applied before encoding
    (channel scaling)."""
    if transform is None:
        transform = _unchanged
    if plan.hf_name is None:
        yield _encode(llama3_rope_freqs(cfg), plan, out), 0
        return
    name = plan.hf_name
    heads = qk_permute_heads(cfg, name)
    if heads is not None:
        # The permutation moves rows across the whole tensor (llama attn_q/attn_k only).
        values = ckpt.load_f32(name)
        _check_storable(ckpt, plan, out, values, 0)
        values = transform(permute_qk(values, heads), 0)
        yield _encode(values, plan, out, importance), ckpt.nbytes(name)
        return
    step = max(1, PIECE_WEIGHTS // max(plan.shape[-1], 1))
    done = 0  # rows of the output tensor (as a matrix of its last dimension) before this piece
    for k, (source, first, end) in enumerate(plan.sources(ckpt)):
        # an expert stack's importance has one row per expert
        imp = importance[k] if importance is not None and importance.ndim == 2 else importance
        row_bytes = ckpt.nbytes(source) // max(ckpt.rows(source), 1)
        for start in range(first, end, step):
            stop = min(end, start + step)
            values = ckpt.read_rows_f32(source, start, stop)
            _check_storable(ckpt, plan, out, values, start, source)
            values = values.reshape(-1, *plan.shape[1:]) if plan.parts is None else values
            if plan.values is not None:
                values = plan.values(values)
            values = transform(values, done)
            done += stop - start
            yield _encode(values, plan, out, imp), (stop - start) * row_bytes


def _check_storable(ckpt, plan: TensorPlan, out: OutType, values: np.ndarray, first_row: int,
                    source: str | None = None) -> None:
    """FormatError naming the checkpoint's place of a value that plan.qtype cannot hold: the
    block types refuse NaN and inf (quants.quantize), and the llama-quantize types see the
    weights through F16 first, which turns |x| >= 65520 into inf."""
    if plan.qtype.block_size == 1:
        return
    limit = 65520.0 if out.via_llama_quantize and len(plan.shape) > 1 else np.inf
    rows = values.reshape(-1, plan.shape[-1])
    bad = ~(np.abs(rows) < limit)  # NaN compares false
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        why = "not finite" if not np.isfinite(rows[r, c]) else "beyond F16's range, where llama-quantize reads it"
        source = source or plan.hf_name
        raise FormatError(f"{ckpt.file_of(source)}: tensor '{source}' holds {rows[r, c]} at row "
                          f"{first_row + r}, column {c}: {why}; {plan.qtype.name} cannot store it")


def _unchanged(x: np.ndarray, start: int) -> np.ndarray:
    return x


def _plan_rows(ckpt, plan: TensorPlan, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a planned matrix as the file holds them: its rows gathered from their
    sources in order (a hybrid's reordered or cut tensors), its quirk applied. An expert
    stack: rows of its first matrix."""
    if len(plan.shape) == 3:
        return ckpt.read_rows_f32(plan.hf_name, a, b)
    pieces, at = [], 0
    for source, first, end in plan.sources(ckpt):
        lo, hi = max(a, at), min(b, at + end - first)
        if lo < hi:
            pieces.append(ckpt.read_rows_f32(source, first + lo - at, first + hi - at))
        at += end - first
    if not pieces:
        return np.zeros((0, plan.shape[-1]), np.float32)
    x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return plan.values(x) if plan.values is not None else x


class _ChannelScaling:
    """convert.scaling for the blocks of one conversion: each block's scales are searched
    when its first tensor is written (llama-quantize's order groups a block's tensors), and
    only the current block's are kept."""

    def __init__(self, ckpt, cfg: ModelConfig, plans: list[TensorPlan], importances: dict[str, np.ndarray],
                 f16: bool):
        self.ckpt, self.cfg, self.importances, self.f16 = ckpt, cfg, importances, f16
        self.plans = {p.name: p for p in plans}
        self.qtypes = {p.name: p.qtype for p in plans}
        self.block: tuple[int, scaling.BlockScales] | None = None

    def _scales(self, name: str) -> scaling.BlockScales | None:
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            return None
        il = int(m.group(1))
        if self.block is None or self.block[0] != il:
            def read_rows(n, a, b):
                return _plan_rows(self.ckpt, self.plans[n], a, b)

            def rows(n):
                p = self.plans[n]
                if len(p.shape) == 3:  # an expert stack: its first matrix, as before
                    return self.ckpt.rows(p.hf_name)
                return sum(end - first for _, first, end in p.sources(self.ckpt))

            found = scaling.search_block(il, self.cfg, self.importances.get, read_rows, rows, self.qtypes, self.f16)
            self.block = (il, found)
        return self.block[1]

    def transform(self, name: str) -> Callable[[np.ndarray, int], np.ndarray] | None:
        block = self._scales(name)
        if block is None or not block.scales:
            return None
        return lambda x, start: scaling.apply(name, x, start, block, self.cfg)

    def importance(self, name: str) -> np.ndarray | None:
        imp = self.importances.get(name)
        block = self._scales(name)
        if imp is None or block is None:
            return imp
        return scaling.scaled_importance(name, imp, block)


def _write_error(e: OSError, dst: Path, need: int | None) -> InputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        needs = f"it needs about {need / 2**20:.0f} MiB, " if need is not None else ""
        return InputError(f"{dst}: {e.strerror} while writing; nothing was written ({needs}free space in "
                          f"{dst.parent}: {_free_bytes(dst.parent) / 2**20:.0f} MiB)")
    return InputError(f"{dst}: write failed: {e.strerror}; nothing was written")


def _check_space(dst: Path, need: int) -> None:
    free = _free_bytes(dst.parent)
    if 0 <= free < need:
        raise InputError(f"{dst.parent}: not enough disk space for {dst.name}: it needs about "
                         f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free "
                         f"({(need - free) / 2**10:,.0f} KiB short)")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def check_destination(src: Path, dst: Path, force: bool) -> None:
    if not src.is_dir():
        raise InputError(f"{src}: not a directory (expected an HF checkpoint folder)")
    if dst.is_dir():
        raise InputError(f"{dst}: is a directory; give the output .gguf file name")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: no such directory for the output file")
    if dst.resolve().is_relative_to(src.resolve()):
        raise InputError(f"{dst}: is inside the checkpoint folder {src}; write the GGUF elsewhere")
    if dst.exists() and not force:
        raise InputError(f"{dst}: already exists (pass force=True / --force to overwrite)")


def check_uses_importance(out: OutType) -> None:
    """InputError unless `out`'s matrices are quantized by a type that reads importance."""
    if not out.via_llama_quantize:
        raise InputError(f"--type {out.qtype.lower()} does not use an importance matrix (the types that do: "
                         f"{', '.join(k for k, t in OUT_TYPES.items() if t.via_llama_quantize)})")


def _importances(im: Imatrix, plans: list[TensorPlan], out: OutType) -> dict[str, np.ndarray]:
    """Each planned matrix's importance from `im`, as llama-quantize --imatrix takes them
    (matrices without an entry are quantized without one). InputError: a type that uses
    none, an entry whose length is not the matrix's row length, no entry for any matrix."""
    where = im.path or "the importance matrix"
    check_uses_importance(out)
    found = {}
    for p in plans:
        imp = im.importance(p.name)
        if imp is None:
            continue
        n_mat = p.shape[0] if len(p.shape) == 3 else 1  # an expert stack: one row per expert
        if imp.shape[0] != n_mat * p.shape[-1]:
            raise InputError(f"{where}: entry '{p.name}' has {imp.shape[0]} values; the tensor's rows have "
                             f"{p.shape[-1]}" + (f", in {n_mat} experts" if n_mat > 1 else "")
                             + " (an importance matrix of another model?)")
        found[p.name] = imp.reshape(n_mat, -1) if len(p.shape) == 3 else imp
    if not found:
        raise InputError(f"{where}: no entry matches a tensor of this model (an importance matrix of another model?)")
    return found


def _imatrix_metadata(im: Imatrix, file_name: str | None) -> tuple[dict, dict]:
    """The keys llama-quantize --imatrix adds (tools/quantize's llama_quantize): strings cut to 127
    bytes; no file key for a matrix that was never a file (convert with calibration text)."""
    def cut(text: str) -> str:
        return text.encode()[:127].decode(errors="ignore")
    values = {"quantize.imatrix.file": cut(file_name)} if file_name else {}
    if im.datasets:
        values["quantize.imatrix.dataset"] = cut(im.datasets[0])
    values["quantize.imatrix.entries_count"] = len(im.sums)
    if im.chunk_count > 0:
        values["quantize.imatrix.chunks_count"] = im.chunk_count
    u32 = GGUFValueType.UINT32
    return values, {k: u32 for k in values if k.endswith("_count")}


def convert(src_dir: str | os.PathLike, dst_path: str | os.PathLike, qtype: str = "q4_k_m",
            force: bool = False, progress: Progress | None = None,
            imatrix: Imatrix | str | os.PathLike | None = None, awq: bool = False) -> Path:
    """Convert the HF checkpoint in `src_dir` (Qwen2, Qwen3, Llama, Qwen2-MoE, Qwen3-MoE, or
    the hybrids Qwen3.5, Qwen3.5-MoE and Qwen3-Next, whose vision tower is left out with one
    logged line; safetensors + config.json + tokenizer.json) to a GGUF file at `dst_path` with matrices of
    type `qtype`; return the path.

    imatrix: an importance matrix (convert.imatrix.Imatrix, or the path of llama.cpp's
    imatrix GGUF file) that weights each column's rounding error, as llama-quantize
    --imatrix: the same bytes and the same quantize.imatrix.* keys. awq: also scale each
    block's input channels by the importance matrix (convert.scaling; the file then differs
    from llama-quantize's, and holds the same function in float).

    The file appears only when complete: it is written to a temporary file next to it
    (gguf_io.partial_file) and renamed; on any error (or KeyboardInterrupt) the temporary file
    is removed, and one left by a killed run is taken over by the next run.
    """
    src, dst = Path(src_dir), Path(dst_path)
    out = out_type(qtype)
    check_destination(src, dst, force)
    config_path = src / "config.json"
    cfg = ModelConfig.from_hf_config(config_path)
    raw_config = json.loads(config_path.read_text(encoding="utf-8"))

    im_file = None
    if awq and imatrix is None:
        raise InputError("channel scaling (awq) needs an importance matrix: give calibration text or an imatrix")
    if imatrix is not None and not isinstance(imatrix, Imatrix):
        im_file, imatrix = str(imatrix), Imatrix.read(imatrix)

    with open_checkpoint(src) as ckpt:
        cfg = checkpoint_config(ckpt, cfg, src)
        plans = plan_tensors(ckpt, cfg, out, src)
        skipped = [n for n in ckpt.names if n.startswith(getattr(family(cfg), "VISION_PREFIXES", ()))]
        if skipped:  # the one thing a conversion leaves out on purpose: say so
            _log.warning("%s: skipped the vision tower (%d tensors, %s*): the GGUF file holds the text model",
                         src, len(skipped), family(cfg).VISION_PREFIXES[0])
        # Only now that the embedding's rows have confirmed vocab_size: the token list is that
        # long (a lying 2^31 took minutes and gigabytes).
        tok_values, tok_types = tokenizer_metadata(src, cfg.n_vocab, _ids_in_vocab(raw_config, cfg.n_vocab), cfg.arch)
        importances = _importances(imatrix, plans, out) if imatrix is not None else {}
        scaler = _ChannelScaling(ckpt, cfg, plans, importances, out.via_llama_quantize) if awq else None
        total_params = sum(int(np.prod(p.shape)) for p in plans)
        stacks = [p.shape for p in plans if "_exps." in p.name and len(p.shape) == 3]
        experts = (sum(int(np.prod(s[1:])) for s in stacks), stacks[0][0]) if stacks else (0, 0)
        gen_values, gen_types = _general_metadata(src, raw_config, total_params, experts)
        arch_values, arch_types = _arch_metadata(cfg)
        extra = {}
        if cfg.spec.writes_vocab_size:
            extra[f"{cfg.arch}.vocab_size"] = cfg.n_vocab
        if cfg.spec.writes_rope_dimension_count:
            extra[f"{cfg.arch}.rope.dimension_count"] = cfg.head_dim
        if cfg.spec.moe:  # Qwen2MoeModel.set_gguf_parameters, after TextModel's
            extra[f"{cfg.arch}.expert_feed_forward_length"] = cfg.n_ff_exp
            if cfg.spec.shared_expert:
                extra[f"{cfg.arch}.expert_shared_feed_forward_length"] = cfg.n_ff_shexp
        versions = {"general.file_type": out.file_type, "general.quantization_version": GGML_QUANT_VERSION}
        u32 = GGUFValueType.UINT32
        types = {**gen_types, **arch_types, **tok_types, **{k: u32 for k in (*extra, *versions)}}
        if cfg.spec.hybrid:
            hybrid_values, hybrid_types = _hybrid_metadata(cfg, raw_config)
            extra.update(hybrid_values)
            types.update(hybrid_types)

        total_bytes = sum(ckpt.nbytes(src) // max(ckpt.rows(src), 1) * (end - first)
                          for p in plans if p.hf_name is not None for src, first, end in p.sources(ckpt))

        if out.via_llama_quantize:
            # llama-quantize re-sets these two keys, which moves them to the end (notes 1.6).
            order = [gen_values, arch_values, extra, tok_values,
                     {"general.quantization_version": GGML_QUANT_VERSION, "general.file_type": out.file_type}]
        else:
            order = [gen_values, arch_values, {"general.file_type": out.file_type}, extra,
                     {"general.quantization_version": GGML_QUANT_VERSION}, tok_values]
        if imatrix is not None:
            im_values, im_types = _imatrix_metadata(imatrix, im_file or (imatrix.path and str(imatrix.path)))
            if awq:  # the tensors are not llama-quantize's: say why
                im_values["cpuq.channel_scaling"] = "awq: input channels scaled by the importance matrix"
            order.append(im_values)
            types.update(im_types)
        with partial_file(dst) as tmp:  # removes the file unless it is moved into place
            need = None
            try:
                with GGUFStreamWriter(tmp, arch=cfg.arch) as writer:
                    for values in order:
                        writer.add_metadata(values, types)
                    for p in plans:
                        writer.add_tensor_info(p.name, p.shape, p.qtype)
                    # The whole file (the vocabulary is megabytes too), checked inside partial_file,
                    # which has emptied any leftover of a killed run.
                    need = writer.file_bytes()
                    _check_space(dst, need)
                    writer.begin()
                    done = 0
                    for p in plans:
                        if progress is not None:
                            progress(done, total_bytes, p.name)  # name the tensor while it is being written
                        def pieces(p=p):
                            nonlocal done
                            if scaler is None:
                                parts = _tensor_pieces(ckpt, cfg, p, out, importances.get(p.name))
                            else:
                                parts = _tensor_pieces(ckpt, cfg, p, out, scaler.importance(p.name),
                                                       scaler.transform(p.name))
                            for data, n in parts:
                                yield data
                                done += n
                                if progress is not None:
                                    progress(done, total_bytes, p.name)
                        writer.write_tensor_parts(p.name, pieces())
                    writer.close()
                os.replace(tmp, dst)
            except OSError as e:
                raise _write_error(e, dst, need) from None
    return dst
