"""Property tests: a mutated valid GGUF either opens (and then every tensor dequantizes
and `summarize` works) or raises a CpuqError with a one-line message; a mutated runnable
model (tools/fuzz.py's seeds: cpuq.convert output, q8_0 and q4_k_m) either loads and runs
(logits, generate, chat) or raises such a CpuqError. Anything else — another exception, a
hang, a segfault from a kernel reading past a buffer — fails. CI runs a few hundred cases;
`pytest -m slow tests/test_fuzz_gguf.py` runs 20,000 + 5,000, and tools/fuzz.py the long
run in crash-proof worker processes."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpuq
import fuzz  # tools/fuzz.py (conftest puts tools/ on the path)
from cpuq import CpuqError, FormatError, open_gguf

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


# runnable models: load and run ------------------------------------------------------------

@pytest.fixture(scope="session")
def model_target(tmp_path_factory):
    # Mutations of the 1024-token seeds only (the 151936-token ones take 0.45 s a case):
    # the parser and runtime paths are the same, and the seed test below runs all four.
    return fuzz.GGUFTarget(tmp_path_factory.mktemp("fuzz-seeds"), small_share=1.0)


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-case")


def test_seed_models_run_and_mutations_change_them(model_target, scratch):
    assert {s[0] for s in model_target.seeds} == {"q8_0", "q4_k_m", "moe-q4_k_m", "hyb-q4_k_m", "q8_0-v1024",
                                                  "q4_k_m-v1024", "moe-q4_k_m-v1024", "hyb-q4_k_m-v1024"}
    for k, (name, raw, layout) in enumerate(model_target.seeds):
        assert model_target.run(k, raw, scratch) == "ran", name
        # The walker found every key/value and tensor info (one type id each), in order,
        # all before the data.
        assert len(layout.kvs) == int.from_bytes(raw[16:24], "little")
        assert sum(f.region == "tensor_info" and f.kind == "type" for f in layout.fields) == \
            int.from_bytes(raw[8:16], "little")
        assert layout.kvs[0][0] == 24 and layout.kvs[-1][1] == layout.tensor_infos[0]
        assert max(f.offset + f.size for f in layout.fields) == layout.tensor_infos[1] <= layout.data_start < len(raw)
    rng = fuzz.case_rng("gguf", 0, 0)
    assert sum(model_target.make(rng)[1] not in {s[1] for s in model_target.seeds} for _ in range(50)) >= 45


def _run_model_case(model_target, scratch, rnd):
    k, data = model_target.make(rnd)
    assert model_target.run(k, data, scratch) in model_target.outcomes  # raises on anything but a clean CpuqError


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_models_load_and_run_or_fail_cleanly(model_target, scratch, rnd):
    _run_model_case(model_target, scratch, rnd)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_models_load_and_run_or_fail_cleanly_long(model_target, scratch, rnd):
    _run_model_case(model_target, scratch, rnd)


# what the long run found ------------------------------------------------------------------

def _with_string(seed, key: str, value: str) -> bytes:
    """The seed file with metadata `key` set to the string `value` (rebuilt as fuzz.py does)."""
    _, raw, layout = seed
    kvs = [raw[a:b] for a, b in layout.kvs]
    for i, kv in enumerate(kvs):
        n = int.from_bytes(kv[:8], "little")
        if kv[8:8 + n] == key.encode():
            kvs[i] = kv[:8 + n] + struct.pack("<IQ", 8, len(value.encode())) + value.encode()
    head = raw[:24] + b"".join(kvs) + raw[slice(*layout.tensor_infos)]
    return head + bytes(-len(head) % layout.alignment) + raw[layout.data_start:]


@pytest.mark.parametrize("key", ["tokenizer.ggml.pre", "tokenizer.ggml.model"])
def test_long_tokenizer_name_is_abbreviated(model_target, tmp_path, key):
    # The message quoted the 5000-character value whole
    path = tmp_path / "m.gguf"
    path.write_bytes(_with_string(model_target.seeds[0], key, "x" * 5000))
    with pytest.raises(cpuq.UnsupportedError) as e:
        cpuq.load(path, n_ctx=16)
    assert f"{path}: {key} 'xxxxxxxxxxxx...xxxxxxxxxxxxx' is not supported" in str(e.value)
    assert len(str(e.value)) < 1000


def test_tensor_name_with_a_newline_stays_on_one_line(model_target, tmp_path):
    # The name was quoted as it is: a two-line message
    _, raw, layout = model_target.seeds[0]
    a, b = layout.tensors[0]
    n = int.from_bytes(raw[a:a + 8], "little")
    name = raw[a + 8:a + 8 + n] + b"\n"
    rest = raw[a + 8 + n:b - 8] + (2**40).to_bytes(8, "little")  # its data far past the end
    head = raw[:layout.kvs[-1][1]] + struct.pack("<Q", len(name)) + name + rest + raw[b:layout.tensor_infos[1]]
    path = tmp_path / "m.gguf"
    path.write_bytes(head + bytes(-len(head) % layout.alignment) + raw[layout.data_start:])
    with pytest.raises(FormatError) as e:
        open_gguf(path)
    assert str(e.value).startswith(f"{path}: tensor {name.decode()!r} (") and "\n" not in str(e.value)
    assert "past the end of the file" in str(e.value)
