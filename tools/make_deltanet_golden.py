"""Golden file for the Gated DeltaNet kernels (cpuq/kernels/deltanet.py), so CI, which has no
torch, still checks them against HF transformers' own functions:

* tests/golden/deltanet.npz: for each case of CASES, seeded random inputs and what
  transformers.models.qwen3_5.modeling_qwen3_5 computes from them in float32:
  causal_conv1d_fn (from zeros) and causal_conv1d_update (from a nonzero conv state, all n
  tokens at once) with silu; the gates (-exp(A_log) * F.softplus(a + dt_bias), sigmoid(b));
  torch_recurrent_gated_delta_rule and torch_chunk_gated_delta_rule (use_qk_l2norm_in_kernel,
  from a nonzero recurrent state, final states too) on the conv output's q, k, v; and
  Qwen3_5RMSNormGated on the recurrent output. Keys are "<case>/<name>"; "cases" holds CASES.

    .venv/bin/python tools/make_deltanet_golden.py   # writes the file (~170 KB)

Needs HF transformers with torch (CPUQ_HF_VENV, built by tools/peer_env.sh).
tests/kernels/test_deltanet.py also calls `reference` directly in its peer test.

Imports numpy and the sibling tools; runs torch only in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_runtime_golden import HF_PYTHON  # noqa: E402
from toolcli import ToolError, output_file, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "deltanet.npz"

# name -> shapes and seed: nk == nv and nk < nv (V heads grouped 2 and 3 per key head),
# dk != dv, n of 1, 5 and across chunk boundaries (70, 130: not multiples of 64), the
# conv kernel size of the released models (4). Small widths keep the file small.
CASES: dict[str, dict] = {
    "grouped70": {"nk": 2, "nv": 4, "dk": 8, "dv": 6, "n": 70, "kernel": 4, "seed": 1},
    "equal130": {"nk": 2, "nv": 2, "dk": 8, "dv": 4, "n": 130, "kernel": 4, "seed": 2},
    "grouped5": {"nk": 2, "nv": 6, "dk": 4, "dv": 8, "n": 5, "kernel": 4, "seed": 3},
    "one": {"nk": 1, "nv": 3, "dk": 8, "dv": 8, "n": 1, "kernel": 4, "seed": 4},
}
EPS = 1e-6  # HF's l2norm eps, and the RMSNormGated eps given to it here (rms_norm_eps)


def case_inputs(nk: int, nv: int, dk: int, dv: int, n: int, kernel: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 inputs of one case. The decay is realistic: A_log = log(U(1, 16)) as
    HF's init draws it, dt_bias ~ U(-5, 1), so some heads forget within a token and some keep
    their state over the whole sequence (softplus(-5 + a) ~ 0.007)."""
    rng = np.random.default_rng(seed)
    c = 2 * nk * dk + nv * dv

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {
        "mixed": normal(n, c), "conv_w": normal(c, kernel, scale=0.5), "conv_state": normal(kernel - 1, c),
        "a": normal(n, nv), "b": normal(n, nv),
        "dt_bias": rng.uniform(-5.0, 1.0, nv).astype(np.float32),
        "A_log": np.log(rng.uniform(1.0, 16.0, nv)).astype(np.float32),
        "state": normal(nv, dk, dv, scale=0.5), "z": normal(n, nv, dv),
        "norm_w": (1.0 + rng.standard_normal(dv) * 0.1).astype(np.float32),
    }


