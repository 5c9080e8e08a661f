"""The MoE importance matrix against llama.cpp's llama-imatrix and llama-quantize --imatrix
run live (tools/peer_env.sh builds them), on the tiny qwen3moe and qwen2moe checkpoints of
tools/make_imatrix_moe_golden.py: the goldens are current; cpuq's collection agrees at
windows the golden does not use, from the F32 file (the same routing) and from the F16 file
(a few tokens re-routed); either tool's file, and one with an expert no token picked, gives
the same Q4_K_M bytes from both quantizers. Bars and measured values: test_imatrix_moe.py.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import cpuq
from cpuq.convert.calibration import collect_imatrix
from cpuq.convert.imatrix import Imatrix
from make_imatrix_golden import LLAMA_IMATRIX, LLAMA_QUANTIZE, TEXT_ARG, llama_imatrix, llama_quantize, sha256
from make_imatrix_moe_golden import CHUNKS, CTX, moe_checkpoint
from tests.convert.test_imatrix import write_imatrix_file
from tests.convert.test_imatrix_moe import ARCHS, GOLDEN, ROOT, TEXT, assert_agrees, golden_imatrix

pytestmark = [pytest.mark.peer,
              pytest.mark.skipif(not (LLAMA_IMATRIX.exists() and LLAMA_QUANTIZE.exists()),
                                 reason="llama-imatrix/llama-quantize not built: tools/peer_env.sh")]



@pytest.fixture(scope="module", params=ARCHS)
def case(request, module_tmp_factory) -> dict:
    arch = request.param
    where = module_tmp_factory.mktemp(f"moe-peer-{arch}")
    ckpt = moe_checkpoint(arch, where)
    return {"arch": arch, "checkpoint": ckpt, "f32": cpuq.convert(ckpt, where / "f32.gguf", "f32"),
            "f16": cpuq.convert(ckpt, where / "f16.gguf", "f16")}


def test_golden_is_current(case, tmp_path):
    """The generator's llama.cpp steps, re-run: the same imatrix bytes and quantized sha256."""
    arch, want = case["arch"], GOLDEN["archs"][case["arch"]]
    assert sha256(case["f32"]) == want["f32_sha256"] and sha256(case["f16"]) == want["f16_sha256"]
    live = llama_imatrix(case["f32"], tmp_path / "imatrix.gguf", TEXT_ARG, CTX, CHUNKS)
    assert live.read_bytes() == golden_imatrix(arch).read_bytes()
    version = llama_quantize(case["f16"], tmp_path / "q4_k_m.gguf", "q4_k_m", imatrix=want["imatrix"])
    assert version == GOLDEN["llama_cpp"]
    assert sha256(tmp_path / "q4_k_m.gguf") == want["quantized"]["q4_k_m"]["sha256"]


@pytest.mark.parametrize("ctx, chunks", [(64, 10), (256, 3)])
def test_collect_from_f32_agrees_with_live_llama_imatrix(ctx, chunks, case, tmp_path):
    theirs = Imatrix.read(llama_imatrix(case["f32"], tmp_path / "llama.gguf", str(TEXT), ctx, chunks))
    ours = collect_imatrix(case["f32"], TEXT.read_text(encoding="utf-8"), n_ctx=ctx, n_chunks=chunks)
    assert ours.chunk_count == chunks
    moved, rel, channel = assert_agrees(ours, theirs)
    print(f"\n{case['arch']} F32 {ctx} x {chunks}: {moved:.0f} picks moved, rel L2 {rel:.2g}, channel {channel:.2g}")


def test_collect_from_f16_agrees_with_live_llama_imatrix(case, tmp_path):
    ctx, chunks = 128, 6
    theirs = Imatrix.read(llama_imatrix(case["f16"], tmp_path / "llama.gguf", str(TEXT), ctx, chunks))
    ours = collect_imatrix(case["f16"], TEXT.read_text(encoding="utf-8"), n_ctx=ctx, n_chunks=chunks)
    assert ours.chunk_count == chunks
    moved, rel, channel = assert_agrees(ours, theirs)
    print(f"\n{case['arch']} F16 {ctx} x {chunks}: {moved:.0f} picks moved, rel L2 {rel:.2g}, channel {channel:.2g}")


@pytest.mark.parametrize("source", ["llama-imatrix", "cpuq", "unpicked expert"])
def test_convert_imatrix_same_bytes_as_llama_quantize(source, case, tmp_path):
    """Either tool's imatrix file, given by the same path string to both quantizers; and
    llama-imatrix's with one expert of a stack never picked (count 0: its rows quantized
    with unit importance by both)."""
    im_path = tmp_path / "im.gguf"
    if source == "cpuq":
        collect_imatrix(case["f16"], TEXT.read_text(encoding="utf-8"), n_ctx=128, n_chunks=4,
                        dataset=str(TEXT)).write(im_path)
    else:
        llama_imatrix(case["f16"], im_path, str(TEXT), ctx=128, chunks=4)
    if source == "unpicked expert":
        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(im_path).tensors}
        for stack in ("blk.1.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"):
            tensors[stack + ".counts"][1] = 0
            tensors[stack + ".in_sum2"][1] = 0
        im_path = write_imatrix_file(tmp_path / "unpicked.gguf", tensors)
        assert (Imatrix.read(im_path).counts["blk.1.ffn_up_exps.weight"] == 0).sum() == 1
    theirs = tmp_path / "llama.gguf"
    llama_quantize(case["f16"], theirs, "q4_k_m", imatrix=str(im_path), cwd=ROOT)
    ours = cpuq.convert(case["checkpoint"], tmp_path / "cpuq.gguf", "q4_k_m", imatrix=str(im_path))
    assert ours.read_bytes() == theirs.read_bytes()

