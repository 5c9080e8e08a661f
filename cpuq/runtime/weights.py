"""A GGUF file's tensors as the forward pass uses them: matrices stay as zero-copy views
of the memory-mapped blocks (with their GGML type id), vectors (norms, biases) are
decoded to float32 once. Every tensor is checked against the ModelConfig here, at load,
so the kernels can trust shapes and types.

Imports numpy, cpuq.arch, cpuq.gguf_io, cpuq.quants, cpuq.kernels.matmul and cpuq.errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch import ModelConfig
from ..errors import FormatError, UnsupportedError
from ..gguf_io import GGUFFile, TensorInfo
from ..kernels.matmul import SUPPORTED
from ..quants import dequantize


@dataclass(frozen=True)
class Matrix:
    """(rows, cols) weights as GGML blocks: data uint8 (rows, row_bytes), type id."""
    name: str
    data: np.ndarray
    ggml_type: int
    rows: int
    cols: int


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray
    wq: Matrix
    wk: Matrix
    wv: Matrix
    wo: Matrix
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    ffn_norm: np.ndarray
    w_gate: Matrix
    w_up: Matrix
    w_down: Matrix


@dataclass(frozen=True)
class Weights:
    token_embd: Matrix
    layers: tuple[Layer, ...]
    output_norm: np.ndarray
    output: Matrix           # token_embd itself when the embeddings are tied
    rope_freqs: np.ndarray | None


def _tensor(f: GGUFFile, name: str) -> TensorInfo:
    t = f.tensors.get(name)
    if t is None:
        raise FormatError(f"{f.path}: tensor '{name}' is missing")
    return t


def _matrix(f: GGUFFile, name: str, rows: int, cols: int) -> Matrix:
    t = _tensor(f, name)
    if tuple(t.shape) != (rows, cols):
        raise FormatError(f"{f.path}: tensor '{name}' has shape {list(t.shape)}, the metadata implies {[rows, cols]}")
    ggml_type = int(t.qtype.ggml_type)
    if ggml_type not in SUPPORTED:
        raise UnsupportedError(f"{f.path}: tensor '{name}' has type {t.qtype.name}, which the runtime cannot run")
    return Matrix(name, t.data.reshape(rows, -1), ggml_type, rows, cols)


def _vector(f: GGUFFile, name: str, n: int, optional: bool = False) -> np.ndarray | None:
    if optional and name not in f.tensors:
        return None
    t = _tensor(f, name)
    if t.n_elements != n or len(t.shape) != 1:
        raise FormatError(f"{f.path}: tensor '{name}' has shape {list(t.shape)}, the metadata implies {[n]}")
    x = dequantize(t.data, t.qtype, (n,)).astype(np.float32)
    return np.ascontiguousarray(x)


def load_weights(f: GGUFFile, cfg: ModelConfig) -> Weights:
    spec = cfg.spec
    d, hd = cfg.n_embd, cfg.head_dim
    q_rows, kv_rows = cfg.n_head * hd, cfg.n_head_kv * hd
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(Layer(
            attn_norm=_vector(f, p + "attn_norm.weight", d),
            wq=_matrix(f, p + "attn_q.weight", q_rows, d),
            wk=_matrix(f, p + "attn_k.weight", kv_rows, d),
            wv=_matrix(f, p + "attn_v.weight", kv_rows, d),
            wo=_matrix(f, p + "attn_output.weight", d, q_rows),
            bq=_vector(f, p + "attn_q.bias", q_rows, optional=True),
            bk=_vector(f, p + "attn_k.bias", kv_rows, optional=True),
            bv=_vector(f, p + "attn_v.bias", kv_rows, optional=True),
            q_norm=_vector(f, p + "attn_q_norm.weight", hd, optional=not spec.qk_norm),
            k_norm=_vector(f, p + "attn_k_norm.weight", hd, optional=not spec.qk_norm),
            ffn_norm=_vector(f, p + "ffn_norm.weight", d),
            w_gate=_matrix(f, p + "ffn_gate.weight", cfg.n_ff, d),
            w_up=_matrix(f, p + "ffn_up.weight", cfg.n_ff, d),
            w_down=_matrix(f, p + "ffn_down.weight", d, cfg.n_ff),
        ))
    token_embd = _matrix(f, "token_embd.weight", cfg.n_vocab, d)
    output = token_embd if "output.weight" not in f.tensors else _matrix(f, "output.weight", cfg.n_vocab, d)
    return Weights(token_embd=token_embd, layers=tuple(layers), output_norm=_vector(f, "output_norm.weight", d),
                   output=output, rope_freqs=_vector(f, "rope_freqs.weight", hd // 2, optional=True))
