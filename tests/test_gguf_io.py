"""GGUF reader/writer: round trip, zero-copy views, agreement with gguf-py's reader,
and every kind of bad file named in the foundation issue."""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

import cpuq
from cpuq import FormatError, InputError, open_gguf
from tests.conftest import TINY_TENSORS, tiny_metadata, write_tiny_gguf


def test_round_trip_values_and_metadata(tmp_path):
    path = tmp_path / "t.gguf"
    values = write_tiny_gguf(path)
    with open_gguf(path) as f:
        assert f.get("general.architecture") == "qwen2"
        for key, value in tiny_metadata().items():
            assert f.get(key) == value, key
        assert list(f.tensors) == [name for name, _, _ in TINY_TENSORS]
        for name, shape, qt in TINY_TENSORS:
            t = f.tensor(name)
            assert t.qtype.name == qt and t.shape == shape
            back = cpuq.dequantize(t.data, t.qtype, t.shape)
            # What went in must come out: re-quantizing the stored values gives the same bytes.
            again = cpuq.quantize(values[name].reshape(-1, shape[-1]), qt)
            assert np.array_equal(t.data, again)
            if qt == "F32":
                assert np.array_equal(back, values[name])


def test_tensor_data_is_a_view_of_the_mapping(tiny_gguf):
    with open_gguf(tiny_gguf) as f:
        t = f.tensor("token_embd.weight")
        assert not t.data.flags.owndata
        assert not t.data.flags.writeable  # opened read-only
        base = t.data
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        assert isinstance(base, __import__("mmap").mmap)


def test_gguf_py_reads_our_file_the_same(tiny_gguf):
    """gguf-py (llama.cpp's own Python reader) is the reference for the container."""
    ref = gguf.GGUFReader(tiny_gguf)
    with open_gguf(tiny_gguf) as f:
        assert len(ref.tensors) == len(f.tensors)
        for rt in ref.tensors:
            t = f.tensor(rt.name)
            assert int(rt.tensor_type) == t.qtype.ggml_type
            assert tuple(reversed([int(d) for d in rt.shape])) == t.shape
            assert rt.data_offset == t.offset
            assert np.asarray(rt.data).tobytes() == t.data.tobytes()
            assert rt.data_offset % f.alignment == 0


def test_writer_rejects_out_of_order_and_missing_tensors(tmp_path):
    w = cpuq.GGUFStreamWriter(tmp_path / "w.gguf", arch="qwen2")
    w.add_tensor_info("a", (2, 32), cpuq.get_qtype("q8_0"))
    w.add_tensor_info("b", (2, 32), cpuq.get_qtype("q8_0"))
    w.begin()
    with pytest.raises(InputError, match="out of order"):
        w.write_tensor("b", np.zeros((2, 34), np.uint8))
    w.write_tensor("a", np.zeros((2, 34), np.uint8))
    with pytest.raises(InputError, match="expected 68"):
        w.write_tensor("b", np.zeros((2, 10), np.uint8))
    w.abort()


V = gguf.GGUFValueType


@pytest.mark.parametrize("values, sub", [
    (["", "a", "\u0120the", "\0", "日本語", "🙂" * 3, "<|im_end|>", "x" * 70_000], V.STRING),
    ([f"tok{i}" for i in range(5000)], V.STRING),
    ([0, 1, -1, 2**31 - 1, -2**31], V.INT32),
    ([0, 255], V.UINT8), ([-128, 127], V.INT8), ([0, 2**16 - 1], V.UINT16), ([-2**15, 2**15 - 1], V.INT16),
    ([0, 2**32 - 1], V.UINT32), ([0, 2**64 - 1], V.UINT64), ([-2**63, 2**63 - 1], V.INT64),
    ([0.1, -0.0, float("inf"), 3.4028235e38, 1e-46, 1 / 3], V.FLOAT32),
    ([0.1, float("nan"), 1e300], V.FLOAT64),
    # the library's own way: bools, bytes among strings, mixed items
    ([True, False], V.BOOL), (["a", b"b"], V.STRING), ([1, 2.0], V.FLOAT32), ([1, True], V.INT32),
])
def test_array_packing_is_gguf_pys(values, sub):
    # _ArrayWriter packs metadata arrays whole (a vocabulary's 300k items took ~1 s item by
    # item); the bytes must be the library's, byte for byte
    from cpuq.gguf_io import _ArrayWriter
    ours = _ArrayWriter(None, "qwen2")._pack_val(values, V.ARRAY, True, sub)
    assert ours == gguf.GGUFWriter(None, "qwen2")._pack_val(values, V.ARRAY, True, sub)


