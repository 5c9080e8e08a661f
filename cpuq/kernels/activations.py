"""SwiGLU."""
from __future__ import annotations

import numpy as np
from numba import njit

from .attention import _expf


@njit(cache=True, nogil=True)
def swiglu(gate, up, out):
    """gate, up: (n, f) f32 -> out: (n, f) f32 = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
    out may be gate or up. exp is attention._expf (within 3 ulp), in a loop of its own into
    a fresh row, so that it vectorizes (np.exp is a libm call per element, and out aliasing
    gate keeps one fused loop scalar)."""
    n = min(gate.shape[0], up.shape[0], out.shape[0])
    f = min(gate.shape[1], up.shape[1], out.shape[1])
    row = np.empty(f, np.float32)
    for i in range(n):
        g, u = gate[i], up[i]
        for j in range(f):
            row[j] = _expf(-g[j])
        for j in range(f):
            row[j] = g[j] / (np.float32(1.0) + row[j]) * u[j]
        o = out[i]
        for j in range(f):  # not out[i, :f] = row: its shape-mismatch error compiles ~2 s of string code
            o[j] = row[j]


@njit(cache=True, nogil=True)
def sigmoid_mul(x, gate):
    """x *= sigmoid(gate), both (n, f) f32 (a gated attention's output gate)."""
    n = min(x.shape[0], gate.shape[0])
    f = min(x.shape[1], gate.shape[1])
    row = np.empty(f, np.float32)
    for i in range(n):
        g, o = gate[i], x[i]
        for j in range(f):
            row[j] = _expf(-g[j])
        for j in range(f):
            o[j] = o[j] / (np.float32(1.0) + row[j])


@njit(cache=True, nogil=True)
def split_halves(x, width, first, second):
    """x (n, heads * 2 * width) holding each head's [first | second] halves -> first,
    second (n, heads * width) (a gated attention's queries and gates)."""
    n = min(x.shape[0], first.shape[0], second.shape[0])
    heads = min(x.shape[1] // (2 * width), first.shape[1] // width, second.shape[1] // width)
    for t in range(n):
        for h in range(heads):
            for j in range(width):
                first[t, h * width + j] = x[t, 2 * h * width + j]
                second[t, h * width + j] = x[t, 2 * h * width + width + j]
