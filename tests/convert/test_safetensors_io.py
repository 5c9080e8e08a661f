"""safetensors reading: round trips through the fixture writer, agreement with the
`safetensors` package in both directions, sharded checkpoints, and every kind of bad
file the converter issue names."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from cpuq.convert.safetensors_io import open_checkpoint
from cpuq.errors import FormatError, InputError, UnsupportedError
from make_tiny_checkpoint import f32_to_bf16, to_storage, write_checkpoint_weights, write_safetensors

RNG = np.random.default_rng(1)
VALUES = {
    "a.weight": RNG.standard_normal((3, 8)).astype(np.float32),
    "b.bias": RNG.standard_normal((5,)).astype(np.float32),
    "c.scalar": np.array(1.5, dtype=np.float32),
    "d.empty": np.zeros((0, 4), dtype=np.float32),
}


def _write(path: Path, dtype: str, values=VALUES) -> Path:
    write_safetensors(path, {n: (dtype, to_storage(v, dtype)) for n, v in values.items()})
    return path


def _write_raw(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file from a header (object, or raw bytes) and data, optionally
    with a lying header length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


# --- round trips ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_round_trip(tmp_path, dtype):
    path = _write(tmp_path / "model.safetensors", dtype)
    with open_checkpoint(tmp_path) as ck:
        assert ck.names == sorted(VALUES)  # file order; the writer stores names sorted
        for name, v in VALUES.items():
            assert name in ck and ck.shape(name) == v.shape and ck.dtype(name) == dtype
            stored = to_storage(v, dtype)
            assert ck.nbytes(name) == stored.nbytes
            assert np.array_equal(ck.raw(name), stored)
            back = ck.load_f32(name)
            assert back.dtype == np.float32 and back.shape == v.shape and back.flags.writeable
            if dtype == "F32":
                assert np.array_equal(back, v)
            elif dtype == "F16":
                assert np.array_equal(back, v.astype(np.float16).astype(np.float32))
            else:  # BF16 widening is exact: the stored bits are the top half of the float32
                assert np.array_equal(back.view(np.uint32), stored.astype(np.uint32) << 16)
                assert np.allclose(back, v, rtol=2**-8, atol=0)  # bf16 keeps 8 significant bits
    assert path.exists()


def test_raw_is_a_read_only_view_of_the_mapping(tmp_path):
    _write(tmp_path / "model.safetensors", "BF16")
    ck = open_checkpoint(tmp_path)
    r = ck.raw("a.weight")
    assert r.dtype == np.dtype("<u2") and not r.flags.owndata and not r.flags.writeable
    ck.close()
    assert r.sum() == to_storage(VALUES["a.weight"], "BF16").sum()  # the mapping outlives close()
    with pytest.raises(InputError, match="closed"):
        ck.raw("a.weight")


def test_single_file_path_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"w": ("F32", VALUES["a.weight"])}, metadata={"format": "pt", "note": "hi"})
    ck = open_checkpoint(path)
    assert ck.names == ["w"] and ck.metadata == {"format": "pt", "note": "hi"}


def test_bf16_rounding_matches_gguf_py():
    """gguf-py's BF16 conversion (the one llama.cpp's converter uses) is the reference:
    round to nearest even, NaN kept quiet."""
    special = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38,
                        1e-45, -1e-45, 1.17549435e-38, 1.00390625, 1.01171875, 1.0039062500001, 65504.0],
                       dtype=np.float32)
    ties = (np.arange(-2**15, 2**15, dtype=np.int64).astype(np.uint32) << 16 | 0x8000).view(np.float32)
    x = np.concatenate([special, ties, RNG.standard_normal(100_000).astype(np.float32) * 1e3])
    ref = gguf_quantize(x, GGMLQuantizationType.BF16).view(np.uint16).reshape(-1)
    assert np.array_equal(f32_to_bf16(x), ref)


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_safetensors_package_reads_our_files(tmp_path, dtype):
    from safetensors.numpy import load_file
    path = _write(tmp_path / "model.safetensors", dtype)
    ref = load_file(path)
    assert set(ref) == set(VALUES)
    for name, v in VALUES.items():
        assert np.array_equal(ref[name], to_storage(v, dtype))


def test_safetensors_package_reads_our_bf16_header(tmp_path):
    from safetensors import safe_open
    path = _write(tmp_path / "model.safetensors", "BF16")
    with safe_open(path, framework="numpy") as f:  # numpy cannot hold BF16; the header is still checked
        assert sorted(f.keys()) == sorted(VALUES)
        for name, v in VALUES.items():
            s = f.get_slice(name)
            assert s.get_dtype() == "BF16" and tuple(s.get_shape()) == v.shape


@pytest.mark.parametrize("np_dtype, dtype", [(np.float16, "F16"), (np.float32, "F32")])
def test_we_read_safetensors_package_files(tmp_path, np_dtype, dtype):
    from safetensors.numpy import save_file
    values = {n: v.astype(np_dtype) for n, v in VALUES.items()}
    save_file(values, tmp_path / "model.safetensors", metadata={"format": "np"})
    ck = open_checkpoint(tmp_path)
    assert set(ck.names) == set(VALUES) and ck.metadata == {"format": "np"}
    for name, v in values.items():
        assert ck.dtype(name) == dtype and np.array_equal(ck.raw(name), v)


# --- sharded checkpoints ------------------------------------------------------------

def _sharded(tmp_path, dtype="F32") -> Path:
    write_checkpoint_weights(tmp_path, {n: (dtype, to_storage(v, dtype)) for n, v in VALUES.items()}, sharded=True)
    return tmp_path


def test_sharded_checkpoint(tmp_path):
    ck = open_checkpoint(_sharded(tmp_path, "BF16"))
    assert sorted(ck.names) == sorted(VALUES) and len(ck) == len(VALUES)
    assert {ck.file_of(n).name for n in ck.names} == {"model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"}
    for name, v in VALUES.items():
        assert np.array_equal(ck.raw(name), to_storage(v, "BF16"))


def _edit_index(tmp_path, edit) -> None:
    p = tmp_path / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    edit(index)
    p.write_text(json.dumps(index))


def test_index_names_a_missing_shard(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"index.json: lists shard model-00002-of-00002.safetensors, which does not"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda ix: ix.pop("weight_map"), "no 'weight_map' object"),
    (lambda ix: ix.update(weight_map=[]), "no 'weight_map' object"),
    (lambda ix: ix.update(weight_map={}), "weight_map is empty"),
    (lambda ix: ix["weight_map"].update({"a.weight": 3}), "tensor 'a.weight' maps to 3, not a file name"),
    (lambda ix: ix["weight_map"].update({"a.weight": "../model.safetensors"}), "not a plain file name"),
    (lambda ix: ix["weight_map"].update({"zz.ghost": "model-00001-of-00002.safetensors"}),
     "tensor 'zz.ghost' is listed in model-00001-of-00002.safetensors but is not in that file"),
    (lambda ix: ix["weight_map"].pop("a.weight"), "tensor 'a.weight' is not listed in model.safetensors.index"),
])
def test_malformed_index(tmp_path, edit, match):
    _sharded(tmp_path)
    _edit_index(tmp_path, edit)
    with pytest.raises(FormatError, match=match):
        open_checkpoint(tmp_path)


def test_index_lists_tensor_in_the_wrong_shard(tmp_path):
    _sharded(tmp_path)
    ck = open_checkpoint(tmp_path)
    name = ck.names[0]
    other = ({"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} - {ck.file_of(name).name}).pop()
    _edit_index(tmp_path, lambda ix: ix["weight_map"].update({name: other}))
    with pytest.raises(FormatError, match=f"tensor '{name}' is listed in {other} but is not in that file"):
        open_checkpoint(tmp_path)


def test_index_not_json(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FormatError, match="index.json: index is not valid JSON"):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_shards(tmp_path):
    _sharded(tmp_path)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    first = next(n for n, s in names.items() if s.startswith("model-00001"))
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                      {n: ("F32", VALUES[n]) for n in [first] + [n for n, s in names.items()
                                                                  if s.startswith("model-00002")]})
    with pytest.raises(FormatError, match=f"model-00002-of-00002.safetensors: tensor '{first}' is also in "
                                          f"model-00001-of-00002.safetensors"):
        open_checkpoint(tmp_path)


# --- missing inputs -----------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="nope: no such file or directory"):
        open_checkpoint(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="neither model.safetensors nor model.safetensors.index.json"):
        open_checkpoint(tmp_path)


def test_unknown_tensor_name(tmp_path):
    ck = open_checkpoint(_write(tmp_path / "model.safetensors", "F32"))
    assert "nope" not in ck
    with pytest.raises(FormatError, match="tensor 'nope' is not in the checkpoint"):
        ck.load_f32("nope")


# --- bad files ----------------------------------------------------------------------

def _ok_entry(**kw):
    return {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **kw}


@pytest.mark.parametrize("header, data, match", [
    ({"t": "x"}, b"", "tensor 't': entry is a string, not a JSON object"),
    ({"t": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 't': entry has no 'dtype'"),
    ({"t": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4, "tensor 't': entry has no 'shape'"),
    ({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "tensor 't': entry has no 'data_offsets'"),
    ({"t": _ok_entry(dtype=5)}, b"\0" * 16, "tensor 't': dtype 5 is not a string"),
    ({"t": _ok_entry(shape=[2, -2])}, b"\0" * 16, "tensor 't': shape .* is not a list of non-negative integers"),
    ({"t": _ok_entry(shape=[2, 2.0])}, b"\0" * 16, "shape .* is not a list of non-negative integers"),
    ({"t": _ok_entry(shape="2x2")}, b"\0" * 16, "shape .* is not a list of non-negative integers"),
    ({"t": _ok_entry(data_offsets=[0.0, 16.0])}, b"\0" * 16, r"data_offsets \[0.0, 16.0\] is not a pair of integers"),
    ({"t": _ok_entry(data_offsets=["0", "16"])}, b"\0" * 16, "is not a pair of integers"),
    ({"t": _ok_entry(data_offsets=[False, 16])}, b"\0" * 16, "is not a pair of integers"),
    ({"t": _ok_entry(data_offsets=[0, 8, 16])}, b"\0" * 16, "is not a pair of integers"),
    ({"t": _ok_entry(data_offsets=[16, 0])}, b"\0" * 16, r"data_offsets \[16, 0\] are not an ordered pair"),
    ({"t": _ok_entry(data_offsets=[-4, 12])}, b"\0" * 16, "are not an ordered pair"),
    ({"t": _ok_entry(data_offsets=[0, 16])}, b"\0" * 12, "tensor 't': data ends at 16, 4 bytes past the end of the "
                                                         r"data section \(12 bytes\)"),
    ({"t": _ok_entry(data_offsets=[0, 12])}, b"\0" * 16, r"tensor 't': 12 bytes of data, but F32 \(2, 2\) needs 16"),
    ({"t": _ok_entry(dtype="BF16")}, b"\0" * 16, r"tensor 't': 16 bytes of data, but BF16 \(2, 2\) needs 8"),
    ({"t": _ok_entry(dtype="float32")}, b"\0" * 16, "tensor 't': unknown dtype 'float32'"),
    ({"a": _ok_entry(), "b": _ok_entry(shape=[2], data_offsets=[12, 20])}, b"\0" * 20,
     r"tensor 'b' \(bytes 12..20\) overlaps tensor 'a' \(ends at 16\)"),
    ({"a": _ok_entry(), "b": _ok_entry()}, b"\0" * 16, "tensor 'b' .* overlaps tensor 'a'"),
    ({"__metadata__": ["x"], "t": _ok_entry()}, b"\0" * 16, "__metadata__ is an array, not a JSON object"),
])
def test_bad_entries(tmp_path, header, data, match):
    path = _write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(FormatError, match=match) as e:
        open_checkpoint(tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["I64", "BOOL", "F64", "U8", "F8_E4M3"])
def test_unsupported_dtype(tmp_path, dtype):
    _write_raw(tmp_path / "model.safetensors", {"pos_ids": {"dtype": dtype, "shape": [1], "data_offsets": [0, 8]}},
               b"\0" * 8)
    with pytest.raises(UnsupportedError, match=f"tensor 'pos_ids' has dtype {dtype}; only BF16, F16 and F32"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("content, match", [
    (b"", "0 bytes is too short for a safetensors file"),
    (b"\x10\0\0", "3 bytes is too short"),
    (struct.pack("<Q", 2**40) + b"{}", "header length 1099511627776 is absurd"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "is absurd"),
    (struct.pack("<Q", 100) + b"{}", r"header length 100 runs past the end of the file \(10 bytes\)"),
    (struct.pack("<Q", 5) + b"{abc}", "header is not valid JSON"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not valid UTF-8"),
    (struct.pack("<Q", 2) + b"[]", "header is an array, not a JSON object"),
    (struct.pack("<Q", 4) + b"null", "header is null, not a JSON object"),
    (struct.pack("<Q", 16) + b'{"a": 1, "a": 2}', "header has the key 'a' twice"),
    (struct.pack("<Q", 2 + 10**6) + b"[" * 10**6 + b"{}" + b"]" * 10**6, "header is not valid JSON"),
])
def test_bad_headers(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=match) as e:
        open_checkpoint(tmp_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_metadata_and_padding_are_allowed(tmp_path):
    header = json.dumps({"__metadata__": {"format": "pt"}, "t": _ok_entry()}).encode()
    _write_raw(tmp_path / "model.safetensors", header + b"    ", struct.pack("<4f", 1, 2, 3, 4))
    ck = open_checkpoint(tmp_path)
    assert ck.names == ["t"] and ck.load_f32("t").tolist() == [[1, 2], [3, 4]]


def test_unaligned_data_offsets_read_correctly(tmp_path):
    # Nothing in the format aligns tensors; a 3-byte header puts every tensor off alignment.
    v = np.arange(6, dtype=np.float32)
    header = json.dumps({"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
                         "b": {"dtype": "F32", "shape": [6], "data_offsets": [2, 26]}}).encode()
    _write_raw(tmp_path / "model.safetensors", header, np.float16(7).tobytes() + v.tobytes())
    ck = open_checkpoint(tmp_path)
    assert np.array_equal(ck.load_f32("b"), v) and ck.load_f32("a").tolist() == [7.0]


def test_truncated_everywhere(tmp_path):
    src = _write(tmp_path / "src.safetensors", "BF16")
    raw = src.read_bytes()
    for cut in sorted({4, 8, 12, len(raw) // 2, len(raw) - 1}):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(raw[:cut])
        with pytest.raises(FormatError) as e:
            open_checkpoint(d)
        assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)