@pytest.mark.parametrize("values, sub", [
    ([2**31], V.INT32), ([-1], V.UINT64), ([1e39], V.FLOAT32), (["\ud800"], V.STRING), ([None], V.STRING),
    ([1.5], V.INT32),
])
def test_array_packing_fails_as_gguf_py_does(values, sub):
    from cpuq.gguf_io import _ArrayWriter
    with pytest.raises(Exception) as theirs:
        gguf.GGUFWriter(None, "qwen2")._pack_val(values, V.ARRAY, True, sub)
    with pytest.raises(theirs.type):
        _ArrayWriter(None, "qwen2")._pack_val(values, V.ARRAY, True, sub)


# --- bad files --------------------------------------------------------------------

def _tensor_info_offsets(path: Path) -> dict[str, dict[str, int]]:
    """Byte positions of each tensor info's type and offset fields, found with gguf-py."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        start = t.field.offset
        name_len = len(t.name.encode())
        n_dims = len(t.shape)
        type_pos = start + 8 + name_len + 4 + 8 * n_dims
        out[t.name] = {"dims": start + 8 + name_len + 4, "type": type_pos, "offset": type_pos + 4}
    return out


def _patched(tmp_path, src: Path, pos: int, fmt: str, value) -> Path:
    raw = bytearray(src.read_bytes())
    struct.pack_into(fmt, raw, pos, value)
    dst = tmp_path / "bad.gguf"
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("content, match", [
    (b"", "shorter than a GGUF header"),
    (b"GGUF", "shorter than a GGUF header"),
    (b"GGML" + b"\0" * 60, "not a GGUF file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 60, "not a GGUF file"),
])
def test_not_gguf(tmp_path, content, match):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(FormatError, match=match) as e:
        open_gguf(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_unsupported_version(tmp_path, tiny_gguf, version):
    with pytest.raises(FormatError, match=f"version {version} is not supported"):
        open_gguf(_patched(tmp_path, tiny_gguf, 4, "<I", version))


@pytest.mark.parametrize("field_pos, what", [(8, "tensors"), (16, "metadata keys")])
@pytest.mark.parametrize("count", [2**31, 5 * 10**9, 2**63, 2**64 - 1])
def test_absurd_counts(tmp_path, tiny_gguf, field_pos, what, count):
    with pytest.raises(FormatError, match=f"claims {count} {what}"):
        open_gguf(_patched(tmp_path, tiny_gguf, field_pos, "<Q", count))


def test_truncated_everywhere(tmp_path, tiny_gguf):
    raw = tiny_gguf.read_bytes()
    data_start = open_gguf(tiny_gguf).data_offset
    # Cut inside the header, the metadata, the tensor infos and the tensor data.
    for cut in sorted({24, 30, 100, data_start // 2, data_start - 1, data_start + 10, len(raw) - 1}):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(raw[:cut])
        with pytest.raises(FormatError) as e:
            open_gguf(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_tensor_extent_past_end(tmp_path, tiny_gguf):
    pos = _tensor_info_offsets(tiny_gguf)["blk.0.ffn_up.weight"]["offset"]
    bad = _patched(tmp_path, tiny_gguf, pos, "<Q", 10**6 * 32)
    with pytest.raises(FormatError, match=r"tensor 'blk.0.ffn_up.weight' \(Q6_K, 6720 bytes .*past the end"):
        open_gguf(bad)


def test_tensor_offset_misaligned(tmp_path, tiny_gguf):
    pos = _tensor_info_offsets(tiny_gguf)["blk.0.attn_q.weight"]["offset"]
    with pytest.raises(FormatError, match="not a multiple of the alignment"):
        open_gguf(_patched(tmp_path, tiny_gguf, pos, "<Q", 3))


@pytest.mark.parametrize("type_id, match", [(200, "unknown tensor type id 200"),
                                            (16, "IQ2_XXS .* is not supported")])
def test_unknown_or_unsupported_type(tmp_path, tiny_gguf, type_id, match):
    pos = _tensor_info_offsets(tiny_gguf)["token_embd.weight"]["type"]
    with pytest.raises(FormatError, match=f"tensor 'token_embd.weight'.*{match}"):
        open_gguf(_patched(tmp_path, tiny_gguf, pos, "<I", type_id))


def test_row_not_multiple_of_block(tmp_path, tiny_gguf):
    pos = _tensor_info_offsets(tiny_gguf)["token_embd.weight"]["dims"]
    with pytest.raises(FormatError, match="rows of 100 values, not a multiple of Q4_K's block size 256"):
        open_gguf(_patched(tmp_path, tiny_gguf, pos, "<Q", 100))


def test_absurd_dimension(tmp_path, tiny_gguf):
    pos = _tensor_info_offsets(tiny_gguf)["blk.0.attn_q.weight"]["dims"]
    with pytest.raises(FormatError, match="blk.0.attn_q.weight"):
        open_gguf(_patched(tmp_path, tiny_gguf, pos + 8, "<Q", 2**62))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(InputError, match="is a directory"):
        open_gguf(tmp_path)


def test_require_names_the_key(tiny_gguf):
    with open_gguf(tiny_gguf) as f:
        with pytest.raises(FormatError, match="'qwen2.block_count' is int, expected str"):
            f.require("qwen2.block_count", str)
        with pytest.raises(FormatError, match="'qwen2.rope.freq_base' is missing"):
            f.require("qwen2.rope.freq_base", float)
        with pytest.raises(FormatError, match="tensor 'output.weight' is missing"):
            f.tensor("output.weight")


def _real_files():
    # The committed vocabulary always (missing, the test fails); the demo model if installed.
    files = [Path(__file__).resolve().parent / "golden" / "ggml-vocab-qwen2.gguf"]
    try:
        from cpuq.demo import demo_model_path
        files.append(demo_model_path())
    except cpuq.CpuqError:
        pass
    return files


@pytest.mark.parametrize("path", _real_files(), ids=lambda p: p.name)
def test_metadata_equals_gguf_py_on_real_files(path):
    """Our fast array reading must give exactly gguf-py's values (vocabularies, merges,
    token types, scores) on files llama.cpp wrote."""
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        assert set(f.keys()) == {k for k in ref.fields if not k.startswith("GGUF.")}
        for key in f.keys():
            want = ref.fields[key].contents()
            want = want.item() if isinstance(want, np.generic) else want
            assert f.get(key) == want, key
        assert f.array_length("tokenizer.ggml.tokens") == len(ref.fields["tokenizer.ggml.tokens"].data)


def test_string_array_past_end(tmp_path):
    w = cpuq.GGUFStreamWriter(tmp_path / "s.gguf", arch="llama")
    w.add_metadata({"tokenizer.ggml.tokens": ["a", "bb", "ccc"]})
    w.close()
    raw = bytearray((tmp_path / "s.gguf").read_bytes())
    pos = raw.index(b"bb") - 8
    struct.pack_into("<Q", raw, pos, 2**40)
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="runs past the end"):
        open_gguf(tmp_path / "bad.gguf")


@pytest.mark.parametrize("strings", [[""], ["a", "", "ĠĊ", "日本語", "x y"], ["a", "b\x00c", "d"], ["\x00"]],
                         ids=["one-empty", "mixed", "nul-inside", "nul-only"])
def test_string_arrays_equal_gguf_pys(tmp_path, strings):
    """String arrays are decoded in one go (a NUL byte as separator) unless a string holds
    a NUL, then string by string: both give gguf-py's values."""
    w = cpuq.GGUFStreamWriter(tmp_path / "s.gguf", arch="llama")
    w.add_metadata({"tokenizer.ggml.tokens": strings, "general.tags": ["t"]})
    w.close()
    ref = gguf.GGUFReader(tmp_path / "s.gguf").fields["tokenizer.ggml.tokens"].contents()
    with open_gguf(tmp_path / "s.gguf") as f:
        assert f.get("tokenizer.ggml.tokens") == ref == strings
        assert f.get("general.tags") == ["t"]