# HF's functions on every case of an npz of inputs ("<case>/<name>", "<case>/dims" =
# [nk, nv, dk, dv]); writes "<case>/<output>" to the second path.
_HF = """
import sys
import numpy as np, torch
import torch.nn.functional as F
from transformers.models.qwen3_5 import modeling_qwen3_5 as m
torch.set_num_threads(2)
src, eps = np.load(sys.argv[1]), float(sys.argv[3])
out = {}
for case in sorted({k.split("/")[0] for k in src.files}):
    x = {k.split("/")[1]: torch.from_numpy(src[k]) for k in src.files if k.startswith(case + "/")}
    nk, nv, dk, dv = (int(d) for d in x["dims"])
    n, c = x["mixed"].shape
    with torch.no_grad():
        h = x["mixed"].T.unsqueeze(0)  # (1, C, n)
        fresh = m.causal_conv1d_fn(h, x["conv_w"], None, activation="silu")
        state = x["conv_state"].T.unsqueeze(0).contiguous()  # (1, C, K-1)
        conv = m.causal_conv1d_update(h, state, x["conv_w"], None, activation="silu")
        ssm_a = -torch.exp(x["A_log"])  # what llama.cpp's converter stores as ssm_a
        g = -x["A_log"].float().exp() * F.softplus(x["a"] + x["dt_bias"])
        beta = x["b"].sigmoid()
        mixed = conv[0].T.unsqueeze(0)  # (1, n, C)
        q = mixed[..., :nk * dk].reshape(1, n, nk, dk)
        k = mixed[..., nk * dk:2 * nk * dk].reshape(1, n, nk, dk)
        v = mixed[..., 2 * nk * dk:].reshape(1, n, nv, dv)
        args = (q, k, v, g.unsqueeze(0), beta.unsqueeze(0))
        kw = dict(initial_state=x["state"].unsqueeze(0), output_final_state=True, use_qk_l2norm_in_kernel=True)
        rec, rec_state = m.torch_recurrent_gated_delta_rule(*args, **kw)
        chunk, chunk_state = m.torch_chunk_gated_delta_rule(*args, chunk_size=64, **kw)
        norm = m.Qwen3_5RMSNormGated(dv, eps=eps)
        norm.weight.copy_(x["norm_w"])
        normed = norm(rec[0].reshape(-1, dv), x["z"].reshape(-1, dv)).reshape(n, nv, dv)
    for name, t in {"conv_fresh": fresh[0].T, "conv_out": conv[0].T, "conv_state_out": state[0].T,
                    "ssm_a": ssm_a, "g": g, "beta": beta, "rec_out": rec[0], "rec_state": rec_state[0],
                    "chunk_out": chunk[0], "chunk_state": chunk_state[0], "norm_out": normed}.items():
        out[case + "/" + name] = np.ascontiguousarray(t.numpy().astype(np.float32))
np.savez(sys.argv[2], **out)
"""


def reference(cases: dict[str, dict]) -> dict[str, np.ndarray]:
    """Inputs and HF's outputs of `cases` (name -> case_inputs' keyword arguments), as
    "<case>/<name>" arrays."""
    entries: dict[str, np.ndarray] = {}
    for name, spec in cases.items():
        entries.update({f"{name}/{k}": v for k, v in case_inputs(**spec).items()})
        entries[f"{name}/dims"] = np.array([spec["nk"], spec["nv"], spec["dk"], spec["dv"]], np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **entries)
        r = subprocess.run([str(HF_PYTHON), "-c", _HF, str(src), str(dst), repr(EPS)], capture_output=True, text=True)
        if r.returncode != 0:
            last = ((r.stdout + r.stderr).strip().splitlines() or ["no output"])[-1]
            raise ToolError(f"{HF_PYTHON} failed (exit {r.returncode}): {last}")
        with np.load(dst) as hf:
            entries.update({k: hf[k] for k in hf.files})
    return entries


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise ToolError(f"unexpected arguments {argv}: make_deltanet_golden.py takes none")
    if not HF_PYTHON.is_file():
        raise ToolError(f"{HF_PYTHON}: reference venv missing; run tools/peer_env.sh")
    entries = reference(CASES)
    entries["cases"] = np.array(json.dumps(CASES))
    entries["eps"] = np.float64(EPS)
    with output_file(OUT) as part, open(part, "wb") as f:  # a file object: savez would add ".npz"
        np.savez_compressed(f, **entries)
    for name in CASES:
        rec, chunk = entries[f"{name}/rec_out"], entries[f"{name}/chunk_out"]
        print(f"{name}: HF's chunked vs recurrent output, max abs difference {np.abs(rec - chunk).max():.2e}")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    run(main, sys.argv[1:])
