"""kernels.activations.swiglu against float64 silu(g) * u.

Tolerance 1e-6 relative: attention._expf is within 3 ulp (~3.6e-7) and the division and
product round once each (~1.2e-7); a wrong sign or formula is off by > 1e-2."""
import numpy as np

from cpuq.kernels.activations import swiglu


def _ref(g, u):
    g, u = g.astype(np.float64), u.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # exp(inf) and -inf * 0, as float64 says
        return g / (1.0 + np.exp(-g)) * u


def test_swiglu_matches_float64_over_the_float_range():
    rng = np.random.default_rng(0)
    g = np.concatenate([np.linspace(-120, 120, 3001), rng.standard_normal(999) * 4]).astype(np.float32).reshape(2, -1)
    u = rng.standard_normal(g.shape).astype(np.float32)
    out = np.empty_like(g)
    swiglu(g, u, out)
    ref = _ref(g, u)
    # below g = -88.72, exp(-g) overflows float32 (as np.exp in float32 does) and silu gives 0,
    # where float64 still has values of ~1e-36 and less
    low = g < -88.73
    assert np.all(out[low] == 0.0)
    # next to that edge (|result| < 1e-36) 2^n is at float32's limit: 1e-30 absolute covers it
    assert np.all(np.abs(out - ref)[~low] <= 1e-6 * np.abs(ref)[~low] + 1e-30)

def test_swiglu_in_place_and_nan():
    g = np.array([[-3.0, 0.0, 2.5, np.nan, np.inf, -np.inf]], np.float32)
    u = np.array([[2.0, 1.0, -1.0, 1.0, 1.0, 1.0]], np.float32)
    ref = _ref(g, u)
    swiglu(g, u, g)  # out is gate, as the forward pass calls it
    assert np.allclose(g[0, :3], ref[0, :3], rtol=1e-6, atol=0)
    assert np.isnan(g[0, 3]) and g[0, 4] == np.inf and np.isnan(g[0, 5])  # -inf * 0: NaN, as in float64