def test_string_array_not_utf8(tmp_path):
    w = cpuq.GGUFStreamWriter(tmp_path / "s.gguf", arch="llama")
    w.add_metadata({"tokenizer.ggml.tokens": ["ab", "cd\u00e9", "ef"]})
    w.close()
    raw = (tmp_path / "s.gguf").read_bytes().replace("cd\u00e9".encode(), b"cd\xff\xfe")
    (tmp_path / "bad.gguf").write_bytes(raw)
    with open_gguf(tmp_path / "bad.gguf") as f, \
            pytest.raises(FormatError, match="metadata key 'tokenizer.ggml.tokens' holds a string that is not valid"):
        f.get("tokenizer.ggml.tokens")


# --- what a bad file gets wrong is checked where it is read -----------------------------------
# open_gguf raises FormatError for each of these from an explicit check; any other exception
# out of the parser is a bug and must surface as one (tools/fuzz.py counts on it).

def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


def _raw_gguf(tmp_path, *kvs: bytes, tensors: bytes = b"", n_tensors: int = 0) -> Path:
    """A GGUF v3 file written byte by byte (gguf-py's writer refuses most of these)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs) + tensors
    path = tmp_path / "raw.gguf"
    path.write_bytes(head + bytes(-len(head) % 32))
    return path


U8, U32, U64, STR, ARR = (int(V.UINT8), int(V.UINT32), int(V.UINT64), int(V.STRING), int(V.ARRAY))


def _u8_array(n: int) -> bytes:
    return struct.pack("<IQ", U8, n) + bytes(range(n))


@pytest.mark.parametrize("kvs, match", [
    ([_kv(b"a", 99, b"\0" * 8)], "the metadata value at offset 37 has unknown type 99"),
    ([_kv(b"a", ARR, struct.pack("<IQ", 77, 0))], "the array at offset 37 has items of unknown type 77"),
    ([_kv(b"a", ARR, struct.pack("<IQ", ARR, 1) + _u8_array(2))], "holds arrays"),
    ([_kv(b"a", ARR, struct.pack("<IQ", ARR, 2**20) + _u8_array(0) * 2**12)], "holds arrays"),
    ([_kv(b"a", U32, b"\1\0\0\0"), _kv(b"a", U32, b"\2\0\0\0")], "metadata key 'a' appears twice"),
    ([_kv(b"GGUF.version", U32, b"\3\0\0\0")], "metadata key 'GGUF.version' appears twice"),
    ([_kv(b"general.alignment", U64, b"\x20" + b"\0" * 7)], "'general.alignment' is UINT64, expected UINT32"),
    ([_kv(b"general.alignment", ARR, _u8_array(1))], "'general.alignment' is ARRAY of UINT8, expected UINT32"),
    ([_kv(b"general.alignment", U32, b"\0\0\0\0")], "general.alignment 0 is not a power of two"),
    ([_kv(b"general.alignment", U32, b"\x30\0\0\0")], "general.alignment 48 is not a power of two"),
    ([_kv(b"ke\xffy", U32, b"\1\0\0\0")], "a metadata key or tensor name is not valid UTF-8 (byte 2)"),
])
def test_bad_metadata_is_a_format_error(tmp_path, kvs, match):
    path = _raw_gguf(tmp_path, *kvs)
    with pytest.raises(FormatError) as e:
        open_gguf(path)
    assert str(e.value).startswith(f"{path}: ") and match in str(e.value) and "\n" not in str(e.value)


def test_well_formed_raw_file_opens(tmp_path):
    # the control for the cases above: the same builder, nothing wrong
    path = _raw_gguf(tmp_path, _kv(b"general.alignment", U32, b"\x40\0\0\0"), _kv(b"a", ARR, _u8_array(3)),
                     _kv(b"b", STR, struct.pack("<Q", 2) + b"hi"))
    with open_gguf(path) as f:
        assert (f.alignment, f.get("a"), f.get("b")) == (64, [0, 1, 2], "hi")


def _tensor_info(name: bytes, offset: int) -> bytes:
    return struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 32, 0, offset)  # F32, 32 values


@pytest.mark.parametrize("names, match", [
    ((b"t", b"t"), "tensor 't' appears twice"),
    ((b"t", b"\xfft"), "a metadata key or tensor name is not valid UTF-8 (byte 0)"),
])
def test_bad_tensor_names_are_format_errors(tmp_path, names, match):
    path = _raw_gguf(tmp_path, tensors=_tensor_info(names[0], 0) + _tensor_info(names[1], 128), n_tensors=2)
    path.write_bytes(path.read_bytes() + bytes(256))
    with pytest.raises(FormatError) as e:
        open_gguf(path)
    assert str(e.value).startswith(f"{path}: ") and match in str(e.value)


@pytest.mark.parametrize("error", [IndexError("a parser bug"), ValueError("a parser bug"), MemoryError(),
                                   KeyError("a parser bug")])
def test_a_parser_bug_is_not_reported_as_a_bad_file(tiny_gguf, monkeypatch, error):
    # open_gguf used to turn every exception into FormatError("malformed GGUF: ..."), so the
    # fuzzer could not tell a parser bug from a bad file. Only the checks above say "bad file".
    import cpuq.gguf_io

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(cpuq.gguf_io, "_check_tensor_info", broken)
    with pytest.raises(type(error)):
        open_gguf(tiny_gguf)
