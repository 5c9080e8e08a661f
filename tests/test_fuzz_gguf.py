"""Property test: a mutated valid GGUF either opens (and then every tensor dequantizes
and `summarize` works) or raises a CpuqError with a one-line message. Anything else —
another exception, a hang, a segfault from a kernel reading past a buffer — fails.
CI runs a few hundred cases; the long run is `pytest -m slow tests/test_fuzz_gguf.py`."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpuq
from cpuq import CpuqError, open_gguf

U64_EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutations(draw, size: int):
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["byte", "u32", "u64", "truncate", "splice"]))
        # Bias positions towards the header, metadata and tensor infos, where the parser lives.
        hot = draw(st.booleans())
        pos = draw(st.integers(0, min(size - 1, 4096) if hot else size - 1))
        if kind == "byte":
            ops.append((kind, pos, draw(st.integers(0, 255))))
        elif kind == "u32":
            ops.append((kind, pos, draw(st.sampled_from([0, 1, 7, 31, 255, 2**16, 2**31, 2**32 - 1]))))
        elif kind == "u64":
            ops.append((kind, pos, draw(st.sampled_from(U64_EXTREMES))))
        elif kind == "truncate":
            ops.append((kind, pos, 0))
        else:
            ops.append((kind, pos, draw(st.integers(1, 64))))
    return ops


def apply(raw: bytes, ops) -> bytes:
    b = bytearray(raw)
    for kind, pos, val in ops:
        if pos >= len(b):
            continue
        if kind == "byte":
            b[pos] = val
        elif kind == "u32" and pos + 4 <= len(b):
            struct.pack_into("<I", b, pos, val)
        elif kind == "u64" and pos + 8 <= len(b):
            struct.pack_into("<Q", b, pos, val)
        elif kind == "truncate":
            del b[pos:]
        elif kind == "splice":
            del b[pos:pos + val]
    return bytes(b)


def exercise(path) -> None:
    try:
        with open_gguf(path) as f:
            for t in f:
                out = cpuq.dequantize(t.data, t.qtype, t.shape)
                assert out.shape == t.shape
        cpuq.summarize(path, tensors=True)
    except CpuqError as e:
        msg = str(e)
        assert msg and "\n" not in msg and str(path) in msg, msg


def _run(tiny_gguf_bytes, tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(apply(tiny_gguf_bytes, ops))
    exercise(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly(tiny_gguf_bytes, tmp_path_factory, data):
    _run(tiny_gguf_bytes, tmp_path_factory, data.draw(mutations(len(tiny_gguf_bytes))))


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_fail_cleanly_long(tiny_gguf_bytes, tmp_path_factory, data):
    _run(tiny_gguf_bytes, tmp_path_factory, data.draw(mutations(len(tiny_gguf_bytes))))
