"""Activation-aware channel scaling (after AWQ, Lin et al. 2023), driven by an importance
matrix: per transformer block, scales s (one per input channel) that the block's matrices
are multiplied with column-wise before quantization, divided out exactly where their input
is made, so the model computes the same function in float:

    group   matrices scaled (columns * s)   where 1/s goes (exact in float)
    attn    attn_q, attn_k, attn_v          attn_norm weight
    lin     attn_qkv, attn_gate, ssm_beta,  attn_norm weight (a hybrid's DeltaNet block;
            ssm_alpha (or ssm_ba)           qwen3next's ssm_ba: group lin_ba)
    o       attn_output                     attn_v rows (and bias): attention is linear in v
                                            (a gated attention's sigmoid gate multiplies after)
    mlp     ffn_gate, ffn_up                ffn_norm weight (post_attention_norm: hybrids)
    down    ffn_down                        ffn_up rows: silu(gate) * up is linear in up

An input channel that carries large activations then takes a larger share of its block's
quantization grid. Each group's s = m^(alpha/2) / its geometric mean, m = the importance
(mean squared activation), with alpha from ALPHAS chosen to minimise the importance-weighted
rounding error of the group's matrices, sum_j m_j (W_ij - Q(W S)_ij / s_j)^2 (the diagonal
estimate of the output error that the quantizers' own scale search minimises), measured on
up to SEARCH_ROWS rows of each matrix. alpha = 0 is no scaling, so a group is never made
worse by this measure. attn_output's scales are shared by the query heads that read one kv
head's values (grouped-query attention). The importance of each scaled matrix's input
becomes m / s^2.

An MoE block (qwen3moe, qwen2moe) has no dense ffn_gate/ffn_up/ffn_down, so only its
attention groups are scaled: its ffn_norm also feeds the router, and dividing it out would
need every expert's, the shared expert's and the router's columns scaled alike.

Its measured effect (perplexity and KL against the importance matrix alone, and why one
alpha for every group was not kept) is in docs/calibration.md.

Imports numpy and cpuq (quants, arch); nothing of files or the runtime.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..arch import ModelConfig
from ..quants import QType, dequantize, quantize
from ..quants.floats import round_through_f16

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SEARCH_ROWS = 512  # rows of each matrix the error is measured on (4 evenly spaced slices)
TIE_MARGIN = 1e-9  # relative error gain below which a group stays unscaled

# group -> (the matrices it scales, the matrix whose input importance drives it)
GROUPS = {
    "attn": (("attn_q", "attn_k", "attn_v"), "attn_q"),
    "lin": (("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha"), "attn_qkv"),
    "lin_ba": (("attn_qkv", "attn_gate", "ssm_ba"), "attn_qkv"),
    "o": (("attn_output",), "attn_output"),
    "mlp": (("ffn_gate", "ffn_up"), "ffn_gate"),
    "down": (("ffn_down",), "ffn_down"),
}
# matrix -> the groups that can scale its columns (a block has at most one of them)
INPUT_GROUPS = {m: tuple(g for g, (mats, _) in GROUPS.items() if m in mats) for _, (ms, _) in GROUPS.items()
                for m in ms}

# (rows of this tensor) / s: tensor suffix -> the groups whose scales it divides out
ROW_DIVIDED = {"attn_v.weight": ("o",), "attn_v.bias": ("o",), "ffn_up.weight": ("down",),
               "attn_norm.weight": ("attn", "lin", "lin_ba"), "ffn_norm.weight": ("mlp",),
               "post_attention_norm.weight": ("mlp",)}


def _group_of(groups: tuple[str, ...], block: "BlockScales") -> str | None:
    return next((g for g in groups if g in block.scales), None)


@dataclass(frozen=True)
class BlockScales:
    """A block's scales per group (absent: not scaled) and the alpha each took."""
    scales: dict[str, np.ndarray]
    alphas: dict[str, float]


# Importance is floored at this fraction of its mean before scaling: a channel that was
# (nearly) silent in the calibration text must not get a tiny scale, which would shrink its
# weights towards F16's subnormals and blow up the norm weight that divides it out, for a
# text where it is not silent. Alpha <= 0.6 then bounds such a channel's scale at 0.06x.
IMPORTANCE_FLOOR = 1e-4


def _scales(importance: np.ndarray, alpha: float) -> np.ndarray:
    m = importance.astype(np.float64)
    m = np.maximum(m, IMPORTANCE_FLOOR * max(float(m.mean()), 1e-30))
    s = np.power(m, alpha / 2)
    return s / np.exp(np.mean(np.log(s)))


def _sample_rows(rows: int) -> list[tuple[int, int]]:
    if rows <= SEARCH_ROWS:
        return [(0, rows)]
    part = SEARCH_ROWS // 4
    return [(int(a), int(a) + part) for a in np.linspace(0, rows - part, 4)]


