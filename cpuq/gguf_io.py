"""GGUF files in and out, on top of gguf-py: a validated memory-mapped reader and a
streaming writer.

The reader checks everything a later read depends on (counts against the file size,
value and tensor type ids, shapes, alignment, duplicate names, every tensor's byte extent)
before gguf-py would index or reshape with it, and raises a FormatError naming the file and
what is wrong; any other exception from the parser is a bug in it, and surfaces as one.
No tensor data is copied at open: `GGUFFile.tensor(name).data` is a view of the mmap.

The writer writes all metadata and tensor infos first, then tensor data one tensor
at a time, so a writer never holds the model in memory.

Imports from cpuq: errors, quants (for the type table). Nothing above them.
"""
from __future__ import annotations

import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no flock; the temporary file is still reused, only not guarded
    fcntl = None

import numpy as np
import gguf
from numba import njit
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType
from gguf.gguf_writer import WriterState

from .errors import FormatError, InputError, UnsupportedError, abbreviated
from .quants import QType, qtype_from_id

GGUF_MAGIC = 0x46554747  # b"GGUF" read little-endian
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Smallest possible encodings, used to reject absurd counts before parsing:
# a key/value is a u64 key length + u32 type + at least one byte of value; a tensor
# info is a u64 name length + u32 n_dims + u32 type + u64 offset (dims add 8 each).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_HEADER_BYTES = 4 + 4 + 8 + 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of an open file. `shape` is in numpy (row-major) order, as the
    values will be used: the last axis is GGUF's ne[0], the row length."""
    name: str
    qtype: QType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray  # uint8 view of the mmap, (rows, row_bytes); zero-copy

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rows(self) -> int:
        return self.n_elements // self.shape[-1]

    @property
    def cols(self) -> int:
        return self.shape[-1]


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's parser, with each thing a bad file can get wrong checked where gguf-py
    would otherwise index, reshape or raise its own ValueError/KeyError on it: reads past
    the end, value types, arrays of arrays, duplicate keys and tensors, the alignment, and
    tensor infos. Key and tensor names are decoded by gguf-py (UnicodeDecodeError)."""

    def __init__(self, path: Path):
        self._path = path
        super().__init__(path, "r")

    def _get(self, offset, dtype, count=1, override_order=None):
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        if offset + itemsize * count > len(self.data):
            raise FormatError(f"{self._path}: truncated: a read of {itemsize * count} bytes at offset {offset} "
                              f"goes past the end of the file ({len(self.data)} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _push_field(self, field, skip_sum=False):
        if field.name in self.fields:
            raise FormatError(f"{self._path}: metadata key {_quoted(field.name)} appears twice")
        return super()._push_field(field, skip_sum)

    def _get_field_parts(self, orig_offs, raw_type):
        # gguf-py walks arrays one element at a time, building numpy views per element: 7 s
        # for a 151936-token vocabulary. Arrays are read here in one step instead; the
        # parts keep gguf-py's layout (item type, length, values) so ReaderField still works.
        if int(raw_type) not in _VALUE_TYPE_IDS:
            raise FormatError(f"{self._path}: the metadata value at offset {orig_offs} has unknown type {raw_type}")
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        start = orig_offs + 12
        itype = int(raw_itype[0])
        if itype not in _VALUE_TYPE_IDS:
            raise FormatError(f"{self._path}: the array at offset {orig_offs} has items of unknown type {itype}")
        if itype == GGUFValueType.ARRAY:  # llama.cpp's reader (gguf.cpp) rejects them too
            raise FormatError(f"{self._path}: the array at offset {orig_offs} holds arrays (nested arrays are "
                              f"not valid GGUF)")
        if itype == GGUFValueType.STRING:
            starts, lengths, end = _string_array_extents(self.data, start, n, self._path)
            blob = self.data[start:end]
            # No data indices: _field_value recognises this shape and decodes the blob itself.
            return end - orig_offs, [raw_itype, alen, blob, starts, lengths], [], \
                [GGUFValueType.ARRAY, GGUFValueType.STRING]
        values = self._get(start, self.gguf_scalar_to_np[GGUFValueType(itype)], n)
        return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, GGUFValueType(itype)]

    def _build_tensor_info(self, offs, count):
        # gguf-py checks general.alignment after this, with a ValueError; checked here first
        field = self.fields.get("general.alignment")
        if field is not None:
            if field.types != [GGUFValueType.UINT32]:
                kind = " of ".join(GGUFValueType(t).name for t in field.types)
                raise FormatError(f"{self._path}: metadata key 'general.alignment' is {kind}, expected UINT32")
            alignment = int(field.parts[-1][0])
            if alignment == 0 or alignment & (alignment - 1):
                raise FormatError(f"{self._path}: general.alignment {alignment} is not a power of two")
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        file_size = len(self.data)
        names = set()
        for field in fields:
            _, name_data, n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = _decode(bytes(name_data), self._path, "tensor name")
            if name in names:
                raise FormatError(f"{self._path}: tensor {_quoted(name)} appears twice")
            names.add(name)
            _check_tensor_info(self._path, name, int(n_dims[0]), [int(d) for d in dims], int(raw_dtype[0]),
                               int(offset_tensor[0]), int(start_offs), int(self.alignment), file_size)
        super()._build_tensors(start_offs, fields)


_VALUE_TYPE_IDS = {int(t) for t in GGUFValueType}


@njit(cache=True)
def _scan_strings(data, start, n, starts, lengths):
    """Walk n (uint64 length, bytes) strings from `start`: fill starts/lengths and return
    (end offset, -1), or (offset reached, index of the first string that does not fit)."""
    size = data.shape[0]
    pos = start
    for i in range(n):
        if pos + 8 > size:
            return pos, i
        length = np.uint64(0)
        for b in range(8):
            length |= np.uint64(data[pos + b]) << np.uint64(8 * b)
        pos += 8
        if length > np.uint64(size - pos):
            return pos, i
        starts[i] = pos
        lengths[i] = np.int64(length)
        pos += np.int64(length)
    return pos, -1


def _string_array_extents(data: np.ndarray, start: int, n: int, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(start offset of each string's bytes, each length, end offset) of n length-prefixed
    strings at `start`; FormatError if they run past the end of the file. (A Numba loop:
    a vocabulary's 150k tokens and merges took 0.17 s in Python, at every model load.)"""
    size = len(data)
    if n > (size - start) // 8:
        raise FormatError(f"{path}: a string array claims {n} items, more than the file can hold")
    starts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    pos, bad = _scan_strings(np.asarray(data, dtype=np.uint8), start, n, starts, lengths)
    if bad >= 0:
        if pos + 8 > size:
            raise FormatError(f"{path}: truncated inside a string array (item {bad} of {n})")
        raise FormatError(f"{path}: string {bad} of an array at offset {start} runs past the end of the file")
    return starts, lengths, pos


