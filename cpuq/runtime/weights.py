"""A GGUF file's tensors as the forward pass uses them: matrices stay as zero-copy views
of the memory-mapped blocks (with their GGML type id), vectors (norms, biases) are
decoded to float32 once. Every tensor is checked against the ModelConfig here, at load,
so the kernels can trust shapes and types. Which tensors a block has is the model
file's TENSORS table.

Imports numpy, cpuq.arch, cpuq.gguf_io, cpuq.models, cpuq.quants, cpuq.kernels.matmul and
cpuq.errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch import ModelConfig
from ..errors import FormatError, UnsupportedError
from ..gguf_io import GGUFFile, TensorInfo
from ..kernels.matmul import SUPPORTED
from ..models import family, ggml_shape
from ..quants import dequantize


@dataclass(frozen=True)
class Matrix:
    """(rows, cols) weights as GGML blocks: data uint8 (rows, row_bytes), type id. A stack
    of n_expert experts' (rows, cols) matrices holds them one after another in data's
    n_expert * rows rows."""
    name: str
    data: np.ndarray
    ggml_type: int
    rows: int
    cols: int
    n_expert: int = 0

    def expert(self, e: int) -> "Matrix":
        """Expert e's matrix of a stack: a view named "<stack>#<e>/<n_expert>", so that an
        observer of its input (the importance matrix) knows the stack, the row and how many
        experts the stack has, also those no token picks."""
        return Matrix(f"{self.name}#{e}/{self.n_expert}", self.data[e * self.rows:(e + 1) * self.rows],
                      self.ggml_type, self.rows, self.cols)


@dataclass(frozen=True)
class Weights:
    token_embd: Matrix
    layers: tuple  # of the model file's Layer (cpuq.models): Matrix, vector or None per tensor
    output_norm: np.ndarray
    output: Matrix           # token_embd itself when the embeddings are tied
    rope_freqs: np.ndarray | None


def _tensor(f: GGUFFile, name: str) -> TensorInfo:
    t = f.tensors.get(name)
    if t is None:
        raise FormatError(f"{f.path}: tensor '{name}' is missing")
    return t


def _matrix(f: GGUFFile, name: str, *shape: int) -> Matrix:
    """A (rows, cols) matrix, or a (n_expert, rows, cols) stack of experts' matrices."""
    t = _tensor(f, name)
    if tuple(t.shape) != shape:
        raise FormatError(f"{f.path}: tensor '{name}' has shape {list(t.shape)}, the metadata implies {list(shape)}")
    ggml_type = int(t.qtype.ggml_type)
    if ggml_type not in SUPPORTED:
        raise UnsupportedError(f"{f.path}: tensor '{name}' has type {t.qtype.name}, which the runtime cannot run")
    *stack, rows, cols = shape
    n_expert = stack[0] if stack else 0
    return Matrix(name, t.data.reshape(max(n_expert, 1) * rows, -1), ggml_type, rows, cols, n_expert)


def _vector(f: GGUFFile, name: str, *shape: int, optional: bool = False) -> np.ndarray | None:
    """A tensor of any type decoded to float32 of `shape` (a vector, or a router's matrix)."""
    if optional and name not in f.tensors:
        return None
    t = _tensor(f, name)
    if ggml_shape(tuple(t.shape)) != ggml_shape(shape):  # llama-quantize drops outer 1s
        raise FormatError(f"{f.path}: tensor '{name}' has shape {list(t.shape)}, the metadata implies {list(shape)}")
    x = dequantize(t.data, t.qtype, shape).astype(np.float32)
    return np.ascontiguousarray(x)


def load_weights(f: GGUFFile, cfg: ModelConfig) -> Weights:
    model = family(cfg)
    d = cfg.n_embd
    layers = []
    for i in range(cfg.n_layer):
        tensors = []
        for t in model.TENSORS:
            name, shape, required = f"blk.{i}.{t.gguf}", t.dims(cfg), t.required(cfg)
            if not t.in_layer(cfg, i):  # a hybrid's other kind of block
                tensors.append(None)
            elif t.is_matrix:
                tensors.append(_matrix(f, name, *shape) if required or name in f.tensors else None)
            else:
                tensors.append(_vector(f, name, *shape, optional=not required))
        layers.append(model.Layer(*tensors))
    token_embd = _matrix(f, "token_embd.weight", cfg.n_vocab, d)
    output = token_embd if "output.weight" not in f.tensors else _matrix(f, "output.weight", cfg.n_vocab, d)
    return Weights(token_embd=token_embd, layers=tuple(layers), output_norm=_vector(f, "output_norm.weight", d),
                   output=output, rope_freqs=_vector(f, "rope_freqs.weight", cfg.head_dim // 2, optional=True))
