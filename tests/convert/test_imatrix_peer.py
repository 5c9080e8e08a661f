"""The importance matrix against llama.cpp's llama-imatrix and llama-quantize --imatrix run
live (tools/peer_env.sh builds them): on the golden's tiny Qwen2 checkpoint, at windows the
golden does not use; files written by either tool read by the other; and the golden of
tools/make_imatrix_golden.py is current. Bars and measured values: tests/convert/test_imatrix.py.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import cpuq
from cpuq.convert.imatrix import Imatrix
from cpuq.convert.calibration import collect_imatrix
from make_imatrix_golden import LLAMA_IMATRIX, LLAMA_QUANTIZE, llama_imatrix, llama_quantize, sha256, tiny_checkpoint
from tests.convert.test_imatrix import (BAR_CHANNEL, BAR_ENTRY, BAR_UNROUNDED, GOLDEN, GOLDEN_IMATRIX, TEXT,
                                        UNROUNDED, differences, write_imatrix_file)

pytestmark = [pytest.mark.peer,
              pytest.mark.skipif(not (LLAMA_IMATRIX.exists() and LLAMA_QUANTIZE.exists()),
                                 reason="llama-imatrix/llama-quantize not built: tools/peer_env.sh")]


@pytest.fixture(scope="module")
def checkpoint(module_tmp_factory) -> Path:
    return tiny_checkpoint(module_tmp_factory.mktemp("imatrix-peer"))


@pytest.fixture(scope="module")
def f16(checkpoint, module_tmp_factory) -> Path:
    return cpuq.convert(checkpoint, module_tmp_factory.mktemp("imatrix-peer-f16") / "f16.gguf", "f16")


def test_golden_is_current(f16, tmp_path):
    """The generator's llama.cpp steps, re-run: the same imatrix bytes and quantized sha256."""
    assert sha256(f16) == GOLDEN["f16_sha256"]
    live = llama_imatrix(f16, tmp_path / "imatrix.gguf")
    assert live.read_bytes() == GOLDEN_IMATRIX.read_bytes()
    for qtype in GOLDEN["quantized"]:
        version = llama_quantize(f16, tmp_path / f"{qtype}.gguf", qtype)  # --imatrix the golden's path string
        assert version == GOLDEN["llama_cpp"]
        assert sha256(tmp_path / f"{qtype}.gguf") == GOLDEN["quantized"][qtype]["sha256"], qtype


@pytest.mark.parametrize("ctx, chunks", [(128, 6), (32, 20)])
def test_collect_agrees_with_live_llama_imatrix(ctx, chunks, f16, tmp_path):
    theirs = Imatrix.read(llama_imatrix(f16, tmp_path / "llama.gguf", str(TEXT), ctx, chunks))
    ours = collect_imatrix(f16, TEXT.read_text(encoding="utf-8"), n_ctx=ctx, n_chunks=chunks)
    assert sorted(ours.sums) == sorted(theirs.sums)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (chunks, ctx)
    for name in theirs.sums:
        np.testing.assert_array_equal(ours.counts[name], theirs.counts[name], err_msg=name)
    diffs = differences(ours, theirs)
    for name, (rel, channel) in diffs.items():
        bar_entry, bar_channel = (BAR_UNROUNDED, BAR_UNROUNDED) if name in UNROUNDED else (BAR_ENTRY, BAR_CHANNEL)
        assert rel <= bar_entry and channel <= bar_channel, (name, rel, channel)
    print(f"\nctx {ctx} x {chunks}: max rel L2 {max(v[0] for k, v in diffs.items() if k not in UNROUNDED):.2g}, "
          f"max channel {max(v[1] for v in diffs.values()):.2g}, "
          f"unrounded {max(diffs[k][0] for k in UNROUNDED):.2g}")


@pytest.mark.parametrize("source", ["llama-imatrix", "cpuq"])
def test_convert_imatrix_same_bytes_as_llama_quantize(source, checkpoint, f16, tmp_path):
    """Either tool's imatrix file, given by the same path string to both quantizers."""
    im_path = tmp_path / "im.gguf"
    if source == "llama-imatrix":
        llama_imatrix(f16, im_path, str(TEXT), ctx=128, chunks=4)
    else:
        collect_imatrix(f16, TEXT.read_text(encoding="utf-8"), n_ctx=128, n_chunks=4,
                        dataset=str(TEXT)).write(im_path)
    theirs = tmp_path / "llama.gguf"
    llama_quantize(f16, theirs, "q4_k_m", imatrix=str(im_path))
    ours = cpuq.convert(checkpoint, tmp_path / "cpuq.gguf", "q4_k_m", imatrix=str(im_path))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("count", [0.5, 512.5])
def test_fractional_counts_rounded_as_llama_cpp(count, checkpoint, f16, tmp_path):
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(GOLDEN_IMATRIX).tensors}
    for name in tensors:
        if name.endswith(".counts"):
            tensors[name][:] = count
    im_path = write_imatrix_file(tmp_path / "im.gguf", tensors)
    theirs = tmp_path / "llama.gguf"
    llama_quantize(f16, theirs, "q4_k_m", imatrix=str(im_path))
    ours = cpuq.convert(checkpoint, tmp_path / "cpuq.gguf", "q4_k_m", imatrix=str(im_path))
    assert ours.read_bytes() == theirs.read_bytes()
