"""llama.cpp's importance matrix ("imatrix") and its GGUF file format.

For every weight matrix of the transformer blocks: the sum over calibration tokens of each
input channel's squared activation (`in_sum2`, one row per expert, one for a dense model)
and how many tokens were summed (`counts`). An expert stack's row e sums only the tokens
routed to expert e (llama-imatrix's MUL_MAT_ID collection), so its counts add up to
n_tokens * n_expert_used, and an expert no token picked keeps a zero count, which the
quantizer reads as no importance (all ones). Quantizing with it weights each column's
rounding error by in_sum2 / counts (quants.quantize(importance=...)), as llama-quantize
--imatrix does (tools/quantize/quantize.cpp load_imatrix; docs/llama_cpp_conventions.md
section 5).

File format (tools/imatrix/imatrix.cpp save_imatrix, common/imatrix-loader.cpp): a GGUF
file with general.type = "imatrix", imatrix.datasets (array of strings),
imatrix.chunk_count and imatrix.chunk_size (u32), and per weight, in name order,
"<name>.in_sum2" F32 (n_mat, n_per_row) and "<name>.counts" F32 (n_mat, 1), trailing
dimensions of 1 dropped. llama.cpp's
older .dat format is not read; `llama-imatrix --in-file old.dat -o new.gguf` converts it.

Imports numpy, the standard library and cpuq (errors, gguf_io, quants); nothing of models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from ..errors import FormatError, InputError
from ..gguf_io import GGUFStreamWriter, open_gguf, partial_file
from ..quants import get_qtype

SUMS, COUNTS = ".in_sum2", ".counts"


def _entry_row(name: str) -> tuple[str, int, int]:
    """(entry, row, rows) of an observed matrix: "<stack>#<e>/<n_expert>" -> (stack, e,
    n_expert); any other name -> (name, 0, 1)."""
    stack, sep, which = name.partition("#")
    if not sep:
        return name, 0, 1
    e, n_expert = which.split("/")
    return stack, int(e), int(n_expert)


def check_output(dst: Path, force: bool) -> None:
    """InputError unless an imatrix file can be written at `dst` (callers check before the
    calibration's work, so that a bad -o does not throw it away)."""
    if dst.is_dir():
        raise InputError(f"{dst}: is a directory; give the output imatrix file name")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: no such directory for the output file")
    if dst.exists() and not force:
        raise InputError(f"{dst}: already exists (pass force=True / --force to overwrite)")


@dataclass
class Imatrix:
    """Sums of squared activations per weight matrix. sums[name]: float64 (n_mat, n_per_row);
    counts[name]: float64 (n_mat,), tokens summed per matrix."""
    chunk_size: int                       # tokens per calibration window (llama.cpp's n_ctx)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0                  # windows summed
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None              # the file it was read from

    def add(self, x: np.ndarray, names: tuple[str, ...]) -> None:
        """Add the rows of x (n, k), the input of every matrix in `names`: a matrix's name, or
        an expert's "<stack>#<e>/<n_expert>" (runtime.weights.Matrix.expert), whose rows go
        to row e of the stack's entry (n_expert rows from its first token on, picked or not),
        counted per expert as llama-imatrix counts MUL_MAT_ID's tokens."""
        s = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        for name in names:
            name, row, n_mat = _entry_row(name)
            if name not in self.sums:
                self.sums[name] = np.zeros((n_mat, x.shape[1]), np.float64)
                self.counts[name] = np.zeros(n_mat, np.float64)
            self.sums[name][row] += s
            self.counts[name][row] += x.shape[0]

    def importance(self, name: str) -> np.ndarray | None:
        """float32 (n_mat * n_per_row,) = in_sum2 / counts per matrix, as llama-quantize
        computes it from the file's float32 values (a matrix never seen: ones); None if
        `name` has no entry."""
        if name not in self.sums:
            return None
        sums = self.sums[name].astype(np.float32)
        counts = self.counts[name].astype(np.float32)
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out.reshape(-1)

    def write(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write llama.cpp's imatrix GGUF file; it appears only when complete (written to
        gguf_io.partial_file and renamed)."""
        dst = Path(path)
        check_output(dst, force)
        if not self.datasets:  # gguf-py writes no empty arrays; llama-quantize reads the first name
            raise InputError(f"{dst}: the importance matrix names no dataset (imatrix.datasets needs one)")
        f32 = get_qtype("F32")
        u32 = GGUFValueType.UINT32
        with partial_file(dst) as tmp:  # removes the file unless it is moved into place
            try:
                with GGUFStreamWriter(tmp, arch=None) as w:
                    w.add_metadata({"general.type": "imatrix", "imatrix.datasets": list(self.datasets),
                                    "imatrix.chunk_count": int(self.chunk_count),
                                    "imatrix.chunk_size": int(self.chunk_size)},
                                   {"imatrix.datasets": GGUFValueType.ARRAY,
                                    "imatrix.datasets[]": GGUFValueType.STRING,
                                    "imatrix.chunk_count": u32, "imatrix.chunk_size": u32})
                    names = sorted(self.sums)
                    for name in names:
                        # llama.cpp writes ggml_n_dims dimensions: trailing ones dropped (one matrix: 1-D)
                        n_mat, n_per_row = self.sums[name].shape
                        w.add_tensor_info(name + SUMS, (n_mat, n_per_row) if n_mat > 1 else (n_per_row,), f32)
                        w.add_tensor_info(name + COUNTS, (n_mat, 1) if n_mat > 1 else (1,), f32)
                    w.begin()
                    for name in names:
                        w.write_tensor(name + SUMS, self.sums[name].astype(np.float32))
                        w.write_tensor(name + COUNTS, self.counts[name].astype(np.float32))
                    w.close()
                os.replace(tmp, dst)
            except OSError as e:
                raise InputError(f"{dst}: write failed: {e.strerror}; nothing was written") from None
        return dst

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Imatrix":
        """Read and check an imatrix GGUF file (FormatError naming the file and entry)."""
        p = Path(path)
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise InputError(f"{p}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{p}: is a directory, not an imatrix file") from None
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror}") from None
        if magic != b"GGUF":
            raise FormatError(f"{p}: not a GGUF imatrix file (llama.cpp's legacy .dat format is not read; "
                              f"convert it with `llama-imatrix --in-file {p.name} -o imatrix.gguf`)")
        with open_gguf(p) as g:
            if g.get("general.type") != "imatrix":
                raise FormatError(f"{p}: general.type is {g.get('general.type')!r}, not 'imatrix' "
                                  f"(a model file where an importance matrix was expected?)")
            # All three are required, as llama-quantize requires them ("missing imatrix metadata").
            datasets = g.require("imatrix.datasets", list)
            chunk_count = g.require("imatrix.chunk_count", int)
            chunk_size = g.require("imatrix.chunk_size", int)
            if not all(isinstance(d, str) for d in datasets):
                raise FormatError(f"{p}: imatrix.datasets is not a list of strings")
            if chunk_count < 0 or chunk_size < 0:
                raise FormatError(f"{p}: imatrix.chunk_count/chunk_size must not be negative")
            im = cls(chunk_size=chunk_size, datasets=datasets, chunk_count=chunk_count, path=p)
            for t in g:
                if t.name.endswith(COUNTS):
                    continue
                if not t.name.endswith(SUMS):
                    raise FormatError(f"{p}: tensor '{t.name}' is neither a '{SUMS}' nor a '{COUNTS}' entry")
                name = t.name[:-len(SUMS)]
                c = g.tensors.get(name + COUNTS)
                if c is None:
                    raise FormatError(f"{p}: entry '{name}' has '{SUMS}' but no '{COUNTS}'")
                if t.qtype.name != "F32" or c.qtype.name != "F32":
                    raise FormatError(f"{p}: entry '{name}' is {t.qtype.name}/{c.qtype.name}; both must be F32")
                sums = t.data.view(np.float32).reshape(-1)
                counts = c.data.view(np.float32).reshape(-1)
                if counts.size == 0 or sums.size % counts.size:
                    raise FormatError(f"{p}: entry '{name}' has {sums.size} sums for {counts.size} matrices")
                if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
                    raise FormatError(f"{p}: entry '{name}' holds non-finite values")
                if (sums < 0).any() or (counts < 0).any():
                    raise FormatError(f"{p}: entry '{name}' holds negative sums or counts")
                im.sums[name] = sums.astype(np.float64).reshape(counts.size, -1)
                im.counts[name] = np.floor(counts.astype(np.float64) + 0.5)  # the loader's lround: halves up
            orphans = [t.name for t in g if t.name.endswith(COUNTS) and t.name[:-len(COUNTS)] not in im.sums]
            if orphans:
                raise FormatError(f"{p}: entry '{orphans[0][:-len(COUNTS)]}' has '{COUNTS}' but no '{SUMS}'")
        if not im.sums:
            raise FormatError(f"{p}: the imatrix has no entries")
        return im