def _quoted(name: str) -> str:
    """A name read from the file, quoted for a one-line message: as it is when short and
    printable, else its repr, abbreviated (a lying file can put a newline or 100 kB in one)."""
    return f"'{name}'" if len(name) <= 200 and name.isprintable() else abbreviated(name)


def _decode(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: {what} {raw[:40]!r} is not valid UTF-8") from None


def _check_tensor_info(path: Path, name: str, n_dims: int, dims: list[int], type_id: int, rel_offset: int,
                       data_start: int, alignment: int, file_size: int) -> None:
    where = f"{path}: tensor {_quoted(name)}"
    if not 1 <= n_dims <= MAX_DIMS:
        raise FormatError(f"{where} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    if any(d <= 0 for d in dims):
        raise FormatError(f"{where} has a non-positive dimension in {dims}")
    n_elements = 1
    for d in dims:
        n_elements *= d
    if n_elements > file_size * 64:  # even 1-bit types need n/8 bytes: this bound only rejects overflow bait
        raise FormatError(f"{where} claims {n_elements} elements, impossible in a {file_size}-byte file")
    try:
        qtype = qtype_from_id(type_id)
    except UnsupportedError as e:
        raise FormatError(f"{where}: {e}") from None
    if dims[0] % qtype.block_size:
        raise FormatError(f"{where} has rows of {dims[0]} values, not a multiple of {qtype.name}'s block size "
                          f"{qtype.block_size}")
    if rel_offset % alignment:
        raise FormatError(f"{where} starts at data offset {rel_offset}, not a multiple of the alignment {alignment}")
    n_bytes = n_elements // qtype.block_size * qtype.type_size
    end = data_start + rel_offset + n_bytes
    if end > file_size:
        raise FormatError(f"{where} ({qtype.name}, {n_bytes} bytes at offset {data_start + rel_offset}) extends "
                          f"{end - file_size} bytes past the end of the file ({file_size} bytes)")


def _check_header(path: Path, file_size: int) -> None:
    if file_size < _HEADER_BYTES:
        raise FormatError(f"{path}: not a GGUF file: {file_size} bytes is shorter than a GGUF header")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if len(head) < _HEADER_BYTES:  # shorter than its size said a moment ago
        raise FormatError(f"{path}: not a GGUF file: {len(head)} bytes is shorter than a GGUF header")
    magic, version = struct.unpack("<II", head[:8])
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    room = file_size - _HEADER_BYTES
    if n_kv * _MIN_KV_BYTES > room:
        raise FormatError(f"{path}: header claims {n_kv} metadata keys, more than a {file_size}-byte file can hold")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > room:
        raise FormatError(f"{path}: header claims {n_tensors} tensors, more than a {file_size}-byte file can hold")


def _joined_strings(blob: np.ndarray, prefixes: np.ndarray, n: int) -> list[str] | None:
    """The n strings of a string array's bytes (blob: each a uint64 length, then the bytes;
    prefixes: where each length starts) in one decode and one split, or None when one of
    them holds a NUL byte or is not UTF-8 (the caller then goes string by string). Dropping
    each length's low 7 bytes leaves its top byte, 0 for any length a file can hold, as a
    separator: a 151k vocabulary's tokens took 46 ms item by item, 22 ms so."""
    keep = np.ones(blob.shape[0], bool)
    for j in range(7):
        keep[prefixes + j] = False
    try:
        parts = blob[keep].tobytes().decode("utf-8").split("\x00")
    except UnicodeDecodeError:
        return None
    return parts[1:] if len(parts) == n + 1 else None


def _field_value(field: gguf.ReaderField, path: Path) -> Any:
    if field.types == [GGUFValueType.ARRAY, GGUFValueType.STRING] and not field.data:
        blob, starts, lengths = field.parts[-3:]
        base = int(starts[0]) - 8 if len(starts) else 0  # blob begins at the first length prefix
        joined = _joined_strings(np.asarray(blob), starts - base - 8, len(starts))
        if joined is not None:
            return joined
        raw = blob.tobytes()
        try:
            return [raw[s - base:s - base + n].decode("utf-8") for s, n in zip(starts.tolist(), lengths.tolist())]
        except UnicodeDecodeError:
            raise FormatError(f"{path}: metadata key {_quoted(field.name)} holds a string that is not valid UTF-8") \
                from None
    try:
        value = field.contents()
    except UnicodeDecodeError:
        raise FormatError(f"{path}: metadata key {_quoted(field.name)} holds a string that is not valid UTF-8") \
            from None
    if isinstance(value, np.generic):
        value = value.item()
    return value


class GGUFFile:
    """An open, validated GGUF file. Metadata values are plain Python values
    (int, float, bool, str, list); tensors are zero-copy uint8 views of the mmap."""

    def __init__(self, path: Path, reader: gguf.GGUFReader):
        self.path = path
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.file_size = len(reader.data)
        self.mapped = np.asarray(reader.data).reshape(-1).view(np.uint8)  # the whole file; tensors' data are views of it
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self._fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        self._types = {name: GGUFValueType(f.types[0]) if f.types else None for name, f in self._fields.items()}
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            qtype = qtype_from_id(int(t.tensor_type))
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            cols = shape[-1]
            rows = int(t.n_elements) // cols
            data = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(rows, qtype.row_bytes(cols))
            self.tensors[t.name] = TensorInfo(t.name, qtype, shape, int(t.data_offset), int(t.n_bytes), data)
        self._reader = reader

    # metadata ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._fields)

    def value_type(self, key: str) -> GGUFValueType | None:
        return self._types.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else _field_value(field, self.path)

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """The value of `key`, which must exist and be of Python type `kind`."""
        if key not in self._fields:
            raise FormatError(f"{self.path}: metadata key '{key}' is missing")
        value = self.get(key)
        if isinstance(value, bool) and kind in (int, float):  # bool is an int in Python; not in GGUF
            raise FormatError(f"{self.path}: metadata key '{key}' is a bool, expected {kind.__name__}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise FormatError(f"{self.path}: metadata key '{key}' is {type(value).__name__}, expected {names}")
        return value

    def metadata(self) -> dict[str, Any]:
        return {k: self.get(k) for k in self._fields}

    def array_length(self, key: str) -> int:
        """Length of an array value without materialising it (vocabularies are big)."""
        field = self._fields.get(key)
        if field is None or self._types.get(key) != GGUFValueType.ARRAY:
            return 0
        return int(field.parts[4][0])  # parts: key_len, key, type, item_type, length, items...

    # tensors ----------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor '{name}' is missing") from None

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self) -> None:
        """Drop the mmap; views handed out before keep it alive until they go."""
        self._reader = None
        self.tensors = {}
        self.mapped = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file (memory-mapped, nothing copied)."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a GGUF file")
    _check_header(path, file_size)
    # _CheckedReader raises FormatError for everything else a bad file can get wrong.
    try:
        reader = _CheckedReader(path)
    except UnicodeDecodeError as e:  # a key or tensor name, decoded by gguf-py
        raise FormatError(f"{path}: a metadata key or tensor name is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:  # the mmap: no permission, or a file system that cannot map files
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    return GGUFFile(path, reader)


# writing --------------------------------------------------------------------

@contextmanager
def partial_file(dst: Path, suffix: str = ".partial") -> Iterator[Path]:
    """The temporary file that `dst` is written through, for the length of a with block:
    `.<dst name><suffix>` in dst's folder (so that os.replace moves it into place), empty, and
    locked (flock) so that a second process writing the same destination stops with an
    InputError instead of writing over it. At the end of the block it is removed unless it
    was moved into place.

    The name is fixed, not random, because nothing can remove the file when the process is
    killed (SIGKILL, the OOM killer, a power cut): the next write of the same destination
    finds it unlocked (the kernel drops a dead process's locks), empties and reuses it, so
    killed runs leave at most this one file, and the next successful run none.
    InputError: the folder refuses the file, or another process is writing it."""
    tmp = dst.with_name(f".{dst.name}{suffix}")
    fd = _claim(tmp, dst)
    try:
        yield tmp
    finally:
        try:
            if _same_file(fd, tmp):  # not moved into place: an error or an interrupt
                tmp.unlink()
        except OSError:
            pass
        os.close(fd)


def _claim(tmp: Path, dst: Path) -> int:
    """A descriptor of `tmp` (created, or a killed run's leftover taken over), locked and empty."""
    # O_NOFOLLOW: a symlink planted at the name must not make us truncate its target.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(10):
        try:
            fd = os.open(tmp, flags, 0o666)  # the mode any new file gets (the umask applies)
        except OSError as e:
            raise InputError(f"{dst.parent}: cannot create the output file there ({tmp.name}): {e.strerror}") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise InputError(f"{dst}: another process is writing it (its temporary file {tmp.name} "
                                     f"is in use)") from None
                except OSError:
                    pass  # a file system without flock: write unguarded
            if _same_file(fd, tmp):  # else its writer moved it into place between our open and lock
                os.ftruncate(fd, 0)
                return fd
        except OSError as e:
            os.close(fd)
            raise InputError(f"{tmp}: cannot write: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise InputError(f"{dst}: its temporary file {tmp.name} keeps being replaced by another process")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _value_bytes(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> int:
    """Length of one metadata value as gguf-py's GGUFWriter._pack_val packs it (no type tag)."""
    fmt = gguf.GGUFWriter._simple_value_packing.get(vtype)
    if fmt is not None:
        return struct.calcsize("<" + fmt)
    if vtype == GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
    if vtype == GGUFValueType.ARRAY:
        if sub_type is None:
            sub_type = GGUFValueType.UINT8 if isinstance(value, bytes) else GGUFValueType.get_type(value[0])
        fmt = gguf.GGUFWriter._simple_value_packing.get(sub_type)
        if fmt is not None:
            return 4 + 8 + len(value) * struct.calcsize("<" + fmt)
        if sub_type == GGUFValueType.STRING:
            try:  # one join: UTF-8 lengths add up, and a vocabulary has 300k strings
                text = len("".join(value).encode("utf-8"))
            except TypeError:  # bytes among them
                text = sum(len(v.encode("utf-8") if isinstance(v, str) else v) for v in value)
            return 4 + 8 + 8 * len(value) + text
        return 4 + 8 + sum(_value_bytes(v, sub_type, None) for v in value)
    raise InputError(f"metadata value of type {vtype!r} cannot be written")


class _ArrayWriter(gguf.GGUFWriter):
    """gguf-py's writer with metadata arrays packed whole instead of item by item: a 150k-token
    vocabulary's tokens, merges and types took 0.41 s item by item, 0.10 s whole. Same
    bytes; anything unusual (other endianness, mixed items, a value out of its type's range)
    goes the library's way, and its errors with it."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and self.endianess == GGUFEndian.LITTLE and sub_type is not None \
                and isinstance(val, (list, tuple)) and val:
            items = _pack_items(val, sub_type)
            if items is not None:
                head = struct.pack("<I", vtype) if add_vtype else b""
                return head + struct.pack("<IQ", sub_type, len(val)) + items
        return super()._pack_val(val, vtype, add_vtype, sub_type)


_U64 = struct.Struct("<Q")


def _pack_items(val: list | tuple, sub_type: GGUFValueType) -> bytes | None:
    """The items of a little-endian array as GGUFWriter._pack_val packs them, or None where
    only it knows (bools, nested arrays, mixed or out-of-range items)."""
    if sub_type == GGUFValueType.STRING:
        try:
            data = [v.encode("utf-8") for v in val]
        except (AttributeError, UnicodeError):  # bytes or other items, lone surrogates
            return None
        parts = [b""] * (2 * len(data))  # each item: its u64 length, then its bytes
        parts[::2] = map(_U64.pack, map(len, data))
        parts[1::2] = data
        return b"".join(parts)
    fmt = gguf.GGUFWriter._simple_value_packing.get(sub_type)
    if fmt is None or sub_type == GGUFValueType.BOOL:
        return None
    dtype = np.dtype("<" + fmt)
    kind = int if dtype.kind in "iu" else float
    if set(map(type, val)) != {kind}:  # struct's rules for numpy scalars, bools, floats as ints
        return None
    if kind is int:
        info = np.iinfo(dtype)
        if min(val) < info.min or max(val) > info.max:
            return None
        return np.array(val, dtype=dtype).tobytes()
    wide = np.array(val, dtype=np.float64)
    with np.errstate(over="ignore"):
        out = wide.astype(dtype)
    if np.any(np.isinf(out) & np.isfinite(wide)):  # struct raises OverflowError there
        return None
    return out.tobytes()


class GGUFStreamWriter:
    """Write a GGUF file: metadata and every tensor's info first, then tensor data in
    the declared order, one tensor at a time.

        with GGUFStreamWriter(path, arch="qwen2") as w:  # an exception: abort()
            w.add_metadata({"general.name": "x", ...})
            w.add_tensor_info("token_embd.weight", (n_vocab, n_embd), QTYPES["Q8_0"])
            w.begin()
            w.write_tensor("token_embd.weight", blocks)   # uint8 (rows, row_bytes) or float array
            w.close()
    """

    def __init__(self, path: str | os.PathLike, arch: str | None):
        """arch None: a file that is not a model (an importance matrix), without general.architecture."""
        self.path = Path(path)
        self._writer = _ArrayWriter(self.path, arch or "", use_temp_file=False)
        if arch is None:
            self._writer.kv_data[0].pop("general.architecture", None)
        self._pending: list[tuple[str, tuple[int, ...], QType]] = []
        self._begun = False

    def add_metadata(self, values: Mapping[str, Any], types: Mapping[str, GGUFValueType] | None = None) -> None:
        """Add key/value pairs. Python ints become UINT32 unless `types` says otherwise
        (as gguf-py does); pass explicit types where llama.cpp expects another width."""
        types = types or {}
        for key, value in values.items():
            vtype = types.get(key)
            if vtype is None:
                vtype = GGUFValueType.get_type(value)
            sub = None
            if vtype == GGUFValueType.ARRAY and len(value):
                sub = types.get(key + "[]") or GGUFValueType.get_type(value[0])
            self._writer.add_key_value(key, value, vtype, sub_type=sub)

    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: QType) -> None:
        if self._begun:
            raise InputError(f"{self.path}: tensor '{name}' declared after writing began")
        shape = tuple(int(s) for s in shape)
        if shape[-1] % qtype.block_size:
            raise InputError(f"tensor '{name}': row length {shape[-1]} is not a multiple of {qtype.name}'s "
                             f"block size {qtype.block_size}")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        n_bytes = rows * qtype.row_bytes(shape[-1])
        # gguf-py takes the numpy-order shape and reverses it into ne[] itself.
        self._writer.add_tensor_info(name, shape, np.dtype(np.float32), n_bytes,
                                     raw_dtype=GGMLQuantizationType(qtype.ggml_type))
        self._pending.append((name, shape, qtype))

    def file_bytes(self) -> int:
        """The size the finished file will have, before begin(): header, metadata and tensor
        infos padded to the alignment, then each declared tensor's data padded to it (what
        begin() and write_tensor_parts write), for a check of free space before writing."""
        if self._begun:
            raise InputError(f"{self.path}: file_bytes() is known only before writing begins")
        w = self._writer
        n = _HEADER_BYTES
        for key, v in w.kv_data[0].items():
            n += _value_bytes(key, GGUFValueType.STRING, None) + 4 + _value_bytes(v.value, v.type, v.sub_type)
        for name, ti in w.tensors[0].items():
            # name, n_dims, ne[], type, offset
            n += _value_bytes(name, GGUFValueType.STRING, None) + 4 + 8 * len(ti.shape) + 4 + 8
        align = w.data_alignment
        return _pad(n, align) + sum(_pad(ti.nbytes, align) for ti in w.tensors[0].values())

    def begin(self) -> None:
        """Write header, metadata and tensor infos; after this only tensor data follows."""
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()
        self._begun = True

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        self.write_tensor_parts(name, (data,))

    def write_tensor_parts(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """Write the next declared tensor's data from consecutive pieces (blocks of rows,
        uint8 blocks or float values), so only one piece need exist at a time."""
        if not self._begun:
            self.begin()
        if not self._pending:
            raise InputError(f"{self.path}: tensor '{name}' was never declared")
        expected, shape, qtype = self._pending[0]
        if name != expected:
            raise InputError(f"{self.path}: tensor '{name}' written out of order (expected '{expected}')")
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        need = rows * qtype.row_bytes(shape[-1])
        # What gguf-py's write_tensor_data does for a whole array (pad, data, pad), one piece
        # at a time; its tensor-info list must lose the entry as that method would.
        w = self._writer
        fout = w.fout[0]
        if next(iter(w.tensors[0]), None) != name:
            raise InputError(f"{self.path}: tensor '{name}' is not next in gguf-py's tensor list")
        w.tensors[0].pop(name)
        w.write_padding(fout, fout.tell())
        written = 0
        for part in parts:
            flat = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            written += flat.nbytes
            if written > need:
                raise InputError(f"{self.path}: tensor '{name}' has more than the {need} bytes of data it declared")
            fout.write(flat.data)
        if written != need:
            raise InputError(f"{self.path}: tensor '{name}' has {written} bytes of data, expected {need}")
        w.write_padding(fout, need)
        w.state = WriterState.WEIGHTS
        self._pending.pop(0)

    def close(self) -> None:
        if not self._begun:
            self.begin()
        if self._pending:
            raise InputError(f"{self.path}: {len(self._pending)} declared tensors were never written "
                             f"(first: '{self._pending[0][0]}')")
        self._writer.close()

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """On an exception (an interrupt too), abort(): the caller removes the file."""
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Close the file handle without finishing it (the caller deletes the file)."""
        try:
            self._writer.close()
        except Exception:
            pass
