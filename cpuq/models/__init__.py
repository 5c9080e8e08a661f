"""Architectures, one file per family, each read like HF's modeling file: the tensors a
block has (declared once, as `Tensor` rows) and the block as stage functions.

A stage function is written once over op names (rms_norm, linear3, attend, ...) that it
does not import: cpuq.runtime.stages binds the same code to each path's ops (the decode
step's Numba kernels, the prompt chunk's threaded kernels, the GPU's CUDA kernels).
Adding an architecture is a file here and the ops its stages name.

Imports cpuq.arch and cpuq.errors only (a model file may import numpy for its conversion
quirks).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType

from ..arch import ModelConfig
from ..errors import UnsupportedError


@dataclass(frozen=True)
class Tensor:
    """One tensor of every block: `field` of the model's Layer, stored as blk.{i}.`gguf`,
    read from model.layers.{i}.`hf` in a checkpoint, of `shape` (names of ModelConfig
    attributes or of the dims below; GGUF's row-major order, rows first). `when`: the
    ArchSpec flag that makes it required (None: always), else it is used if the file has
    it; optional: used if present whatever the architecture (qwen2's q/k/v biases, as
    llama.cpp loads them). A 3-D shape is a stack of experts' matrices, whose HF name
    holds {e} for the expert's index. float32: decoded to float32 once at load, as vectors
    are (a router, which every token reads whole). hf_shape: the checkpoint's shape where
    it differs (the converter writes the checkpoint's; llama-quantize drops outer 1s).
    layer: "linear" or "attention" for a tensor only the hybrids' DeltaNet or full-attention
    blocks have (ModelConfig.recurrent says which a block is). hf_unless: the ArchSpec flag
    under which the checkpoint holds it inside a fused module instead (the model file's
    SPLITS say how the converter cuts it out)."""
    field: str
    gguf: str
    hf: str
    shape: tuple[str, ...]
    when: str | None = None
    optional: bool = False
    float32: bool = False
    hf_shape: tuple[str, ...] | None = None  # the checkpoint's, where it differs from `shape`
    layer: str | None = None
    hf_unless: str | None = None

    @property
    def is_matrix(self) -> bool:
        """Read as quantized blocks in place (a matrix or a stack of experts' matrices)."""
        return len(self.shape) >= 2 and not self.float32

    @property
    def is_experts(self) -> bool:
        return len(self.shape) == 3

    def dims(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(dim(cfg, d) for d in self.shape)

    def hf_dims(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(dim(cfg, d) for d in self.hf_shape) if self.hf_shape else self.dims(cfg)

    def in_checkpoint(self, cfg: ModelConfig) -> bool:
        """Whether a checkpoint of cfg's architecture must hold it under its own name (the
        converter's check; see in_layer for which blocks)."""
        if self.hf_unless is not None and getattr(cfg.spec, self.hf_unless):
            return False
        return self.when is None or bool(getattr(cfg.spec, self.when))

    def in_layer(self, cfg: ModelConfig, il: int) -> bool:
        """Whether block il can have it (a hybrid's DeltaNet and attention blocks differ)."""
        return self.layer is None or (self.layer == "linear") == cfg.is_recurrent(il)

    def required(self, cfg: ModelConfig) -> bool | None:
        """True: required; None: used if the file has it."""
        if self.optional or (self.when is not None and not getattr(cfg.spec, self.when)):
            return None
        return True


def dim(cfg: ModelConfig, name: str) -> int:
    """A dimension by name: q_dim (n_head * head_dim), kv_dim, a number, or a ModelConfig
    attribute."""
    if name.isdigit():
        return int(name)
    if name == "q_dim":
        return cfg.n_head * cfg.head_dim
    if name == "kv_dim":
        return cfg.n_head_kv * cfg.head_dim
    return int(getattr(cfg, name))


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """shape (numpy order) without its outer dimensions of 1, as ggml_n_dims counts them:
    what llama-quantize writes (qwen2moe's (1, n_embd) shared-expert gate becomes 1-D)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def family(cfg: ModelConfig) -> ModuleType:
    """The model file of cfg's architecture."""
    from . import dense, hybrid, moe
    for module in (dense, moe, hybrid):
        if cfg.arch in module.ARCHITECTURES:
            return module
    raise UnsupportedError(f"architecture '{cfg.arch}' has no model file")


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SUFFIX_RE = re.compile(r"^(.+)\.(weight|bias)$")
_EXPERT_RE = re.compile(r"\.\d+\.")


def gguf_tensor_name(cfg: ModelConfig, hf_name: str) -> str | None:
    """GGUF name of an HF checkpoint tensor of cfg's architecture (its name as the converter
    sees it: a hybrid's canonical_name); None for tensors the converter drops.
    UnsupportedError for a name the model file does not know (llama.cpp's
    ModelBase.map_tensor_name)."""
    model = family(cfg)
    if hf_name.endswith(model.IGNORED_SUFFIXES):
        return None
    name = hf_name[len("language_model."):] if hf_name.startswith("language_model.") else hf_name
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        for t in model.TENSORS:  # the whole name first: a hybrid's A_log and dt_bias have no suffix
            if t.hf == rest:
                return f"blk.{layer}.{t.gguf}"
        m = _SUFFIX_RE.match(rest)
        if m:
            module, suffix = m.groups()
            nextn = getattr(model, "NEXTN_NAMES", {})
            if module in nextn:  # a prediction block's own modules
                return f"blk.{layer}.{nextn[module]}.{suffix}"
            module = _EXPERT_RE.sub(".{e}.", module)  # one expert's matrix: part of its stack
            for t in model.TENSORS:  # a module's .weight and .bias share its GGUF base name
                if t.hf.rsplit(".", 1)[0] == module:
                    return f"blk.{layer}.{t.gguf.rsplit('.', 1)[0]}.{suffix}"
    else:
        m = _SUFFIX_RE.match(name)
        if m and m.group(1) in model.GLOBAL_TENSORS:
            return f"{model.GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    raise UnsupportedError(f"tensor '{hf_name}' has no GGUF name")


def expected_tensors(cfg: ModelConfig, has_lm_head: bool,
                     fused: dict[int, dict[str, str]] | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that a checkpoint of cfg must hold (a hybrid's canonical
    names, cfg.n_nextn prediction blocks after the trunk). fused: layer -> {module of the
    model file's FUSED_EXPERTS: its name in the checkpoint} for the layers that hold their
    experts as stacks rather than one matrix per expert."""
    model = family(cfg)
    fused = fused or {}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.n_vocab, cfg.n_embd)}
    layer = [t for t in model.TENSORS if t.in_checkpoint(cfg)]
    splits = getattr(model, "SPLITS", {})
    for i in range(cfg.n_layer + cfg.n_nextn):
        nextn = i >= cfg.n_layer  # a prediction block: full attention, then its own modules
        for t in layer:
            if (t.layer == "linear") if nextn else not t.in_layer(cfg, i):
                continue
            if t.is_experts and i not in fused:
                for e in range(cfg.n_expert):
                    shapes[f"model.layers.{i}.{t.hf.format(e=e)}"] = t.dims(cfg)[1:]
            elif not t.is_experts:
                shapes[f"model.layers.{i}.{t.hf}"] = t.hf_dims(cfg)
        for module, fields in splits.items():  # a fused module in place of its fields
            parts = [t for t in model.TENSORS if t.field in fields]
            if not nextn and all(t.hf_unless and getattr(cfg.spec, t.hf_unless) and t.in_layer(cfg, i)
                                 for t in parts):
                shapes[f"model.layers.{i}.{module}"] = (sum(t.dims(cfg)[0] for t in parts), parts[0].dims(cfg)[1])
        if nextn:
            shapes.update({f"model.layers.{i}.{k}": v for k, v in model.nextn_shapes(cfg).items()})
        for module, name in fused.get(i, {}).items():
            parts = model.FUSED_EXPERTS[module]
            cols = next(t for t in model.TENSORS if t.field == parts[0][0]).dims(cfg)[2]
            shapes[name] = (cfg.n_expert, sum(dim(cfg, count) for _, _, count in parts), cols)
    shapes["model.norm.weight"] = (cfg.n_embd,)
    if has_lm_head:
        shapes["lm_head.weight"] = (cfg.n_vocab, cfg.n_embd)
    return shapes
