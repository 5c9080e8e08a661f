"""GPU offload (runtime/gpu.py, kernels/cuda.py) against the CPU runtime and HF transformers.

Marked `gpu`: they need CuPy and a CUDA device (see DEVELOPERS.md); CI runs only the
fallback tests at the bottom, which need neither.

Tolerances:
* dequantization: bit-exact (the CUDA structs repeat quants/decode.py's float32 operations).
* matvec: f32 products summed in another order than float64: relative error <= 1e-5
  (512 terms, unit roundoff 6e-8: ~sqrt(512) * 6e-8 = 1.4e-6 expected).
* one-token steps (matvec, fp16 KV cache as on the CPU) against the CPU's steps, which
  round activations to 16 bits per 256 values (~3e-5 of a product; the GPU keeps float32):
  relative RMS <= 1e-4 on the 2-block tiny models (measured 1e-7..1.7e-5), <= 5e-4 through the
  real-weights model's 30 blocks and output matrix (measured 5.0e-5 with 10 blocks offloaded,
  2.0e-4 with all), and the same top-1 everywhere.
* prompts (fp16 weights and activations into cuBLAS): no worse than llama.cpp's own error on
  the F16 file vs HF (golden), which rounds to fp16 the same way; and <= 2e-2 relative RMS of
  the CPU's logits on the real-weights model (fp16's unit roundoff 4.9e-4 per operand,
  through 30 blocks), with the same top-1 at >= 95% of the positions.
* mixtures of experts (tiny qwen3moe/qwen2moe, f16/q8_0/q4_k_m), against the CPU's logits:
  one-token steps and chunks of up to 8 tokens (f32 products; the router in f32; with
  cpu_moe the experts are the CPU's own kernels) <= 1e-4 relative RMS and the same top-1 for
  f16; <= 5e-4 for q8_0/q4_k_m, whose CPU steps round activations to 16 bits before every
  product (the CPU's own steps differ from its float32 prompt products by 2.1e-4..2.6e-4 on
  these files, more than the dense tiny models as each token passes 2 more products per expert); prompts (fp16 operands into cuBLAS, as the dense prompts) <= 2e-3,
  3x the dense tiny prompts' largest error from HF (6.6e-4), and the same top-1 at >= 95% of
  the positions (a token whose k-th and next experts are closer than fp16 rounding may pick
  the other one: the top-1 bar allows such a token, the RMS bar a few).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import cpuq
from cpuq.runtime import gpu as gpu_mod
from cpuq.runtime.model import GpuFallbackWarning
from make_runtime_golden import IDS, build_case

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "runtime_logits.npz"
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _rel_rms(got, ref) -> float:
    return float(np.sqrt(np.mean((np.asarray(got, np.float64) - ref) ** 2) / np.mean(np.asarray(ref, np.float64) ** 2)))


@pytest.fixture(scope="module")
def cp():
    cupy, why = gpu_mod.find_gpu()
    if cupy is None:
        pytest.skip(why)
    return cupy


def _blocks(qtype: str, rows: int, cols: int, seed: int):
    x = np.random.default_rng(seed).normal(0, 1, (rows, cols)).astype(np.float32)
    data = cpuq.quantize(x, qtype)
    return data, cpuq.dequantize(data, qtype, (rows, cols))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_bit_exact(cp, qtype):
    from cpuq.kernels.cuda import TYPE_STRUCTS
    rows, cols = 7, 512
    data, ref = _blocks(qtype, rows, cols, seed=len(qtype))
    struct = TYPE_STRUCTS[int(cpuq.get_qtype(qtype).ggml_type)]
    module = gpu_mod._module(0)
    for out_type, dtype in (("float", cp.float32), ("__half", cp.float16)):
        out = cp.full((rows, cols), np.nan, dtype)  # poisoned: every element must be written
        parts = rows * cols // 32
        module.get_function(f"dequant<{struct}, {out_type}>")(
            (-(-parts // 128),), (128,), (cp.asarray(data), np.int64(rows), np.int32(cols), out))
        want = ref if dtype == cp.float32 else ref.astype(np.float16)
        assert np.array_equal(out.get(), want), f"{qtype} -> {out_type}"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
def test_matvec_matches_float64(cp, qtype):
    from cpuq.kernels.cuda import MATVEC_WARPS, TYPE_STRUCTS
    rows, cols, n = 37, 512, 3
    data, w = _blocks(qtype, rows, cols, seed=1)
    x = np.random.default_rng(2).normal(0, 1, (n, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    struct = TYPE_STRUCTS[int(cpuq.get_qtype(qtype).ggml_type)]
    module = gpu_mod._module(0)
    y0 = np.random.default_rng(3).normal(0, 1, (n, rows)).astype(np.float32)
    for add in (False, True):
        y = cp.asarray(y0)
        module.get_function(f"matvec<{struct}, {'true' if add else 'false'}>")(
            (-(-rows // MATVEC_WARPS), n), (32 * MATVEC_WARPS,),
            (cp.asarray(data), np.int32(rows), np.int32(cols), cp.asarray(x), np.int32(cols), y, np.int32(rows)))
        want = ref + y0 if add else ref
        err = np.abs(y.get() - want).max() / np.abs(want).max()
        assert err <= 1e-5, f"{qtype} add={add}: {err:.2e}"


@pytest.fixture(scope="module")
def tiny(module_tmp_factory):
    """F32 and Q8_0 GGUF files of the four golden tiny checkpoints."""
    where = module_tmp_factory.mktemp("gpu-ckpt")
    out = {}
    for name in ("qwen2", "qwen3", "llama", "qwen2_yarn"):
        src = build_case(name, where)
        for qtype in ("f32", "q8_0"):
            out[name, qtype] = cpuq.convert(src, where / f"{name}-{qtype}.gguf", qtype)
    return out


def _steps(m, ids):
    """Logits after each token, fed one at a time (the decode path)."""
    m.reset()
    return np.stack([m.eval([t]) for t in ids])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama", "qwen2_yarn"])
@pytest.mark.parametrize("gpu_layers", [1, -1])
def test_tiny_models_agree_with_cpu_and_hf(cp, tiny, name, gpu_layers):
    golden = np.load(GOLDEN)
    cols = golden[f"{name}/columns"]
    with cpuq.load(tiny[name, "f32"], n_ctx=64) as cpu, cpuq.load(tiny[name, "f32"], n_ctx=64, gpu_layers=gpu_layers) as g:
        assert g.gpu_status.startswith("1 of 2" if gpu_layers == 1 else "2 of 2 layers and the output")
        # prompt path (fp16 + cuBLAS): against HF, no worse than llama.cpp on the F16 file
        got = g.logits(IDS)
        ours = _rel_rms(got[:, cols], golden[f"{name}/hf"])
        theirs = _rel_rms(golden[f"{name}/llama_f16"], golden[f"{name}/hf"])
        print(f"{name} gpu_layers={gpu_layers}: prompt vs HF {ours:.2e} (llama.cpp F16 {theirs:.2e})")
        assert ours <= theirs
        assert np.array_equal(got.argmax(1), golden[f"{name}/hf_top1"])
        # one-token steps (matvec, the recorded graph) against the CPU's steps
        ref = _steps(cpu, IDS)
        step = _steps(g, IDS)
        err = _rel_rms(step, ref)
        print(f"{name} gpu_layers={gpu_layers}: steps vs CPU {err:.2e}")
        assert err <= 1e-4
        assert np.array_equal(step.argmax(1), ref.argmax(1))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_layers", [1, -1])
def test_chunks_with_no_rows_asked_for(cp, tiny, monkeypatch, gpu_layers):
    """logits(ids, first) whose first chunks need no output rows (perplexity's windows past
    N_BATCH tokens; 4 here): those chunks still fill the GPU's cache, the rows asked for
    agree with the CPU's."""
    from cpuq.runtime import model as model_mod
    monkeypatch.setattr(model_mod, "N_BATCH", 4)
    with cpuq.load(tiny["qwen3", "f32"], n_ctx=64) as cpu, \
            cpuq.load(tiny["qwen3", "f32"], n_ctx=64, gpu_layers=gpu_layers) as g:
        ref = cpu.logits(IDS[:14], first=9)
        got = g.logits(IDS[:14], first=9)
    assert got.shape == ref.shape == (5, ref.shape[1])
    err = _rel_rms(got, ref)
    print(f"gpu_layers={gpu_layers}: rows after skipped chunks vs CPU {err:.2e}")
    assert err <= 1e-4  # as the steps above; 2.3e-5 measured (H100, both gpu_layers)


