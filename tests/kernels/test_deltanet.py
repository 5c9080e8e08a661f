"""cpuq.kernels.deltanet against HF transformers' own Gated DeltaNet functions
(transformers.models.qwen3_5.modeling_qwen3_5), through tests/golden/deltanet.npz
(tools/make_deltanet_golden.py: seeded inputs, HF's float32 outputs; cases with nk == nv
and nk < nv, dk != dv, 1, 5, 70 and 130 tokens, a nonzero conv and recurrent state).

Errors are measured as max |got - ref| / max |ref| over an array ("relative to its scale").
The measured values are in the comments next to each tolerance; a wrong formula, head
mapping or state order is off by 1e-2 or more.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from cpuq.kernels.deltanet import conv_chunk, conv_step, gated_norm, gates, gdn_chunk, gdn_step, gdn_tokens

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "deltanet.npz"
with np.load(GOLDEN) as _z:
    CASES = json.loads(str(_z["cases"]))
    EPS = float(_z["eps"])
    DATA = {name: {k.split("/", 1)[1]: _z[k] for k in _z.files if k.startswith(name + "/")} for name in CASES}
# where tiled and grouped V-head orders differ: several key heads, more V heads than them
GROUPED = [name for name in CASES if CASES[name]["nv"] > CASES[name]["nk"] > 1]

# The gated delta rule in the recurrent form does HF's elementwise operations in HF's order;
# only its sums (k^T s and q^T s over dk, the l2norm's sum of squares) may be added in
# another order than torch's, a few float32 roundings per token, and the state does not
# amplify them (its update is a contraction: decay <= 1, beta in (0, 1), |k| = 1).
# Measured: 2.1e-7 outputs, 2.5e-7 states (also on the tiled heads).
TOL_RECURRENT = 1e-6
# The chunked form reaches the same function through other arithmetic (exp of differences
# of float32 cumulative log decays, a triangular solve): HF's own chunked form is up to
# 1.72e-6 off its recurrent form on these cases (states 7.1e-7), and cpuq's is as far
# (1.74e-6, states 7.1e-7); about twice that.
TOL_CHUNK_VS_RECURRENT = 4e-6
# cpuq's chunked form against HF's: the same algorithm, sums in other orders; measured 1.3e-7.
TOL_CHUNK = 1e-6


def _err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _split(name, conv_out):
    """q, k (n, nk, dk) and v (n, nv, dv), C-contiguous, from the conv output (n, C)."""
    c = CASES[name]
    nk, nv, dk, dv, n = c["nk"], c["nv"], c["dk"], c["dv"], c["n"]
    q = np.ascontiguousarray(conv_out[:, :nk * dk].reshape(n, nk, dk))
    k = np.ascontiguousarray(conv_out[:, nk * dk:2 * nk * dk].reshape(n, nk, dk))
    v = np.ascontiguousarray(conv_out[:, 2 * nk * dk:].reshape(n, nv, dv))
    return q, k, v


def _inputs(name):
    """The delta rule's inputs as HF saw them: its conv output, gates and initial state."""
    d = DATA[name]
    q, k, v = _split(name, d["conv_out"])
    return q, k, v, d["g"], d["beta"], d["state"].copy()


