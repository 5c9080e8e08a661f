"""SwiGLU."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def swiglu(gate, up, out):
    """gate, up: (n, f) f32 -> out: (n, f) f32 = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
    out may be gate or up."""
    n = min(gate.shape[0], up.shape[0], out.shape[0])
    f = min(gate.shape[1], up.shape[1], out.shape[1])
    for i in range(n):
        for j in range(f):
            g = gate[i, j]
            out[i, j] = g / (np.float32(1.0) + np.exp(-g)) * up[i, j]