@pytest.mark.gpu
def test_q8_0_prompt_then_steps_and_chat_cache(cp, tiny):
    """A prompt (cuBLAS), then steps that read its keys (graph), across a reset and with
    a prefix reused from the cache, as generate/chat use them."""
    with cpuq.load(tiny["qwen3", "q8_0"], n_ctx=64) as cpu, cpuq.load(tiny["qwen3", "q8_0"], n_ctx=64, gpu_layers=-1) as g:
        for m in (cpu, g):
            m.reset()
        outs = {}
        for key, m in (("cpu", cpu), ("gpu", g)):
            toks = list(m.generate(IDS[:12], max_tokens=6, temperature=0, ignore_eos=True))
            again = list(m.generate(IDS[:12], max_tokens=6, temperature=0, ignore_eos=True))  # cache reuse
            outs[key] = (toks, again)
        assert outs["gpu"][0] == outs["gpu"][1]
        assert outs["gpu"] == outs["cpu"]


@pytest.mark.gpu
def test_real_weights_gpu_matches_cpu(cp):
    from cpuq.demo import demo_model_path
    try:
        path = demo_model_path()
    except Exception as e:
        pytest.skip(f"demo model not installed: {e}")
    with cpuq.load(path, n_ctx=512) as cpu:
        ids = cpu.tokenize("The capital of France is Paris. The capital of Germany is Berlin. " * 4)
        ref = cpu.logits(ids)
        ref_steps = _steps(cpu, ids[:24])
    for gpu_layers in (10, -1):
        with cpuq.load(path, n_ctx=512, gpu_layers=gpu_layers) as g:
            got = g.logits(ids)
            err = _rel_rms(got, ref)
            agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
            steps = _steps(g, ids[:24])
            step_err = _rel_rms(steps, ref_steps)
            assert np.array_equal(steps.argmax(1), ref_steps.argmax(1))
            print(f"real weights gpu_layers={gpu_layers}: prompt {err:.2e} top-1 {agree:.1%}, steps {step_err:.2e}")
            assert err <= 2e-2 and agree >= 0.95
            assert step_err <= 5e-4
            g.reset()
            text = "".join(g.generate("The capital of France is", max_tokens=4, temperature=0))
            assert "Paris" in text


