"""cpuq's hybrid Gated-DeltaNet forward pass (qwen35, qwen35moe, qwen3next) against HF
transformers and llama.cpp, through golden logits (tools/make_hybrid_golden.py: HF float32
on tiny checkpoints of the three classes, dense and MoE, split and stacked experts, 2 key /
4 value heads, the vision-language layout; llama.cpp on cpuq's F16 and F32 files of each),
and its paths against each other. The
checkpoints are rebuilt from the golden's arguments and converted by cpuq.

Tolerances (measured on these checkpoints, in brackets):
* F32 GGUF with a float32 KV cache vs HF, 80 tokens: relative RMS <= 1e-4 (the issue's
  bar) and the same top-1 everywhere, whether the tokens come as one prompt, as a prompt
  and then one decode step each, or as prompts of several calls; both compute the same
  float32 function, only summation order differs (the delta rule's state sums, the conv,
  the products) [2e-6 .. 6e-6].
* The one-token decode step (kernels.step) equals the prompt path token by token bit for
  bit: the same kernels (deltanet.gdn_tokens is gdn_step's loop) in the same order.
* Rewinding to a snapshot (a chat turn that shares a prefix with the last) gives the
  logits of evaluating the whole prompt afresh, to float32 summation order (relative RMS
  <= 1e-5: the prompt is cut into other calls; a stale or wrong state moves them by 1e-2
  and more) [< 1e-6].
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cpuq
from cpuq.arch import ModelConfig
from cpuq.runtime import forward as fw
from make_hybrid_golden import CASES, IDS, build_case

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "hybrid_logits.npz"
ARCHS = {"qwen35": "qwen35", "qwen35_mtp": "qwen35", "qwen35_conditional": "qwen35",
         "qwen35moe_split": "qwen35moe", "qwen35moe_fused": "qwen35moe", "qwen3next": "qwen3next"}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def f32_files(module_tmp_factory, golden):
    """name -> cpuq's F32 file of the golden case's checkpoint."""
    where = module_tmp_factory.mktemp("hybrid")
    names = list(json.loads(str(golden["cases"])))
    assert sorted(names) == sorted(CASES) == sorted(ARCHS)
    return {name: cpuq.convert(build_case(name, where), where / f"{name}.gguf", "f32") for name in names}


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def _check(got: np.ndarray, golden, name: str, what: str) -> None:
    ref = golden[f"{name}/hf"]
    err = _rel_rms(got[:, golden[f"{name}/columns"]], ref)
    assert err <= 1e-4, f"{name}, {what}: relative RMS vs HF {err:.2e}"
    assert np.array_equal(got.argmax(1), golden[f"{name}/hf_top1"]), f"{name}, {what}: top-1 differs from HF"


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_f32_logits_match_transformers(name, golden, f32_files):
    """One 80-token prompt; the same as a 50-token prompt continued one decode step at a
    time; and as prompts of 37, 33 and 10 tokens (each continuing the states)."""
    with cpuq.load(f32_files[name], n_ctx=128, kv_type="f32") as m:
        assert m.config.arch == ARCHS[name] and m.config.spec.hybrid
        assert any(m.config.recurrent) and not all(m.config.recurrent)
        _check(m.logits(IDS), golden, name, "one prompt")
        m.reset()
        parts = [m._append(np.array(IDS[:50], np.int64))[None]]  # logits after token 50 only
        parts += [m.eval([t])[None] for t in IDS[50:]]
        got = np.concatenate(parts)
        ref = golden[f"{name}/hf"][49:]
        err = _rel_rms(got[:, golden[f"{name}/columns"]], ref)
        assert err <= 1e-4, f"{name}, prompt then steps: relative RMS vs HF {err:.2e}"
        assert np.array_equal(got.argmax(1), golden[f"{name}/hf_top1"][49:])
        cache = fw.KVCache(m.config, 128, "f32")
        rows = [m._paths.run(np.array(IDS[lo:hi], np.int64), cache, 0) for lo, hi in ((0, 37), (37, 70), (70, 80))]
        _check(np.concatenate(rows), golden, name, "three prompts")


def _token_by_token(m, ids, pack):
    cache = fw.KVCache(m.config, 128)
    return np.concatenate([fw.forward(m.weights, m.config, m._rope, np.array([t], np.int64), cache, 0, steps=pack)
                           for t in ids])


@pytest.mark.parametrize("name, qtype", [("qwen35_mtp", "q8_0"), ("qwen35moe_fused", "q8_0"), ("qwen3next", "q8_0"),
                                         ("qwen35", "f32")])
def test_one_token_steps_are_the_composed_kernels(name, qtype, golden, f32_files, tmp_path):
    """The decode step (hybrid's stages bound to kernels.step, one Numba call through every
    block: DeltaNet and attention blocks alike) gives bit-identical logits to the same
    stages bound to the chunk ops, token by token."""
    path = f32_files[name] if qtype == "f32" else cpuq.convert(build_case(name, tmp_path), tmp_path / "m.gguf", qtype)
    with cpuq.load(path, n_ctx=128) as m:
        if qtype != "f32":
            assert m._steps is not None and m._paths.choose(1, None) == "step"
        chunk = _token_by_token(m, IDS[:24], None)
        if m._steps is not None:
            np.testing.assert_array_equal(_token_by_token(m, IDS[:24], m._steps), chunk)
        cache = fw.KVCache(m.config, 128)
        prompt = fw.forward(m.weights, m.config, m._rope, np.array(IDS[:24], np.int64), cache, 0)
    # a prompt's products sum in another order (f32), and round the activations otherwise
    # than the step's int16 per 256 values (q8_0; test_moe's long prompt measures 1.5e-4 ..
    # 2.2e-4 and bounds it at 1e-3 for the same reason) [f32 ~1e-7, q8_0 2.8e-4]
    assert _rel_rms(prompt, chunk) <= (1e-5 if qtype == "f32" else 1e-3)


def test_chat_turns_rewind_to_a_snapshot(golden, f32_files):
    """A recurrent state cannot drop tokens: the runtime keeps the states before a prompt's
    last token and comes back there when the next prompt shares that prefix (a chat's next
    turn, or the same prompt again), evaluating only the rest; a prefix without a snapshot
    starts over. Each time the logits are a fresh evaluation's of the whole prompt."""
    name = "qwen35_mtp"
    with cpuq.load(f32_files[name], n_ctx=128, kv_type="f32") as m:
        fresh = m.logits(IDS)

        def same(got, want):
            assert _rel_rms(got[None], want[None]) <= 1e-5
        first = IDS[:40]
        same(m._ingest(list(first)), fresh[39])
        assert m.timings.prompt_tokens == 40 and 39 in m._cache.snapshots
        # the same prompt again: back to the snapshot before its last token
        same(m._ingest(list(first)), fresh[39])
        assert m.timings.prompt_tokens == 1
        # generate past it, then a longer prompt that diverges after the first 40 tokens
        m._append(np.array([11, 12, 13], np.int64))
        same(m._ingest(list(IDS[:60])), fresh[59])
        assert m.timings.prompt_tokens == 60 - 39  # from the snapshot, not from 0 or from 43
        # a prompt diverging before any snapshot: from the start
        other = [IDS[0] + 1] + list(IDS[1:30])
        fresh_other = m.logits(other)
        same(m._ingest(other), fresh_other[-1])
        assert m.timings.prompt_tokens == 30