def _tiled(x, nk, axis):
    """llama.cpp's V-head reorder (conversion/qwen.py, _LinearAttentionVReorderBase.
    _reorder_v_heads): value heads grouped by key head [K0: v0..v(r-1), K1: ...] become
    tiled [K0 v0, K1 v0, ..., K0 v1, K1 v1, ...] along `axis`."""
    nv = x.shape[axis]
    order = np.arange(nv).reshape(nk, nv // nk).T.reshape(-1)
    return np.ascontiguousarray(np.take(x, order, axis=axis))


def _run(fn, name, tiled=False):
    """fn over the whole case; with tiled, on llama.cpp's reordered heads (q, k unchanged)
    and returned in HF's order again."""
    q, k, v, g, beta, state = _inputs(name)
    nk = CASES[name]["nk"]
    if tiled:
        v, g, beta, state = _tiled(v, nk, 1), _tiled(g, nk, 1), _tiled(beta, nk, 1), _tiled(state, nk, 0)
    out = np.full(v.shape, np.nan, np.float32)
    fn(q, k, v, g, beta, state, out, tiled, EPS)
    if tiled:  # back to grouped order: the inverse permutation
        order = np.argsort(np.arange(v.shape[1]).reshape(nk, -1).T.reshape(-1))
        out, state = out[:, order], state[order]
    return out, state


# --- conv1d -------------------------------------------------------------------------------

# K = 4 float32 products summed (in tap order here; torch's conv1d may add them otherwise)
# and silu (exp and a division, ~1 ulp each): a few ulp of the largest term. Measured 1.1e-7.
TOL_CONV = 5e-7


@pytest.mark.parametrize("name", list(CASES))
def test_conv_chunk_matches_hf_from_a_state_and_from_zeros(name):
    d = DATA[name]
    state = d["conv_state"].copy()
    out = np.full_like(d["mixed"], np.nan)
    conv_chunk(d["mixed"], state, d["conv_w"], out)
    assert _err(out, d["conv_out"]) <= TOL_CONV  # HF causal_conv1d_update over all n tokens
    assert np.array_equal(state, d["conv_state_out"])  # the last K-1 inputs, copied
    state = np.zeros_like(d["conv_state"])
    conv_chunk(d["mixed"], state, d["conv_w"], out)
    assert _err(out, d["conv_fresh"]) <= TOL_CONV  # HF causal_conv1d_fn, the prompt path


@pytest.mark.parametrize("name", list(CASES))
def test_conv_step_iterated_equals_conv_chunk(name):
    """One token at a time gives the prompt chunk's numbers bit for bit (same sums, same
    order), so a conversation continues as if its prompt had been one chunk."""
    d = DATA[name]
    s1, s2 = d["conv_state"].copy(), d["conv_state"].copy()
    whole = np.empty_like(d["mixed"])
    conv_chunk(d["mixed"], s1, d["conv_w"], whole)
    row = np.empty(d["mixed"].shape[1], np.float32)
    for t in range(d["mixed"].shape[0]):
        conv_step(d["mixed"][t], s2, d["conv_w"], row)
        assert np.array_equal(row, whole[t])
    assert np.array_equal(s1, s2)


def test_conv_chunk_split_anywhere_equals_one_chunk():
    """Pieces of 1, 2 (shorter than K - 1 = 3), 3 and more tokens continue each other."""
    d = DATA["equal130"]
    x, w = d["mixed"], d["conv_w"]
    s1 = d["conv_state"].copy()
    whole = np.empty_like(x)
    conv_chunk(x, s1, w, whole)
    s2 = d["conv_state"].copy()
    pieces = np.empty_like(x)
    cuts = [0, 1, 3, 4, 7, 9, 12, 40, 41, 100, 130]
    for a, b in zip(cuts, cuts[1:]):
        conv_chunk(x[a:b], s2, w, pieces[a:b])
        assert np.array_equal(s2, x[b - 3:b] if b >= 3 else np.concatenate([d["conv_state"][b:], x[:b]]))
    assert np.array_equal(pieces, whole)
    assert np.array_equal(s2, s1)


# --- gates --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gates_match_hf(name):
    d = DATA[name]
    g, beta = np.full_like(d["a"], np.nan), np.full_like(d["b"], np.nan)
    gates(d["a"], d["b"], d["dt_bias"], d["ssm_a"], g, beta)
    # softplus and sigmoid: exp and log1p within 1 ulp each here and in torch, then a product
    # or a division: 3 ulp (3.6e-7) relative, element by element. Measured 1.6e-7.
    assert np.all(np.abs(g - d["g"]) <= 3.6e-7 * np.abs(d["g"]))
    assert np.all(np.abs(beta - d["beta"]) <= 3.6e-7 * np.abs(d["beta"]))


def test_softplus_at_its_ends():
    """Above torch's threshold (20) softplus is x itself, so a large alpha gives a finite decay
    (log1p(exp(100)) would be inf); far below it is exp(x), not 0 (log1p keeps it)."""
    a = np.array([[100.0, 20.5, -30.0, 0.0]], np.float32)
    g, beta = np.empty_like(a), np.empty_like(a)
    gates(a, np.zeros_like(a), np.zeros(4, np.float32), np.full(4, -1.0, np.float32), g, beta)
    assert g[0, 0] == np.float32(-100.0) and g[0, 1] == np.float32(-20.5)
    assert abs(g[0, 2] + np.exp(-30.0)) <= 2.4e-7 * np.exp(-30.0) and abs(g[0, 3] + np.log(2.0)) <= 1.2e-7
    assert np.all(beta == np.float32(0.5))


# --- the gated delta rule -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gdn_tokens_matches_hf_recurrent(name):
    d = DATA[name]
    out, state = _run(gdn_tokens, name)
    assert _err(out, d["rec_out"]) <= TOL_RECURRENT
    assert _err(state, d["rec_state"]) <= TOL_RECURRENT


@pytest.mark.parametrize("name", list(CASES))
def test_gdn_chunk_matches_hf_chunked_and_recurrent(name):
    d = DATA[name]
    out, state = _run(gdn_chunk, name)
    assert _err(out, d["chunk_out"]) <= TOL_CHUNK
    assert _err(state, d["chunk_state"]) <= TOL_CHUNK
    assert _err(out, d["rec_out"]) <= TOL_CHUNK_VS_RECURRENT
    assert _err(state, d["rec_state"]) <= TOL_CHUNK_VS_RECURRENT


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("fn", [gdn_tokens, gdn_chunk], ids=["tokens", "chunk"])
def test_tiled_heads_match_hf(name, fn):
    """On llama.cpp's reordered V heads (qwen35 files), tiled=True reads the right key head;
    the grouped reading of the same arrays does not."""
    d = DATA[name]
    out, state = _run(fn, name, tiled=True)
    assert _err(out, d["rec_out"]) <= TOL_CHUNK_VS_RECURRENT
    assert _err(state, d["rec_state"]) <= TOL_CHUNK_VS_RECURRENT
    q, k, v, g, beta, state = _inputs(name)
    nk = CASES[name]["nk"]
    wrong = np.empty_like(v)
    fn(q, k, _tiled(v, nk, 1), _tiled(g, nk, 1), _tiled(beta, nk, 1), _tiled(state, nk, 0), wrong, False, EPS)
    assert _err(wrong, _tiled(d["rec_out"], nk, 1)) > 1e-2


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tiled", [False, True])
def test_gdn_step_iterated_equals_gdn_tokens(name, tiled):
    """Bit for bit: the decode step and the token loop share their per-head code."""
    q, k, v, g, beta, state = _inputs(name)
    out, s1 = np.empty_like(v), state.copy()
    gdn_tokens(q, k, v, g, beta, s1, out, tiled, EPS)
    s2, row = state.copy(), np.empty_like(v[0])
    for t in range(q.shape[0]):
        gdn_step(q[t], k[t], v[t], g[t], beta[t], s2, row, tiled, EPS)
        assert np.array_equal(row, out[t])
    assert np.array_equal(s1, s2)


@pytest.mark.parametrize("name,cut", [("grouped70", 64), ("grouped70", 65), ("equal130", 70), ("equal130", 129)])
def test_gdn_chunk_then_steps_match_hf_recurrent(name, cut):
    """A prompt of `cut` tokens in the chunked form, then decode steps from its state: HF's
    recurrent form over the whole sequence."""
    d = DATA[name]
    q, k, v, g, beta, state = _inputs(name)
    out = np.empty_like(v)
    gdn_chunk(q[:cut], k[:cut], v[:cut], g[:cut], beta[:cut], state, out[:cut], False, EPS)
    for t in range(cut, q.shape[0]):
        gdn_step(q[t], k[t], v[t], g[t], beta[t], state, out[t], False, EPS)
    assert _err(out, d["rec_out"]) <= TOL_CHUNK_VS_RECURRENT
    assert _err(state, d["rec_state"]) <= TOL_CHUNK_VS_RECURRENT


def test_gdn_chunk_split_continues():
    """Chunked prompts continue each other: 130 tokens as 30 + 100 (chunk boundaries fall
    elsewhere) is the same function as one call."""
    d = DATA["equal130"]
    q, k, v, g, beta, state = _inputs("equal130")
    out = np.empty_like(v)
    for a, b in ((0, 30), (30, 130)):
        gdn_chunk(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], state, out[a:b], False, EPS)
    assert _err(out, d["rec_out"]) <= TOL_CHUNK_VS_RECURRENT
    assert _err(state, d["rec_state"]) <= TOL_CHUNK_VS_RECURRENT