# Mixture of experts (qwen3moe, qwen2moe): the experts on the GPU, or on the CPU (cpu_moe) ---

MOE_PROMPT = IDS * 3  # 60 tokens: most experts get more than MATVEC_MAX_TOKENS (the grouped fp16 path)


@pytest.fixture(scope="module")
def tiny_moe(module_tmp_factory):
    """f16, q8_0 and q4_k_m files of tiny qwen3moe (8 experts, 2 used, renormalized) and
    qwen2moe (6 experts, 2 used, a gated shared expert) checkpoints, 256 wide so that
    q4_k_m's expert stacks are K-quants."""
    from make_tiny_checkpoint import make_tiny_checkpoint
    where = module_tmp_factory.mktemp("gpu-moe")
    out = {}
    for arch, extra in (("qwen3moe", {}), ("qwen2moe", {"shared_expert_intermediate_size": 256})):
        src = make_tiny_checkpoint(where / arch, arch=arch, dtype="f32", seed=3, hidden_size=256,
                                   moe_intermediate_size=256, **extra)
        for qtype in ("f16", "q8_0", "q4_k_m"):
            out[arch, qtype] = cpuq.convert(src, where / f"{arch}-{qtype}.gguf", qtype)
    return out


@pytest.fixture(scope="module")
def moe_cpu(tiny_moe):
    """The CPU's prompt logits and one-token steps of each file (computed once)."""
    done = {}

    def reference(path):
        if path not in done:
            with cpuq.load(path, n_ctx=128) as cpu:
                done[path] = cpu.logits(MOE_PROMPT), _steps(cpu, IDS)
        return done[path]
    return reference


@pytest.mark.gpu
@pytest.mark.parametrize("cpu_moe", [False, True])
@pytest.mark.parametrize("gpu_layers", [1, -1])
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_moe_agrees_with_cpu(cp, tiny_moe, moe_cpu, arch, qtype, gpu_layers, cpu_moe):
    path = tiny_moe[arch, qtype]
    ref_prompt, ref_steps = moe_cpu(path)
    with cpuq.load(path, n_ctx=128, gpu_layers=gpu_layers, cpu_moe=cpu_moe) as g:
        assert g.gpu_status.startswith("1 of 2" if gpu_layers == 1 else "2 of 2 layers and the output")
        where = f"{arch} {qtype} gpu_layers={gpu_layers} cpu_moe={cpu_moe}"
        # a prompt (fp16 + cuBLAS products; the experts grouped by token, or the CPU's)
        got = g.logits(MOE_PROMPT)
        err = _rel_rms(got, ref_prompt)
        agree = float(np.mean(got.argmax(1) == ref_prompt.argmax(1)))
        # a few tokens (the per-pick expert products without the graph) and one-token steps
        # (the recorded graph; op by op with cpu_moe) against the CPU's steps
        few = _rel_rms(g.logits(IDS[:6]), ref_steps[:6])
        step = _steps(g, IDS)
        step_err = _rel_rms(step, ref_steps)
        print(f"{where}: prompt vs CPU {err:.2e} top-1 {agree:.0%}, 6 tokens {few:.2e}, steps {step_err:.2e}")
        assert err <= 2e-3 and agree >= 0.95
        bar = 1e-4 if qtype == "f16" else 5e-4  # the CPU's 16-bit activations: see the docstring
        assert few <= bar and step_err <= bar
        assert np.array_equal(step.argmax(1), ref_steps.argmax(1))