def _error(w: np.ndarray, qtype: QType, s: np.ndarray, importance: np.ndarray, f16: bool) -> float:
    """sum_ij importance_j (W_ij - Q(W S)_ij / s_j)^2 for w (rows, cols) f32."""
    ws = (w * s).astype(np.float32)
    if f16:
        round_through_f16(ws)
    q = quantize(ws, qtype, importance=(importance / s ** 2).astype(np.float32))
    deq = dequantize(q, qtype, ws.shape).astype(np.float64) / s
    return float(((deq - w) ** 2 @ importance).sum())


def search_block(il: int, cfg: ModelConfig, importance: Callable[[str], Optional[np.ndarray]],
                 read_rows: Callable[[str, int, int], np.ndarray], rows: Callable[[str], int],
                 qtypes: dict[str, QType], f16: bool) -> BlockScales:
    """The scales of block il. importance(gguf name) -> float32 (cols,) or None; read_rows(gguf
    name, start, stop) -> float32 rows of the checkpoint's tensor; rows(gguf name); qtypes:
    the output type of each matrix; f16: the quantizers see F16-rounded values (llama-quantize's
    input). A group whose matrices lack an importance entry is left unscaled."""
    out_scales, out_alphas = {}, {}
    for group, (mats, driver) in GROUPS.items():
        names = [f"blk.{il}.{m}.weight" for m in mats]
        if any(n not in qtypes for n in names):  # not this kind of block's group
            continue
        imp = importance(f"blk.{il}.{driver}.weight")
        if imp is None or any(importance(n) is None for n in names):
            continue
        imp = imp.astype(np.float64)
        per_alpha = {}
        for alpha in ALPHAS:
            per_alpha[alpha] = _group_scales(group, imp, alpha, cfg)
        errors = dict.fromkeys(ALPHAS, 0.0)
        for n in names:
            for a, b in _sample_rows(rows(n)):  # a slice at a time: memory of 128 rows, not 512
                w = read_rows(n, a, b).astype(np.float64)
                for alpha, s in per_alpha.items():
                    errors[alpha] += _error(w, qtypes[n], s, imp, f16)
        best = min(ALPHAS, key=lambda a: errors[a])
        # alpha > 0 only for a real gain: with even importance the scales are 1 within an ulp
        # and the errors differ by rounding noise alone.
        if best > 0.0 and errors[best] < errors[0.0] * (1.0 - TIE_MARGIN):
            out_scales[group] = per_alpha[best]
            out_alphas[group] = best
    return BlockScales(out_scales, out_alphas)


def _group_scales(group: str, imp: np.ndarray, alpha: float, cfg: ModelConfig) -> np.ndarray:
    if group != "o":
        return _scales(imp, alpha)
    # attn_output's input channel (head h, dim e) is value row (h // n_group, e): one scale per
    # value row, from the mean importance of the heads that read it.
    n_group = cfg.n_head // cfg.n_head_kv
    per_kv = imp.reshape(cfg.n_head_kv, n_group, cfg.head_dim).mean(axis=1)
    s_kv = _scales(per_kv.reshape(-1), alpha).reshape(cfg.n_head_kv, 1, cfg.head_dim)
    return np.broadcast_to(s_kv, (cfg.n_head_kv, n_group, cfg.head_dim)).reshape(-1).copy()


def value_row_scales(s_o: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """attn_output's column scales -> attn_v's row scales (one per kv head's value row)."""
    n_group = cfg.n_head // cfg.n_head_kv
    return s_o.reshape(cfg.n_head_kv, n_group, cfg.head_dim)[:, 0].reshape(-1)


_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)$")


def apply(name: str, x: np.ndarray, start_row: int, block: BlockScales, cfg: ModelConfig) -> np.ndarray:
    """Tensor `name` (GGUF), rows start_row.. of it as x (rows, cols) or a vector, with the
    block's scales applied: columns * s for a scaled matrix, rows (or a norm weight) / s."""
    m = _BLOCK_NAME.match(name)
    if m is None or not block.scales:
        return x
    part = m.group(2)
    matrix = part[:-len(".weight")] if part.endswith(".weight") else None
    group = _group_of(INPUT_GROUPS.get(matrix, ()), block) if matrix else None
    if group is not None:
        x = x * block.scales[group].astype(np.float32)
    divided = _group_of(ROW_DIVIDED.get(part, ()), block)
    if divided is not None:
        s = block.scales[divided]
        if divided == "o":
            s = value_row_scales(s, cfg)
        if x.ndim == 1:
            x = x / s.astype(np.float32)
        else:
            x = x / s[start_row:start_row + x.shape[0], None].astype(np.float32)
    return x.astype(np.float32, copy=False)


def scaled_importance(name: str, importance: np.ndarray, block: BlockScales) -> np.ndarray:
    """A scaled matrix's input importance m / s^2 (the input it now sees is x / s)."""
    m = _BLOCK_NAME.match(name)
    part = m.group(2) if m else ""
    group = _group_of(INPUT_GROUPS.get(part[:-len(".weight")], ()), block) if part.endswith(".weight") else None
    if group is None:
        return importance
    return (importance / block.scales[group] ** 2).astype(np.float32)
