"""Reading HF safetensors checkpoints without torch: a validated, memory-mapped view of
one model (a single `model.safetensors`, or the shards that
`model.safetensors.index.json` lists).

The format is read directly (u64 little-endian header length, a JSON header, raw
tensor bytes) because the `safetensors` package cannot hand BF16 tensors to numpy.
Every header is checked at open, before any tensor is touched: each tensor's byte
range must lie inside its file's data section, match its dtype and shape exactly,
and not overlap another. After that, `raw` is a zero-copy view of the mapping and
`load_f32` a float32 copy; neither can read outside the mapping.

Supported dtypes are BF16, F16 and F32 (what HF language-model weights use); other
safetensors dtypes raise UnsupportedError at open.

Tensor data is read with pread into fresh arrays (`read_rows_f32`, `load_f32`), not
through the mapping, so converting a 100 GB checkpoint leaves no mapped pages resident:
the converter's memory is what it holds, never what it has read.

Imports only numpy, the standard library and cpuq.errors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import FormatError, InputError, UnsupportedError, abbreviated as _show

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors reference implementation refuses headers above 100 MB; a header that
# big would already describe millions of tensors.
MAX_HEADER_BYTES = 100_000_000
_LEN_BYTES = 8
# numpy's limit on dimensions (32 before numpy 2); model weights have a few.
MAX_DIMS = 32

# Dtype name -> how its bytes are viewed. BF16 has no numpy dtype: it is kept as the raw
# upper half of a float32 (uint16) and widened by a shift.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}
# Every other dtype name of the safetensors spec, so that a real-but-unsupported dtype
# reads as UnsupportedError and a made-up one as a bad file.
_OTHER_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64",
                 "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"}


@dataclass(frozen=True)
class _Entry:
    file: int  # index into Checkpoint._maps
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class Checkpoint:
    """The tensors of one HF model directory, validated and memory-mapped.

    `names` lists tensors in file order (shard by shard, by data offset within a shard).
    Nothing is read at open beyond the headers.
    """

    def __init__(self, model_dir: str | os.PathLike):
        model_dir = Path(model_dir)
        if not model_dir.exists():
            raise InputError(f"{model_dir}: no such file or directory")
        self.path = model_dir
        self._maps: list[np.memmap] = []
        self._fds: list[int] = []
        self._files: list[Path] = []
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict = {}  # the `__metadata__` of the (first) file, as written

        if model_dir.is_file():
            shards, weight_map, index_path = [model_dir], None, None
        elif (model_dir / INDEX_FILE).is_file():
            index_path = model_dir / INDEX_FILE
            shards, weight_map = _read_index(index_path)
        elif (model_dir / SINGLE_FILE).is_file():
            shards, weight_map, index_path = [model_dir / SINGLE_FILE], None, None
        else:
            raise InputError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

        try:
            for shard in shards:
                self._open_file(shard, index_path)
            if weight_map is not None:
                self._check_index(weight_map, index_path)
        except BaseException:
            self.close()
            raise
        self.names: list[str] = list(self._entries)

    def _check_index(self, weight_map: dict[str, str], index_path: Path) -> None:
        for name, shard in weight_map.items():
            entry = self._entries.get(name)
            if entry is None or self._files[entry.file].name != shard:
                raise FormatError(f"{index_path}: tensor '{name}' is listed in {shard} but is not in that file")
        for name, entry in self._entries.items():
            if name not in weight_map:
                raise FormatError(f"{self._files[entry.file]}: tensor '{name}' is not listed in {INDEX_FILE}")

    def _open_file(self, path: Path, index_path: Path | None) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if index_path is not None:
                raise FormatError(f"{index_path}: lists shard {path.name}, which does not exist") from None
            raise InputError(f"{path}: no such file") from None
        if size < _LEN_BYTES:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror}") from None
        header_len = int(mm[:_LEN_BYTES].view("<u8")[0])
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {header_len} is absurd (limit {MAX_HEADER_BYTES} bytes)")
        if header_len > size - _LEN_BYTES:
            raise FormatError(f"{path}: header length {header_len} runs past the end of the file ({size} bytes)")
        header = _parse_header(path, bytes(mm[_LEN_BYTES:_LEN_BYTES + header_len]))
        data_start = _LEN_BYTES + header_len
        data_len = size - data_start

        file_index = len(self._maps)
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise FormatError(f"{path}: __metadata__ is {_json_kind(meta)}, not a JSON object")
        if file_index == 0 and meta:
            self.metadata = meta

        entries = []
        for name, info in header.items():
            dtype, shape, begin, end = _check_entry(path, name, info, data_len)
            if name in self._entries:
                other = self._files[self._entries[name].file]
                raise FormatError(f"{path}: tensor '{name}' is also in {other.name}")
            entries.append((begin, end, name, dtype, shape))
        entries.sort()
        prev_end, prev_name = 0, None
        for begin, end, name, dtype, shape in entries:
            # Zero-byte tensors occupy no range and cannot overlap anything.
            if begin < prev_end and begin != end:
                raise FormatError(f"{path}: tensor '{name}' (bytes {begin}..{end}) overlaps tensor '{prev_name}' "
                                  f"(ends at {prev_end})")
            if end > prev_end:
                prev_end, prev_name = end, name
            self._entries[name] = _Entry(file_index, dtype, shape, data_start + begin, data_start + end)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror}") from None
        self._maps.append(mm)
        self._fds.append(fd)
        self._files.append(path)

    # queries ----------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor '{name}' is not in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """"BF16", "F16" or "F32"."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        e = self._entry(name)
        return e.end - e.begin

    def file_of(self, name: str) -> Path:
        return self._files[self._entry(name).file]

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy, read-only view in the tensor's own dtype (BF16 as uint16)."""
        e = self._entry(name)
        if not self._maps:
            raise InputError(f"{self.path}: checkpoint is closed")
        flat = self._maps[e.file][e.begin:e.end]
        return flat.view(SUPPORTED_DTYPES[e.dtype]).reshape(e.shape)

    def rows(self, name: str) -> int:
        """Rows of the tensor seen as a matrix of its last dimension (1 for a vector)."""
        shape = self._entry(name).shape
        return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1

    def read_rows_f32(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (as a matrix of its last dimension), as a fresh
        float32 (stop - start, cols) array; BF16 and F16 widen exactly."""
        e = self._entry(name)
        if not self._fds:
            raise InputError(f"{self.path}: checkpoint is closed")
        cols = e.shape[-1] if e.shape else 1
        if not 0 <= start <= stop <= self.rows(name):
            raise InputError(f"tensor '{name}': rows [{start}, {stop}) are outside its {self.rows(name)} rows")
        dtype = SUPPORTED_DTYPES[e.dtype]
        buf = np.empty((stop - start) * cols, dtype=dtype)
        self._pread(e, buf, e.begin + start * cols * dtype.itemsize)
        if e.dtype == "BF16":
            wide = buf.astype(np.uint32)
            np.left_shift(wide, 16, out=wide)
            out = wide.view(np.float32)
        elif e.dtype == "F32":
            out = buf.view(np.float32)  # "<f4" is native on every platform numba supports
        else:
            out = buf.astype(np.float32)
        return out.reshape(stop - start, cols)

    def _pread(self, e: _Entry, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fds[e.file], [view[done:]], offset + done)
            except OSError as err:
                raise InputError(f"{self._files[e.file]}: read failed: {err.strerror}") from None
            if n == 0:  # validated at open, so the file shrank underneath us
                raise FormatError(f"{self._files[e.file]}: file ends early (truncated while being read?)")
            done += n

    def load_f32(self, name: str) -> np.ndarray:
        """A float32 copy of one tensor; BF16 and F16 widen exactly."""
        return self.read_rows_f32(name, 0, self.rows(name)).reshape(self._entry(name).shape)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        """Drop the mappings and file handles; views handed out before keep theirs alive."""
        self._maps = []
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    """Open and validate the safetensors weights of an HF model directory (or one
    .safetensors file)."""
    return Checkpoint(model_dir)


# validation -------------------------------------------------------------------

def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _load_json(path: Path, text: bytes | str, what: str) -> object:
    try:
        # Decoded here: json.loads would sniff bytes for UTF-16/32, which the format does not allow.
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise FormatError(f"{path}: {what} has the key '{e.args[0]}' twice") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: {what} is not valid UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{path}: {what} is not valid JSON: {msg}") from None


def _parse_header(path: Path, raw: bytes) -> dict:
    header = _load_json(path, raw, "header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is {_json_kind(header)}, not a JSON object")
    return header


def _json_kind(v: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(v), type(v).__name__)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true would pass as 1


def _check_entry(path: Path, name: str, info: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    where = f"{path}: tensor '{name}'"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry is {_json_kind(info)}, not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise FormatError(f"{where}: entry has no '{key}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise FormatError(f"{where}: dtype {_show(dtype)} is not a string")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {_show(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:  # also keeps the product below cheap: 10^5 huge dims took minutes
        raise FormatError(f"{where}: shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets {_show(offsets)} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or begin > end:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] are not an ordered pair of offsets")
    if end > data_len:
        raise FormatError(f"{where}: data ends at {end}, {end - data_len} bytes past the end of the data section "
                          f"({data_len} bytes)")
    if dtype not in SUPPORTED_DTYPES:
        if dtype in _OTHER_DTYPES:
            raise UnsupportedError(f"{where} has dtype {dtype}; only BF16, F16 and F32 are supported")
        raise FormatError(f"{where}: unknown dtype {_show(dtype)}")
    n = 1
    for d in shape:
        n *= d
    expected = n * SUPPORTED_DTYPES[dtype].itemsize
    if end - begin != expected:
        raise FormatError(f"{where}: {end - begin} bytes of data, but {dtype} {tuple(shape)} needs {expected}")
    return dtype, tuple(shape), begin, end


def _read_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        text = index_path.read_bytes()
    except OSError as e:
        raise InputError(f"{index_path}: cannot read: {e.strerror}") from None
    index = _load_json(index_path, text, "index")
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise FormatError(f"{index_path}: no 'weight_map' object")
    weight_map = index["weight_map"]
    shards: list[str] = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise FormatError(f"{index_path}: tensor '{name}' maps to {_show(shard)}, not a file name")
        # A shard must sit beside the index: a path could point anywhere on disk.
        if Path(shard).name != shard or shard in (".", ".."):
            raise FormatError(f"{index_path}: shard name {_show(shard)} for tensor '{name}' is not a plain file name")
        if shard not in shards:
            shards.append(shard)
    if not shards:
        raise FormatError(f"{index_path}: weight_map is empty")
    return [index_path.parent / s for s in sorted(shards)], weight_map
