"""RMSNorm."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def rms_norm(x, weight, eps, out):
    """x: (n, d) f32, weight: (d,) f32 -> out: (n, d) f32 = x / sqrt(mean(x^2) + eps) * weight.
    The mean square is summed in float64, as ggml does (ggml_float). out may be x."""
    n = min(x.shape[0], out.shape[0])
    d = min(x.shape[1], out.shape[1], weight.shape[0])
    for i in range(n):
        acc = 0.0
        for j in range(d):
            v = np.float64(x[i, j])
            acc += v * v
        scale = np.float32(1.0 / np.sqrt(acc / d + eps))
        for j in range(d):
            out[i, j] = x[i, j] * scale * weight[j]
