"""Rotary position embedding: the angle tables (YaRN included) and their application in
the two layouts llama.cpp has. NEOX (qwen2, qwen3): element i of a head pairs with
i + n_rot/2, as HF's rotate_half. NORMAL (llama): elements 2i and 2i+1 pair, which is why
llama.cpp's converter permutes llama's q/k rows.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


def _yarn_corr_dim(n_rot: int, n_ctx_orig: int, n_rotations: float, base: float) -> float:
    return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_tables(positions: np.ndarray, n_rot: int, base: float, freq_scale: float = 1.0,
                freq_factors: np.ndarray | None = None, yarn: tuple[float, float, float, int] | None = None,
                attn_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """positions: (n,) int -> cos, sin: (n, n_rot/2) f32 for pair i (angle position *
    base^(-2i/n_rot), divided by freq_factors[i] if given, scaled by freq_scale).

    yarn = (ext_factor, beta_fast, beta_slow, n_ctx_orig): YaRN's blend of interpolated
    and extrapolated angles over a ramp of pair indices, and its magnitude scale
    (llama.cpp ggml_rope_yarn_corr_dims / rope_yarn; HF _compute_yarn_parameters).
    Angles are computed in float64 and rounded once."""
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors[:half], dtype=np.float64)
    theta_extrap = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    theta = theta_extrap * freq_scale
    mscale = attn_factor
    if yarn is not None and yarn[0] != 0.0:
        ext_factor, beta_fast, beta_slow, n_ctx_orig = yarn
        low = max(0.0, math.floor(_yarn_corr_dim(n_rot, n_ctx_orig, beta_fast, base)))
        high = min(n_rot - 1.0, math.ceil(_yarn_corr_dim(n_rot, n_ctx_orig, beta_slow, base)))
        y = (i - low) / max(0.001, high - low)  # pair index i is llama.cpp's i0/2
        ramp = (1.0 - np.clip(y, 0.0, 1.0)) * ext_factor
        theta = theta * (1.0 - ramp) + theta_extrap * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


@njit(cache=True, nogil=True)
def apply_rope(x, cos, sin, neox):
    """x: (n, heads, head_dim) f32, rotated in place over its first 2 * cos.shape[1]
    dimensions; cos, sin: (n, n_rot/2) f32; neox: pair i with i + n_rot/2 (else 2i, 2i+1)."""
    n = min(x.shape[0], cos.shape[0], sin.shape[0])
    heads = x.shape[1]
    half = min(cos.shape[1], sin.shape[1], x.shape[2] // 2)
    for t in range(n):
        for h in range(heads):
            for i in range(half):
                if neox:
                    a, b = i, i + half
                else:
                    a, b = 2 * i, 2 * i + 1
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c