@pytest.mark.gpu
@pytest.mark.parametrize("cpu_moe", [False, True])
def test_moe_generate_matches_cpu(cp, tiny_moe, cpu_moe):
    """A prompt, then greedy steps that read its keys, across a cache reuse, as chat does."""
    path = tiny_moe["qwen2moe", "q4_k_m"]
    outs = {}
    with cpuq.load(path, n_ctx=64) as cpu, cpuq.load(path, n_ctx=64, gpu_layers=-1, cpu_moe=cpu_moe) as g:
        for key, m in (("cpu", cpu), ("gpu", g)):
            outs[key] = [list(m.generate(IDS[:12], max_tokens=6, temperature=0, ignore_eos=True)) for _ in range(2)]
    assert outs["gpu"] == outs["cpu"]


@pytest.mark.gpu
def test_cpu_moe_leaves_the_experts_in_ram(cp, tiny_moe):
    from cpuq.runtime.forward import Rope
    from cpuq.runtime.weights import Matrix
    with cpuq.load(tiny_moe["qwen2moe", "q8_0"], n_ctx=32) as m:
        w, cfg = m.weights, m.config
        stacks = ("gate_exps", "up_exps", "down_exps")
        for cpu_moe in (False, True):
            g = gpu_mod.GpuOffload(w, cfg, Rope.from_config(cfg), -1, "f16", cpu_moe=cpu_moe)
            for layer, host in zip(g.layers, w.layers):
                for name in stacks:
                    if cpu_moe:
                        assert getattr(layer, name) is getattr(host, name)
                    else:
                        assert not isinstance(getattr(layer, name), Matrix)
                        assert getattr(layer, name).data.nbytes == getattr(host, name).data.nbytes
                assert not isinstance(layer.gate_shexp, Matrix)  # the shared expert goes to the GPU


# CI (no GPU): what happens without CuPy or a device -------------------------------------

def test_no_gpu_falls_back_to_cpu_with_one_warning(tiny_gguf_cpu, monkeypatch):
    monkeypatch.setattr(gpu_mod, "find_gpu", lambda: (None, "no CUDA device here"))
    with cpuq.load(tiny_gguf_cpu, n_ctx=32) as cpu:
        ref = cpu.logits(IDS[:5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cpuq.load(tiny_gguf_cpu, n_ctx=32, gpu_layers=-1) as m:
            got = m.logits(IDS[:5])
            assert m.gpu_status == "CPU only: no CUDA device here"
    msgs = [str(w.message) for w in caught if issubclass(w.category, GpuFallbackWarning)]
    assert msgs == ["gpu_layers=-1 ignored, running on the CPU: no CUDA device here"]
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("bad", [-2, 1.5, "all", True])
def test_bad_gpu_layers_is_an_input_error(tiny_gguf_cpu, bad):
    with pytest.raises(cpuq.InputError, match="gpu_layers must be"):
        cpuq.load(tiny_gguf_cpu, gpu_layers=bad)


def test_offloaded_layers_follow_llama_cpp():
    class Cfg:
        n_layer = 24
    assert gpu_mod.offloaded(Cfg, 0) == (24, False)
    assert gpu_mod.offloaded(Cfg, 4) == (20, False)
    assert gpu_mod.offloaded(Cfg, 24) == (0, False)
    assert gpu_mod.offloaded(Cfg, 25) == (0, True)
    assert gpu_mod.offloaded(Cfg, -1) == (0, True)


def test_cpu_moe_without_gpu_falls_back_to_cpu(tmp_path, monkeypatch):
    from make_tiny_checkpoint import make_tiny_checkpoint
    path = cpuq.convert(make_tiny_checkpoint(tmp_path / "ckpt", arch="qwen3moe", dtype="f32"), tmp_path / "m.gguf",
                        "q8_0")
    monkeypatch.setattr(gpu_mod, "find_gpu", lambda: (None, "no CUDA device here"))
    with cpuq.load(path, n_ctx=32) as cpu:
        ref = cpu.logits(IDS[:5])
    with pytest.warns(GpuFallbackWarning, match="gpu_layers=-1 ignored, running on the CPU: no CUDA device here"):
        m = cpuq.load(path, n_ctx=32, gpu_layers=-1, cpu_moe=True)
    with m:
        assert np.array_equal(m.logits(IDS[:5]), ref)


@pytest.fixture(scope="module")
def tiny_gguf_cpu(module_tmp_factory):
    where = module_tmp_factory.mktemp("gpu-fallback")
    return cpuq.convert(build_case("qwen2", where), where / "m.gguf", "q8_0")

