"""Architectures, one file per family, each read like HF's modeling file: the tensors a
block has (declared once, as `Tensor` rows) and the block as stage functions.

A stage function is written once over op names (rms_norm, linear3, attend, ...) that it
does not import: cpuq.runtime.stages binds the same code to each path's ops (the decode
step's Numba kernels, the prompt chunk's threaded kernels, the GPU's CUDA kernels).
Adding an architecture is a file here and the ops its stages name.

Imports cpuq.arch and cpuq.errors only.
"""
from __future__ import annotations

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
    llama.cpp loads them)."""
    field: str
    gguf: str
    hf: str
    shape: tuple[str, ...]
    when: str | None = None
    optional: bool = False

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    def dims(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(dim(cfg, d) for d in self.shape)

    def required(self, cfg: ModelConfig) -> bool | None:
        """True: required; None: used if the file has it."""
        if self.optional or (self.when is not None and not getattr(cfg.spec, self.when)):
            return None
        return True


def dim(cfg: ModelConfig, name: str) -> int:
    """A dimension by name: q_dim (n_head * head_dim), kv_dim, or a ModelConfig attribute."""
    if name == "q_dim":
        return cfg.n_head * cfg.head_dim
    if name == "kv_dim":
        return cfg.n_head_kv * cfg.head_dim
    return int(getattr(cfg, name))


def family(cfg: ModelConfig) -> ModuleType:
    """The model file of cfg's architecture."""
    from . import dense
    for module in (dense,):
        if cfg.arch in module.ARCHITECTURES:
            return module
    raise UnsupportedError(f"architecture '{cfg.arch}' has no model file")