def test_info_says_the_recurrent_state_is_fixed(f32_files):
    from cpuq.info import summarize
    s = summarize(f32_files["qwen35moe_fused"])
    with cpuq.open_gguf(f32_files["qwen35moe_fused"]) as f:
        cfg = ModelConfig.from_gguf(f)
    mem = s["memory"]
    assert mem["recurrent_blocks"] == 3 and mem["attention_blocks"] == 1 == cfg.n_layer - sum(cfg.recurrent)
    per_block = 4 * ((cfg.ssm_d_conv - 1) * cfg.ssm_conv_dim + cfg.ssm_dt_rank * cfg.ssm_d_state * cfg.ssm_head_v_dim)
    assert mem["recurrent_state_bytes"] == 3 * per_block
    assert mem["kv_bytes_per_token"] == 2 * 1 * cfg.n_head_kv * cfg.head_dim * 2
    out = subprocess.run([sys.executable, "-m", "cpuq.cli", "info", str(f32_files["qwen35moe_fused"])],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0 and "Gated DeltaNet blocks" in out.stdout and "whatever the context" in out.stdout


# llama.cpp ---------------------------------------------------------------------------------
# The golden also holds llama.cpp's logits (llama-cpp-python, default settings: f16 KV cache)
# on cpuq's F16 and F32 files of each checkpoint. Measured on these checkpoints:
# * llama.cpp on cpuq's F32 file vs HF: 4.4e-5 .. 5.9e-5 relative RMS, top-1 the same at
#   every position. llama.cpp loads cpuq's hybrid files and computes HF's function on
#   them, its fp16 KV cache the only rounding: llama.cpp runs cpuq's files and agrees with
#   its own reading of the model (cpuq's files are byte-identical to llama.cpp's
#   convert_hf_to_gguf.py's, test_convert_hybrid).
# * llama.cpp on cpuq's F16 file vs HF: 4.8e-3 .. 1.7e-2 (dense and Qwen3-Next), top-1 the
#   same at 95% .. 99% of positions; the MoE hybrids 9.5e-2 and 1.6e-1, top-1 81% and 88%:
#   rounding the weights to f16 flips near-tied router choices of these random experts, and
#   a DeltaNet block carries a changed token into every later state. cpuq's own F16 logits
#   are as far (1.6e-1 on qwen35moe_split), its F32 file with an fp16 KV cache 3.6e-5.
# The bars: cpuq's F16 file no further from HF than llama.cpp's F16, as test_moe (the MoE
# hybrids: 1.25x, test_f16_logits_as_close_as_llama_cpp says why); cpuq's F32
# file with the default fp16 KV cache no further than llama.cpp's F16, as test_logits; and
# llama.cpp's F32 within 2e-4 of HF (its f16 cache rounds K and V to 2^-11 relative; 3.4x
# the measured worst, still 1/25 of what an f16 rounding of the weights moves them) with
# HF's top-1 everywhere.

@pytest.mark.parametrize("name", sorted(ARCHS))
def test_llama_cpp_runs_cpuqs_files_and_agrees(name, golden):
    hf = golden[f"{name}/hf"]  # on HF's columns, llama.cpp's beside them
    err = _rel_rms(golden[f"{name}/llama_f32"], hf)
    assert err <= 2e-4, f"{name}: llama.cpp on cpuq's F32 file {err:.2e} from HF"
    assert np.array_equal(golden[f"{name}/llama_f32_top1"], golden[f"{name}/hf_top1"])
    # on the F16 file, llama.cpp's own rounding: the dense hybrids stay close; the MoE ones
    # flip router choices (above), so they are held to what was measured with room
    err16 = _rel_rms(golden[f"{name}/llama_f16"], hf)
    same16 = np.mean(golden[f"{name}/llama_f16_top1"] == golden[f"{name}/hf_top1"])
    moe = ARCHS[name] == "qwen35moe"
    assert err16 <= (0.25 if moe else 3e-2) and same16 >= (0.75 if moe else 0.9), (err16, same16)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_f16_logits_as_close_as_llama_cpp(name, golden, tmp_path):
    path = cpuq.convert(build_case(name, tmp_path), tmp_path / "m.gguf", "f16")
    with cpuq.load(path, n_ctx=128) as m:  # the default fp16 KV cache, as llama.cpp's
        got = m.logits(IDS)
    cols, hf = golden[f"{name}/columns"], golden[f"{name}/hf"]
    ours, theirs = _rel_rms(got[:, cols], hf), _rel_rms(golden[f"{name}/llama_f16"], hf)
    # cpuq keeps activations in float32 where llama.cpp rounds them to f16: measured 0.27 ..
    # 0.88 of llama.cpp's error on the dense hybrids and Qwen3-Next. On the MoE hybrids both
    # are dominated by router choices that the f16 weights flip (above), which each side's
    # other roundings flip a little differently: 0.98 and 1.03 of it, held to 1.25x.
    ratio = 1.25 if ARCHS[name] == "qwen35moe" else 1.0
    assert ours <= ratio * theirs, f"cpuq {ours:.2e} vs llama.cpp {theirs:.2e} (relative RMS vs HF)"


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_f32_with_fp16_cache_as_close_as_llama_cpp(name, golden, f32_files):
    with cpuq.load(f32_files[name], n_ctx=128) as m:  # the default fp16 KV cache
        got = m.logits(IDS)
    cols, hf = golden[f"{name}/columns"], golden[f"{name}/hf"]
    ours, theirs = _rel_rms(got[:, cols], hf), _rel_rms(golden[f"{name}/llama_f16"], hf)
    # measured 3.3e-5 .. 4.1e-5 against llama.cpp's 4.8e-3 .. 1.6e-1
    assert ours <= theirs, f"fp16 cache: cpuq {ours:.2e} vs llama.cpp F16 {theirs:.2e} (relative RMS vs HF)"