# --- the gated RMSNorm --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_gated_norm_matches_hf(name):
    d = DATA[name]
    out = np.full_like(d["rec_out"], np.nan)
    gated_norm(d["rec_out"], d["norm_w"], d["z"], EPS, out)
    # a mean square (float64 here, float32 in torch), rsqrt, three products and silu: a few
    # ulp of each element's scale. Measured 9.4e-8 (relative to the array's scale).
    assert _err(out, d["norm_out"]) <= 5e-7
    one = np.empty_like(out[0])  # one token's (nv, dv), as the decode step calls it
    gated_norm(d["rec_out"][0], d["norm_w"], d["z"][0], EPS, one)
    assert np.array_equal(one, out[0])


# --- HF directly (peer) -------------------------------------------------------------------


@pytest.mark.peer
def test_kernels_match_hf_at_wider_heads():
    """A fresh case at wider heads (dk = dv = 64, three V heads per key head, 150 tokens),
    computed by HF now; needs the hf-venv (tools/peer_env.sh)."""
    from make_deltanet_golden import HF_PYTHON, reference

    if not HF_PYTHON.is_file():
        pytest.skip(f"{HF_PYTHON} missing; run tools/peer_env.sh")
    spec = {"nk": 2, "nv": 6, "dk": 64, "dv": 64, "n": 150, "kernel": 4, "seed": 99}
    ref = {k.split("/", 1)[1]: v for k, v in reference({"wide": spec}).items()}
    n, nk, nv, dk, dv = spec["n"], spec["nk"], spec["nv"], spec["dk"], spec["dv"]
    state, conv = ref["conv_state"].copy(), np.empty_like(ref["mixed"])
    conv_chunk(ref["mixed"], state, ref["conv_w"], conv)
    assert _err(conv, ref["conv_out"]) <= TOL_CONV
    g, beta = np.empty((n, nv), np.float32), np.empty((n, nv), np.float32)
    gates(ref["a"], ref["b"], ref["dt_bias"], ref["ssm_a"], g, beta)
    assert _err(g, ref["g"]) <= 3.6e-7 and _err(beta, ref["beta"]) <= 3.6e-7
    q = np.ascontiguousarray(conv[:, :nk * dk].reshape(n, nk, dk))
    k = np.ascontiguousarray(conv[:, nk * dk:2 * nk * dk].reshape(n, nk, dk))
    v = np.ascontiguousarray(conv[:, 2 * nk * dk:].reshape(n, nv, dv))
    for fn, tol in ((gdn_tokens, TOL_RECURRENT), (gdn_chunk, TOL_CHUNK_VS_RECURRENT)):
        s, out = ref["state"].copy(), np.empty((n, nv, dv), np.float32)
        fn(q, k, v, g, beta, s, out, False, EPS)
        # the kernel's own conv and gates feed it here: their few ulp add to the error
        assert _err(out, ref["rec_out"]) <= 2 * tol and _err(s, ref["rec_state"]) <= 2 * tol
    normed = np.empty((n, nv, dv), np.float32)
    gated_norm(ref["rec_out"], ref["norm_w"], ref["z"], EPS, normed)
    assert _err(normed, ref["norm_out"]) <= 5e-7
