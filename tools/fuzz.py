"""Fuzzing of everything cpuq reads from untrusted files: mutated GGUF models (opened,
summarised, then loaded and run), and mutated safetensors files and config.json files fed
to the converter.

    python tools/fuzz.py --target gguf --cases 100000 --workers 2 [--seed 0] [--timeout 10] [--mem-mb 4096]
    python tools/fuzz.py --target config --replay /tmp/cpuq-fuzz-failures/config-c123-exception.bin

A case passes if it completes, or raises a CpuqError whose message is one non-empty line
(of at most MAX_MESSAGE characters) naming the file at fault: the GGUF file when it is
opened, the checkpoint folder in the converter (errors of the runtime after a successful
open need not). Anything else fails it: another exception type, a MemoryError,
a crash (a signal: a Numba kernel reading past a buffer), a hang (over --timeout seconds:
killed), a failed conversion that left a file behind. Cases run in worker processes,
batches at a time, each worker's address space capped at --mem-mb (RLIMIT_AS) so that an
allocation sized by a lying count fails instead of swapping; a worker that dies takes only
its in-flight case with it and is restarted. Case i is a function of (--target, --seed, i),
so the driver re-creates a crashed or hung case's bytes itself; every failing input is
saved under --failures with a .json note, for --replay.

Seeds (built once per run under --work, a temporary folder by default):
* gguf: cpuq.convert of a tiny qwen2 checkpoint (tools/make_tiny_checkpoint.py: hidden 256,
  one block, so Q4_K/Q6_K appear) to q8_0 and q4_k_m, with the real 151936-token Qwen2
  vocabulary; and the same two files with the vocabulary cut to 1024 tokens, which load in
  milliseconds instead of 0.4 s. Most cases mutate the small ones (SMALL_SHARE).
* safetensors, config: tiny qwen2 and llama checkpoints (hidden 64, one block), converted
  to q8_0. The tokenizer files are never mutated in these targets, so the converter's
  read_tokenizer_files (0.75 s for the real vocabulary) is memoised.

Mutations are structure-aware: the GGUF walker below finds every count, length, type id,
dimension, offset and string of the header, metadata and tensor infos, and most mutations
hit one of them with an extreme or off-by-one value; a quarter of the GGUF cases rewrite a
key/value (any type, deleted, duplicated, added) into a well-formed file that lies about
the model; safetensors mutations edit the JSON
header's dtypes, shapes and offsets (and the length prefix, padding, data, truncation);
config mutations delete keys and set wrong types, huge/negative/zero/NaN numbers, nested
junk, invalid JSON and non-UTF-8 bytes.

tests/test_fuzz_gguf.py and tests/convert/test_fuzz_convert.py run short versions of the
same targets in-process, with hypothesis drawing the random choices (`make`, `run`).

Imports cpuq, numpy, the sibling make_tiny_checkpoint and the standard library.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuq  # noqa: E402
from cpuq import CpuqError  # noqa: E402
from toolcli import ArgumentParser, ToolError, require_file, run  # noqa: E402

SMALL_VOCAB = 1024
SMALL_SHARE = 0.9  # of gguf cases that mutate a cut-vocabulary seed
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2's ids 151643..151645

U64_EXTREMES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
U32_EXTREMES = [0, 1, 7, 31, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, 1e-30, 1e30, 3.4e38]


MAX_MESSAGE = 2000  # characters: a file's 100 kB string quoted whole is not a clear message


class BadMessage(AssertionError):
    """A CpuqError whose message is empty, spans lines, is huge, or does not name the file."""


def check_message(e: CpuqError, where: str | None) -> None:
    msg = str(e)
    if not msg or "\n" in msg or len(msg) > MAX_MESSAGE or (where is not None and where not in msg):
        raise BadMessage(f"{type(e).__name__} message {msg[:MAX_MESSAGE]!r} ({len(msg)} characters; must be one "
                         f"line of at most {MAX_MESSAGE} naming {where!r})")


# GGUF -------------------------------------------------------------------------------------

# GGUF value type -> (size, kind) of a scalar; 8 is a string, 9 an array.
_SCALARS = {0: (1, "u"), 1: (1, "i"), 2: (2, "u"), 3: (2, "i"), 4: (4, "u"), 5: (4, "i"), 6: (4, "f"), 7: (1, "bool"),
            10: (8, "u"), 11: (8, "i"), 12: (8, "f")}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    """One field of a GGUF file's structure: `size` bytes at `offset`."""
    offset: int
    size: int
    kind: str    # "u" "i" "f" "bool": a number; "type": a value or tensor type id; "str": string bytes
    region: str  # "header" | "kv" | "array" (items of a metadata array) | "tensor_info"


@dataclass(frozen=True)
class Layout:
    """Where things are in a valid GGUF file."""
    fields: list[Field]           # every field of the header, metadata and tensor infos (array
                                  # items: a sample of 32 spread over the array)
    kvs: list[tuple[int, int]]    # each key/value's byte range
    tensor_infos: tuple[int, int]
    tensors: list[tuple[int, int]]  # each tensor info's byte range
    alignment: int
    data_start: int


def gguf_layout(raw: bytes) -> Layout:
    fields: list[Field] = []
    kvs: list[tuple[int, int]] = []
    pos = 0

    def take(size: int, kind: str, region: str) -> int:
        nonlocal pos
        fields.append(Field(pos, size, kind, region))
        pos += size
        return int.from_bytes(raw[pos - size:pos], "little")

    def string(region: str, record: bool = True) -> bytes:
        nonlocal pos
        n = int.from_bytes(raw[pos:pos + 8], "little")
        if record:
            take(8, "u", region)
            fields.append(Field(pos, n, "str", region))
        else:
            pos += 8
        pos += n
        return raw[pos - n:pos]

    def value(vtype: int, region: str) -> object:
        nonlocal pos
        if vtype == _STRING:
            return string(region)
        if vtype == _ARRAY:
            itype, count = take(4, "type", region), take(8, "u", region)
            sample = set(np.linspace(0, count - 1, min(count, 32)).astype(int).tolist()) if count else set()
            if itype in _SCALARS and itype != _STRING:
                size, kind = _SCALARS[itype]
                for k in sorted(sample):
                    fields.append(Field(pos + k * size, size, kind, "array"))
                pos += size * count
            else:
                for k in range(count):
                    if itype == _STRING and k not in sample:
                        string("array", record=False)
                    else:
                        value(itype, "array")
            return None
        size, kind = _SCALARS[vtype]
        return take(size, kind, region)

    take(4, "str", "header")  # magic
    take(4, "u", "header")    # version
    n_tensors, n_kv = take(8, "u", "header"), take(8, "u", "header")
    alignment = 32
    for _ in range(n_kv):
        start = pos
        key = string("kv")
        v = value(take(4, "type", "kv"), "kv")
        if key == b"general.alignment":
            alignment = int(v)
        kvs.append((start, pos))
    ti_start = pos
    tensors: list[tuple[int, int]] = []
    for _ in range(n_tensors):
        tensors.append((pos, pos))
        string("tensor_info")
        n_dims = take(4, "u", "tensor_info")
        for _ in range(n_dims):
            take(8, "u", "tensor_info")
        take(4, "type", "tensor_info")
        take(8, "u", "tensor_info")
        tensors[-1] = (tensors[-1][0], pos)
    return Layout(fields, kvs, (ti_start, pos), tensors, alignment, -(-pos // alignment) * alignment)


# Metadata values that a well-formed file can hold and a model's keys should not.
_JUNK_NUMBERS = [0, 1, 2, 3, 7, 31, 64, 127, 128, 255, 256, 1023, 1024, 1025, 65535, 2**31 - 1, 2**32 - 1, 2**63,
                 -1, -2**31]
_JUNK_STRINGS = ["", "yarn", "linear", "none", "gpt2", "llama", "qwen2", "qwen3", "default", "x" * 5000, "{{",
                 "{% for m in messages %}{{ m.content }}", "{{ raise_exception('no') }}", "a b", "<|im_end|>"]
# Keys the reader looks for that the seeds lack (arch keys with "qwen2." in front).
_EXTRA_KEYS = ["qwen2.rope.scaling.type", "qwen2.rope.scaling.factor", "qwen2.rope.scaling.original_context_length",
               "qwen2.rope.scaling.yarn_ext_factor", "qwen2.vocab_size", "qwen2.attention.key_length",
               "qwen2.attention.value_length", "qwen2.rope.dimension_count", "general.alignment",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id"]


def _pack_value(rng: random.Random, depth: int = 0) -> bytes:
    """A random GGUF value: type id and bytes."""
    vtype = rng.choice([4, 4, 5, 6, 7, 8, 8, 9, 9, 10, 11, 12, 0, 2])
    if vtype == _STRING:
        text = rng.choice(_JUNK_STRINGS).encode() if rng.random() < 0.9 else b"\xff\xfe"
        return struct.pack("<IQ", vtype, len(text)) + text
    if vtype == _ARRAY:
        if depth or rng.random() < 0.6:
            itype = rng.choice([4, 5, 6, 7, 10])
            size, kind = _SCALARS[itype]
            items = [rng.choice(FLOATS) if kind == "f" else rng.choice(_JUNK_NUMBERS) % 2 ** (8 * size)
                     for _ in range(rng.choice([0, 1, 3, 1000]))]
            fmt = {4: "I", 5: "I", 6: "f", 7: "B", 10: "Q"}[itype]
            return struct.pack(f"<IIQ{len(items)}{fmt}", vtype, itype, len(items), *items)
        items = [_pack_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 2]))]
        if items and rng.random() < 0.5:  # an array of strings (or of arrays): items of one type
            itype, body = _STRING, b"".join(struct.pack("<Q", 1) + b"a" for _ in items)
        else:
            itype, body = _ARRAY, b"".join(struct.pack("<IQ", 5, 0) for _ in items)
        return struct.pack("<IIQ", vtype, itype, len(items)) + body
    size, kind = _SCALARS[vtype]
    if kind == "f":
        return struct.pack("<I" + ("f" if size == 4 else "d"), vtype, rng.choice(FLOATS + [1.0, 1e-6, 1e6]))
    return struct.pack("<I", vtype) + (rng.choice(_JUNK_NUMBERS) % 2 ** (8 * size)).to_bytes(size, "little")


def _new_name(rng: random.Random, name: bytes, other: bytes) -> bytes:
    """A key or tensor name that a well-formed file can hold: with a newline, very long,
    another's, empty, not UTF-8."""
    return rng.choice([name + b"\n", b"line\n" + name, name * 400, other, b"", name + b"\xff", name[:-1],
                       name + b"\x00"])


def mutate_gguf_metadata(rng: random.Random, raw: bytes, layout: Layout) -> bytes:
    """A well-formed file with lying metadata: a key/value given a random value of any type,
    deleted, duplicated, or added (keys the reader looks for), a key or tensor renamed; the
    file rebuilt around it (header counts, tensor infos, padding, then the same tensor data)."""
    kvs = [raw[a:b] for a, b in layout.kvs]
    infos = [raw[a:b] for a, b in layout.tensors]
    i = rng.randrange(len(kvs))
    op = rng.choices(["value", "delete", "duplicate", "add", "key", "tensor"], [6, 2, 1, 2, 1, 1])[0]
    key_len = int.from_bytes(kvs[i][:8], "little")
    if op == "value":
        kvs[i] = kvs[i][:8 + key_len] + _pack_value(rng)
    elif op == "delete":
        del kvs[i]
    elif op == "duplicate":
        kvs.insert(rng.randrange(len(kvs) + 1), kvs[i])
    elif op == "add":
        key = rng.choice(_EXTRA_KEYS).encode()
        kvs.insert(rng.randrange(len(kvs) + 1), struct.pack("<Q", len(key)) + key + _pack_value(rng))
    else:
        items = kvs if op == "key" else infos
        i = rng.randrange(len(items))
        name, other = (x[8:8 + int.from_bytes(x[:8], "little")] for x in (items[i], rng.choice(items)))
        items[i] = struct.pack("<Q", len(new := _new_name(rng, name, other))) + new + items[i][8 + len(name):]
    head = raw[:8] + struct.pack("<QQ", len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % layout.alignment) + raw[layout.data_start:]


def _new_number(rng: random.Random, f: Field, cur: int) -> bytes:
    """An extreme, off-by-one or random value for a numeric field, as its bytes."""
    if f.kind == "f":
        fmt = "<f" if f.size == 4 else "<d"
        old = struct.unpack(fmt, cur.to_bytes(f.size, "little"))[0]
        return struct.pack(fmt, rng.choice(FLOATS + [old * 2, old / 2, -old]))
    if f.kind == "bool" or f.size < 4:
        return bytes([rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256)])] * f.size)
    near = [cur + 1, cur - 1, cur + 8, cur - 8, cur * 2, cur // 2]
    if f.kind == "type":
        choices = [rng.randrange(41)] * 6 + near + U32_EXTREMES
    else:
        choices = near * 2 + (U64_EXTREMES if f.size == 8 else U32_EXTREMES) + [rng.getrandbits(8 * f.size)]
    return (rng.choice(choices) % 2 ** (8 * f.size)).to_bytes(f.size, "little")


def mutate_gguf(rng: random.Random, raw: bytes, layout: Layout) -> bytes:
    """1 to 6 mutations of a valid GGUF file: a field set to an extreme/off-by-one value or
    a new type id, a byte of a string broken, a random byte (mostly before the tensor data),
    truncation, bytes cut out or inserted; rarely, random bytes in the tensor data. A
    quarter of the cases first rewrite a key/value (mutate_gguf_metadata), and half of
    those stop there: a well-formed file that lies."""
    fields, data_start = layout.fields, layout.data_start
    if rng.random() < 0.25:
        raw = mutate_gguf_metadata(rng, raw, layout)
        if rng.random() < 0.5:
            return raw
    b = bytearray(raw)
    by_region: dict[str, list[Field]] = {}
    for f in fields:
        by_region.setdefault(f.region, []).append(f)
    regions, weights = zip(*[(r, w) for r, w in (("header", 1), ("kv", 4), ("array", 2), ("tensor_info", 4))
                             if r in by_region])
    for _ in range(rng.choices([1, 2, 3, 4, 6], [60, 20, 10, 6, 4])[0]):
        f = rng.choice(by_region[rng.choices(regions, weights)[0]])
        op = rng.choices(["field", "byte", "truncate", "splice", "insert", "data"], [10, 3, 1.5, 1.5, 1, 1])[0]
        hot = rng.randrange(min(data_start, len(b))) if rng.random() < 0.8 else rng.randrange(len(b))
        if op == "field" and f.offset + f.size <= len(b):
            if f.kind == "str":
                if f.size:
                    b[f.offset + rng.randrange(f.size)] = rng.choice([0, 0xFF, 0xC3, 0x80, 0x20, 0x7B, 0x25, 0x0A,
                                                                      rng.randrange(256)])
            else:
                b[f.offset:f.offset + f.size] = _new_number(rng, f, int.from_bytes(b[f.offset:f.offset + f.size],
                                                                                    "little"))
        elif op == "byte":
            b[hot] = rng.randrange(256)
        elif op == "truncate":
            del b[rng.choice([f.offset + rng.randrange(f.size + 1), hot, data_start + rng.randrange(64)]):]
        elif op == "splice":
            at = rng.choice([f.offset, hot])
            del b[at:at + rng.randint(1, 64)]
        elif op == "insert":
            at = rng.choice([f.offset, hot])
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "data" and len(b) > data_start:
            at = rng.randrange(data_start, len(b))
            b[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x7c\x00\x7c", b"\x00\x00\xc0\x7f",
                                       bytes(rng.randrange(256) for _ in range(4))])
        if not b:
            break
    return bytes(b)


def cut_vocab(src: Path, dst: Path, n: int) -> None:
    """Rewrite the converted GGUF `src` with its vocabulary cut to the first `n` tokens:
    Qwen2's three control tokens moved to the last ids (and the *_token_id keys with them),
    merges kept only where both halves and their join are still tokens, token_embd's first
    n rows byte for byte (quantized rows are independent); all else copied as it is."""
    from gguf import GGUFValueType as V
    ids = {151643 + k: n - 3 + k for k in range(3)}
    with cpuq.open_gguf(src) as f:
        tokens = f.get("tokenizer.ggml.tokens")[:n]
        tokens[-3:] = CONTROL_TOKENS
        types = f.get("tokenizer.ggml.token_type")[:n]
        types[-3:] = [3, 3, 3]  # CONTROL
        have = set(tokens)
        merges = [m for m in f.get("tokenizer.ggml.merges")
                  if (p := m.split(" "))[0] in have and p[1] in have and p[0] + p[1] in have]
        values = {k: f.get(k) for k in f.keys() if k != "general.architecture"}
        values.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                       "tokenizer.ggml.merges": merges})
        for k in values:
            if k.endswith("_token_id"):
                values[k] = ids.get(values[k], min(values[k], n - 1))
        value_types = {k: f.value_type(k) for k in values}
        value_types.update({"tokenizer.ggml.tokens[]": V.STRING, "tokenizer.ggml.token_type[]": V.INT32,
                            "tokenizer.ggml.merges[]": V.STRING})
        w = cpuq.GGUFStreamWriter(dst, arch=f.get("general.architecture"))
        w.add_metadata(values, value_types)
        tensors = [(t.name, t.qtype, (n, t.shape[1]) if t.name in ("token_embd.weight", "output.weight") else t.shape,
                    t.data) for t in f]
        for name, qtype, shape, _ in tensors:
            w.add_tensor_info(name, shape, qtype)
        w.begin()
        for name, _, shape, data in tensors:
            w.write_tensor(name, data[:shape[0]] if len(shape) == 2 else data)
        w.close()


def _sample_rows(t) -> list[np.ndarray]:
    """Big tensors: the first and last 64 rows (a read past the end shows at the end)."""
    return [t.data] if t.rows <= 1024 else [t.data[:64], t.data[-64:]]


def run_gguf(path: Path) -> str:
    """Open `path`, dequantize every tensor, summarize; then load it, take logits, generate
    and chat. Returns "ran", or "open-error"/"load-error" for a CpuqError at that stage."""
    stage = "open-error"
    try:
        with cpuq.open_gguf(path) as f:
            for t in f:
                for rows in _sample_rows(t):
                    out = cpuq.dequantize(rows, t.qtype, (rows.shape[0], t.cols))
                    assert out.shape == (rows.shape[0], t.cols)
        cpuq.summarize(path, tensors=True)
        stage = "load-error"
        with cpuq.load(path, n_ctx=128, n_threads=1) as m:  # tiny matrices: threads only cost
            ids = m.tokenize("Hello fuzz, 1234 ünïcode!")[:12] or [0]
            logits = m.logits(ids)
            assert logits.shape == (len(ids), m.config.n_vocab)
            m.detokenize(ids)
            "".join(m.generate(ids[:4], max_tokens=4, seed=0))
            "".join(m.chat([{"role": "user", "content": "hi"}], max_tokens=2, seed=0))
        return "ran"
    except CpuqError as e:
        check_message(e, str(path) if stage == "open-error" else None)
        return stage


class GGUFTarget:
    """Mutated GGUF models: see run_gguf."""
    name = "gguf"
    suffix = ".gguf"
    outcomes = ("ran", "load-error", "open-error")

    def __init__(self, work: Path, small_share: float = SMALL_SHARE):
        folder = work / "gguf"
        if not all((folder / f"{name}-v1024.gguf").exists() for name in ("q4_k_m", "moe-q4_k_m", "hyb-q4_k_m")):
            build_gguf_seeds(folder)
        self.seeds = []
        for p in sorted(folder.glob("*.gguf")):
            raw = p.read_bytes()
            self.seeds.append((p.stem, raw, gguf_layout(raw)))
        small = sum("-v" in s[0] for s in self.seeds)
        self.weights = [small_share / small if "-v" in s[0] else (1 - small_share) / (len(self.seeds) - small)
                        for s in self.seeds]

    def make(self, rng: random.Random) -> tuple[int, bytes]:
        k = rng.choices(range(len(self.seeds)), self.weights)[0]
        return k, mutate_gguf(rng, *self.seeds[k][1:])

    def run(self, k: int, data: bytes, scratch: Path) -> str:
        path = scratch / "case.gguf"
        path.unlink(missing_ok=True)  # a new inode: a mapping of the last case never sees this one
        path.write_bytes(data)
        return run_gguf(path)

    def warm_up(self, scratch: Path) -> None:
        for k, (name, raw, _) in enumerate(self.seeds):
            outcome = self.run(k, raw, scratch)
            if outcome != "ran":
                raise RuntimeError(f"seed {name} does not run ({outcome})")


def build_gguf_seeds(folder: Path) -> None:
    from make_tiny_checkpoint import make_tiny_checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / "ckpt", ignore_errors=True)  # left by a run killed before the end
    ckpt = make_tiny_checkpoint(folder / "ckpt", arch="qwen2", num_hidden_layers=1, hidden_size=256,
                                intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    shutil.rmtree(folder / "moe-ckpt", ignore_errors=True)
    # an MoE too: its expert keys, stacks and routers (Q4_K stacks: rows of 256)
    moe = make_tiny_checkpoint(folder / "moe-ckpt", arch="qwen3moe", num_hidden_layers=1, hidden_size=256,
                               moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2)
    shutil.rmtree(folder / "hyb-ckpt", ignore_errors=True)
    # a hybrid: a Gated DeltaNet block (its ssm keys and tensors) then a gated attention block
    hyb = make_tiny_checkpoint(folder / "hyb-ckpt", arch="qwen35", num_hidden_layers=2, full_attention_interval=2,
                               hidden_size=256, intermediate_size=512, linear_num_key_heads=2,
                               linear_num_value_heads=4)
    for src, name, qtype in ((ckpt, "q8_0", "q8_0"), (ckpt, "q4_k_m", "q4_k_m"), (moe, "moe-q4_k_m", "q4_k_m"),
                             (hyb, "hyb-q4_k_m", "q4_k_m")):
        full = cpuq.convert(src, folder / f"{name}.gguf", qtype, force=True)
        cut_vocab(full, folder / f".{name}-v{SMALL_VOCAB}.tmp", SMALL_VOCAB)
        os.replace(folder / f".{name}-v{SMALL_VOCAB}.tmp", folder / f"{name}-v{SMALL_VOCAB}.gguf")
    shutil.rmtree(ckpt)
    shutil.rmtree(moe)
    shutil.rmtree(hyb)


# the converter's inputs ---------------------------------------------------------------------

def _junk(rng: random.Random, cur: object = None) -> object:
    """A JSON value that a config key or header field should not hold, or holds only just."""
    is_int = isinstance(cur, int) and not isinstance(cur, bool)
    near = [cur + 1, cur - 1, cur * 2, cur // 2, -cur, float(cur)] if is_int else []
    deep: object = 0
    for _ in range(rng.choice([3, 50, 5000])):
        deep = [deep]
    return rng.choice(near * 3 + [
        None, True, False, 0, 1, -1, 2, 3, 7, 2**31, 2**32, 2**63, 2**64, 10**30, -2**63, 0.5, 1e-12, 1e308,
        math.nan, math.inf, -math.inf, 64.0, "", "64", "x" * rng.choice([10, 100_000]), [], [1], [1, 2, 3], {},
        {"a": 1}, deep])


def _dumps(obj: object) -> bytes:
    """JSON as Python writes it (NaN and Infinity literals included, which json.loads reads);
    a value nested too deeply for the encoder becomes a literal string of brackets."""
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        return b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _raw_json_junk(rng: random.Random, text: bytes) -> bytes:
    """Text-level damage to a JSON document."""
    op = rng.choice(["cut", "byte", "utf8", "bom", "empty", "top", "trailing", "deep", "nul"])
    at = rng.randrange(len(text) + 1)
    if op == "cut":
        return text[:at]
    if op == "byte":
        return text[:at] + bytes([rng.randrange(256)]) + text[at + 1:]
    if op == "utf8":
        return text[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]) + text[at:]
    if op == "bom":
        return b"\xef\xbb\xbf" + text
    if op == "empty":
        return rng.choice([b"", b" ", b"null", b"{}"])
    if op == "top":
        return rng.choice([b"[]", b"1", b'"x"', b"[" + text + b"]", b"NaN"])
    if op == "trailing":
        return text + rng.choice([b",", b"}", b" x", b"\x00"])
    if op == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    return text.replace(b" ", b"\x00", 1)


HF_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
           "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
           "tie_word_embeddings", "rope_scaling", "rope_parameters", "text_config", "bos_token_id", "eos_token_id",
           "unk_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "_name_or_path", "torch_dtype",
           "model_type", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
           "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
           "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
           "linear_conv_kernel_dim", "layer_types", "full_attention_interval", "partial_rotary_factor",
           "mtp_num_hidden_layers"]
ROPE_TYPES = ["linear", "yarn", "llama3", "longrope", "su", "dynamic", "default", "bogus", 3, None]
ROPE_KEYS = ["factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
             "beta_slow", "extrapolation_factor", "attention_factor", "attn_factor", "rope_theta", "mrope_section",
             "partial_rotary_factor"]


def mutate_config(rng: random.Random, raw: bytes) -> bytes:
    """1 to 3 edits of a config.json: keys deleted or given junk values, rope scaling
    objects with junk inside, another architecture; or the text itself broken."""
    if rng.random() < 0.15:
        return _raw_json_junk(rng, raw)
    cfg = json.loads(raw)
    for _ in range(rng.choices([1, 2, 3], [70, 20, 10])[0]):
        key = rng.choice(list(cfg) + HF_KEYS * 3)  # mostly keys the converter reads
        op = rng.choices(["junk", "delete", "rope", "arch", "text_config"], [10, 3, 3, 1, 1])[0]
        if op == "delete":
            cfg.pop(key, None)
        elif op == "rope":
            rope = {rng.choice(["rope_type", "type"]): rng.choice(ROPE_TYPES)}
            for k in rng.sample(ROPE_KEYS, rng.randint(0, 4)):
                rope[k] = rng.choice([_junk(rng), 1.0, 2.0, 4.0, 8192, 32768, 32.0])
            cfg[rng.choice(["rope_scaling", "rope_parameters"])] = rope if rng.random() < 0.9 else _junk(rng)
        elif op == "arch":
            cfg["architectures"] = rng.choice([["Qwen3ForCausalLM"], ["LlamaForCausalLM"], ["Qwen2ForCausalLM"],
                                               ["Qwen2MoeForCausalLM"], ["Qwen3MoeForCausalLM"],
                                               ["MistralForCausalLM"], [], [""], [None], "Qwen2ForCausalLM", None])
        elif op == "text_config":
            cfg["text_config"] = {k: _junk(rng, cfg.get(k)) for k in rng.sample(HF_KEYS, 2)}
        else:
            cfg[key] = _junk(rng, cfg.get(key))
    return _dumps(cfg)


_BAD_DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "F8_E4M3", "bf16", "", "F32 ", 7, None, ["F32"]]


def _serialize_safetensors(header: dict, data: bytes, rng: random.Random) -> bytes:
    text = _dumps(header)
    if rng.random() < 0.9:  # padded to 8 bytes as the safetensors library writes, mostly
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def mutate_safetensors(rng: random.Random, raw: bytes) -> bytes:
    """1 to 3 edits of a safetensors file: an entry's dtype, shape, data_offsets or keys,
    entries deleted, renamed or duplicated, __metadata__ replaced; or the length prefix,
    the header text, the data (NaN/inf weights) or the file length damaged."""
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    raw_ops = []
    for _ in range(rng.choices([1, 2, 3], [70, 20, 10])[0]):
        name = rng.choice(names)
        entry = header.get(name)
        op = rng.choices(["dtype", "shape", "offsets", "entry", "delete", "rename", "duplicate", "metadata",
                          "prefix", "text", "data", "truncate", "append"],
                         [3, 4, 4, 2, 1, 1, 1, 1, 2, 2, 1, 2, 1])[0]
        if op in ("prefix", "text", "data", "truncate", "append", "duplicate"):
            raw_ops.append((op, name))
        elif not isinstance(entry, dict):
            continue
        elif op == "dtype":
            entry["dtype"] = rng.choice(_BAD_DTYPES)
        elif op == "shape":  # (an earlier edit of this case may have broken the entry already)
            shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
            if shape and rng.random() < 0.7:
                i = rng.randrange(len(shape))
                shape[i] = _junk(rng, shape[i])
            else:
                shape = rng.choice([shape + [1], shape[:-1], shape[::-1], [], "x", None, [shape], [2**62] * 100_000,
                                    [1] * 100_000 + shape])
            entry["shape"] = shape
        elif op == "offsets":
            offsets = entry.get("data_offsets")
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) in (int, float) for o in offsets)
            begin, end = offsets if ok else (0, 0)
            other = header[rng.choice(names)]
            entry["data_offsets"] = rng.choice([
                [_junk(rng, begin), end], [begin, _junk(rng, end)], [end, begin], [begin + 2, end + 2],
                [begin - 2, end - 2], [begin], [begin, end, end], [float(begin), end], [str(begin), end],
                other.get("data_offsets") if isinstance(other, dict) else [0, 0], [0, len(data) + 1]])
        elif op == "entry":
            key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
            if key in entry and rng.random() < 0.5:
                del entry[key]
            else:
                header[name] = rng.choice([[], "x", None, 1, {**entry, "extra": _junk(rng)}])
        elif op == "delete":
            del header[name]
            names.remove(name)
            if not names:
                break
        elif op == "rename":
            header[rng.choice(["model.layers.7.mlp.up_proj.weight", "lm_head.weight", "x" * 300, "",
                               "model.layers.0.mlp.up_proj.bias", "\u00e9\u0000"])] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
        elif op == "metadata":
            header["__metadata__"] = rng.choice([_junk(rng), {"format": _junk(rng)}])
    out = _serialize_safetensors(header, data, rng)
    for op, name in raw_ops:
        n = int.from_bytes(out[:8], "little")
        if op == "duplicate":  # the same tensor name twice in the JSON text
            text = out[8:8 + n]
            if text.startswith(b"{"):
                text = b"{" + _dumps({name: header.get(name)})[1:-1] + b"," + text[1:]
                out = len(text).to_bytes(8, "little") + text + out[8 + n:]
        elif op == "prefix":
            value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, n - 8, len(out), len(out) - 8, len(out) - 7,
                                100_000_001] + U64_EXTREMES)
            out = (value % 2**64).to_bytes(8, "little") + out[8:]
        elif op == "text":
            out = _raw_json_junk(rng, out[8:8 + n])
            out = len(out).to_bytes(8, "little") + out + data
        elif op == "data" and len(out) > 9 + n:
            at = rng.randrange(8 + n, len(out) - 1)
            out = out[:at] + rng.choice([b"\x80\x7f", b"\xc0\x7f", b"\xff\xff", b"\x80\xff"]) + out[at + 2:]
        elif op == "truncate":
            out = out[:rng.choice([rng.randrange(len(out) + 1), 8 + n + rng.randrange(max(len(out) - 8 - n, 1)),
                                   rng.randrange(9)])]
        elif op == "append":
            out += bytes(rng.randint(1, 64))
    return out


class ConverterTarget:
    """Mutated inputs of cpuq.convert (one file of a checkpoint): the conversion to q8_0
    must succeed (and the output open) or raise a CpuqError naming the checkpoint and leave
    the output folder empty."""
    outcomes = ("converted", "rejected")
    file: str  # the checkpoint file this target mutates

    def __init__(self, work: Path):
        folder = work / "ckpt"
        if not all((folder / arch / "config.json").exists() for arch in ("llama", "qwen2moe", "qwen35")):
            build_converter_seeds(folder)
        self.seeds = [(d.name, d, (d / self.file).read_bytes()) for d in sorted(folder.iterdir())
                      if not d.name.startswith(".")]

    def make(self, rng: random.Random) -> tuple[int, bytes]:
        k = rng.randrange(len(self.seeds))
        return k, self.mutate(rng, self.seeds[k][2])

    def run(self, k: int, data: bytes, scratch: Path) -> str:
        try:
            self.convert(k, data, scratch)
        except CpuqError:
            return "rejected"
        return "converted"

    def convert(self, k: int, data: bytes, scratch: Path) -> None:
        """Convert seed k with its file replaced by `data`; a CpuqError passes through once
        its message and the empty output folder are checked."""
        name, pristine, _ = self.seeds[k]
        src, out = scratch / self.name / name, scratch / "out"  # the other files: links to the seed's
        if not src.is_dir():
            src.mkdir(parents=True)
            for p in pristine.iterdir():
                (src / p.name).symlink_to(p)
        out.mkdir(exist_ok=True)
        (src / self.file).unlink(missing_ok=True)
        (src / self.file).write_bytes(data)
        dst = out / "out.gguf"
        try:
            cpuq.convert(src, dst, "q8_0")
        except CpuqError as e:
            left = sorted(p.name for p in out.iterdir())
            if left:
                for p in out.iterdir():
                    p.unlink()
                raise AssertionError(f"the failed conversion left {left} behind ({type(e).__name__}: "
                                     f"{str(e)[:MAX_MESSAGE]})") from None
            check_message(e, str(src))
            raise
        with cpuq.open_gguf(dst):
            pass
        dst.unlink()

    def warm_up(self, scratch: Path) -> None:
        for k, (name, _, raw) in enumerate(self.seeds):
            if self.run(k, raw, scratch) != "converted":
                raise RuntimeError(f"seed {name} does not convert")


class SafetensorsTarget(ConverterTarget):
    name = "safetensors"
    file = "model.safetensors"
    suffix = ".safetensors"
    mutate = staticmethod(mutate_safetensors)


class ConfigTarget(ConverterTarget):
    name = "config"
    file = "config.json"
    suffix = ".json"
    mutate = staticmethod(mutate_config)


def build_converter_seeds(folder: Path) -> None:
    from make_tiny_checkpoint import make_tiny_checkpoint
    for arch, sizes in (("qwen2", {}), ("llama", {}), ("qwen2moe", {"num_experts": 4}),
                        ("qwen35", {"num_hidden_layers": 2, "full_attention_interval": 2})):
        if (folder / arch / "config.json").exists():
            continue
        tmp = folder / f".{arch}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_checkpoint(tmp, arch=arch, **{"num_hidden_layers": 1, "intermediate_size": 128, **sizes})
        os.replace(tmp, folder / arch)


def memoised(real):
    """cpuq.convert.hf_vocab.read_tokenizer_files memoised on its arguments: the tokenizer files
    are never mutated here, and re-reading the real vocabulary is 0.75 s a case. Install it
    as hf_vocab.read_tokenizer_files."""
    @functools.lru_cache(maxsize=8)  # a 150k-token vocabulary each: ~60 MB
    def cached(src: str, n_vocab: int):
        return real(Path(src), n_vocab)

    @functools.wraps(real)
    def read_tokenizer_files(src_dir, n_vocab):
        return cached(str(src_dir), n_vocab)
    return read_tokenizer_files


def _prepare(target) -> None:
    """In a worker (or --replay): the converter targets' tokenizer memo."""
    if isinstance(target, ConverterTarget):
        from cpuq.convert import hf_vocab
        hf_vocab.read_tokenizer_files = memoised(hf_vocab.read_tokenizer_files)


TARGETS = {"gguf": GGUFTarget, "safetensors": SafetensorsTarget, "config": ConfigTarget}


def case_rng(target: str, seed: int, i: int) -> random.Random:
    return random.Random(f"{target}:{seed}:{i}")


# the worker -----------------------------------------------------------------------------------

def _scratch_root() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="cpuq-fuzz-", dir=base))


def worker(args) -> None:
    """Run the cases the driver sends (lines of case numbers), reporting on the
    protocol pipe: "ready", "start i", "pass i outcome", "fail i kind detail-json"."""
    limit = args.mem_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the worker log, not the protocol
    target = TARGETS[args.target](args.work)
    _prepare(target)
    scratch = args.scratch  # the driver removes it
    target.warm_up(scratch)
    proto.write("ready\n")
    for line in sys.stdin:
        for i in map(int, line.split()):
            proto.write(f"start {i}\n")
            try:
                k, data = target.make(case_rng(args.target, args.seed, i))
                outcome = "skipped" if args.grep and args.grep.encode() not in data else target.run(k, data, scratch)
            except MemoryError:
                proto.write(f"fail {i} memory {json.dumps('MemoryError')}\n")
            except Exception as e:
                kind = "message" if isinstance(e, BadMessage) else "exception"
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()[:2000]
                where = traceback.extract_tb(e.__traceback__)[-1]
                proto.write(f"fail {i} {kind} {json.dumps(f'{detail} (at {where.filename}:{where.lineno})')}\n")
            else:
                proto.write(f"pass {i} {outcome}\n")


# the driver -----------------------------------------------------------------------------------

class Worker:
    def __init__(self, args, n: int, log: Path):
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.scratch = _scratch_root()  # the driver's to remove: a killed worker cannot
        cmd = [sys.executable, __file__, "--worker", "--target", args.target, "--work", str(args.work),
               "--seed", str(args.seed), "--mem-mb", str(args.mem_mb), "--scratch", str(self.scratch)]
        if args.grep:
            cmd += ["--grep", args.grep]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     start_new_session=True)
        self.n = n
        self.buf = b""
        self.ready = False
        self.batch: list[int] = []  # cases sent and not yet reported
        self.current: int | None = None
        self.started = time.monotonic()

    def send(self, cases: list[int]) -> None:
        self.batch = cases
        self.proc.stdin.write((" ".join(map(str, cases)) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def drive(args) -> int:
    t0 = time.monotonic()
    target = TARGETS[args.target](args.work)  # builds the seeds once, before any worker starts
    args.failures.mkdir(parents=True, exist_ok=True)
    pending = list(range(args.cases))[::-1]  # popped from the end
    passes, failures = Counter(), Counter()
    slowest = (0.0, -1)
    sel = selectors.DefaultSelector()
    workers: dict[int, Worker] = {}

    def start(n: int) -> None:
        w = Worker(args, n, args.failures / f"worker-{n}.log")
        workers[n] = w
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)

    def fail(i: int, kind: str, detail: str) -> None:
        failures[kind] += 1
        stem = args.failures / f"{args.target}-c{i}-{kind}"
        try:
            k, data = target.make(case_rng(args.target, args.seed, i))
        except Exception as e:  # a bug of the mutator itself: the case has no input to save
            k, detail = 0, f"{detail}; the mutator failed: {type(e).__name__}: {e}"
        else:
            stem.with_suffix(".bin").write_bytes(data)
        stem.with_suffix(".json").write_text(json.dumps({"target": args.target, "seed": args.seed, "case": i,
                                                         "seed_file": target.seeds[k][0], "kind": kind,
                                                         "detail": detail}, indent=1))
        print(f"FAIL case {i} ({target.seeds[k][0]}): {kind}: {detail[:300]}", file=sys.stderr, flush=True)

    def restart(w: Worker, why: str) -> None:
        """Kill `w` (if alive), fail its in-flight case as `why`, requeue the rest of its batch."""
        sel.unregister(w.proc.stdout)
        w.kill()
        if not w.ready:
            raise SystemExit(f"worker {w.n} failed while warming up ({why}); see {w.log.name}")
        if w.current is not None:
            fail(w.current, why, f"no result after {args.timeout:g} s, killed" if why == "hang"
                 else f"worker died: exit status {w.proc.returncode} (negative: the signal)")
        pending.extend(c for c in w.batch[::-1] if c != w.current)
        start(w.n)

    try:
        for n in range(args.workers):
            start(n)
        last_report = time.monotonic()
        while pending or any(w.batch for w in workers.values()):
            for w in list(workers.values()):
                if w.ready and not w.batch and pending:
                    w.send([pending.pop() for _ in range(min(args.batch, len(pending)))])
            for key, _ in sel.select(timeout=0.2):
                w = key.data
                chunk = os.read(w.proc.stdout.fileno(), 65536)
                if not chunk:  # the worker died (a crash, or MemoryError outside a case)
                    restart(w, "crash")
                    continue
                w.buf += chunk
                *lines, w.buf = w.buf.split(b"\n")
                for line in lines:
                    word, *rest = line.decode().split(" ", 3)
                    if word == "ready":
                        w.ready = True
                    elif word == "start":
                        w.current, w.started = int(rest[0]), time.monotonic()
                    else:
                        i = int(rest[0])
                        took = time.monotonic() - w.started
                        slowest = max(slowest, (took, i))
                        if word == "pass":
                            passes[rest[1]] += 1
                        else:
                            fail(i, rest[1], json.loads(rest[2]))
                        w.current = None
                        w.batch.remove(i)
            now = time.monotonic()
            for w in list(workers.values()):
                limit = args.timeout if w.ready else 600  # a fresh worker loads Numba's cache first
                if (w.current is not None or not w.ready) and now - w.started > limit:
                    restart(w, "hang")
            if now - last_report > 60:
                done = sum(passes.values()) + sum(failures.values())
                print(f"... {done}/{args.cases} cases, {done / (now - t0):.1f}/s, failures {dict(failures)}",
                      file=sys.stderr, flush=True)
                last_report = now
    finally:  # also on Ctrl-C or SIGTERM: no worker outlives the driver
        for w in workers.values():
            w.kill()
    wall = time.monotonic() - t0
    n_pass = sum(passes.values())
    shown = (*target.outcomes, *(["skipped"] if passes.get("skipped") else []))
    print(f"fuzz {args.target}: {args.cases} cases (seed {args.seed}, {args.workers} workers): "
          f"passed {n_pass} ({', '.join(f'{o} {passes[o]}' for o in shown)}), "
          f"failed {sum(failures.values())} ({', '.join(f'{k} {failures[k]}' for k in FAILURE_KINDS)}), "
          f"slowest case {slowest[0]:.2f} s (#{slowest[1]}), {wall:.0f} s wall")
    return 1 if failures else 0


FAILURE_KINDS = ("crash", "hang", "memory", "exception", "message")


def replay(args) -> int:
    """Run one saved input in this process and print its outcome (or the traceback)."""
    note = json.loads(args.replay.with_suffix(".json").read_text()) if args.replay.with_suffix(".json").exists() \
        else {}
    target = TARGETS[args.target](args.work)
    _prepare(target)
    k = next((n for n, s in enumerate(target.seeds) if s[0] == note.get("seed_file")), 0)
    scratch = _scratch_root()
    try:
        print(target.run(k, args.replay.read_bytes(), scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description="Fuzz cpuq's GGUF reader and runtime, or the converter's inputs.")
    ap.add_argument("--target", choices=sorted(TARGETS), required=True)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a case may take before it counts as a hang")
    ap.add_argument("--mem-mb", type=int, default=4096, help="address-space cap of each worker (RLIMIT_AS)")
    ap.add_argument("--batch", type=int, default=50, help="cases sent to a worker at a time")
    ap.add_argument("--work", type=Path, help="where the seed files are built (and reused); default a temporary folder")
    ap.add_argument("--failures", type=Path, default=Path(tempfile.gettempdir()) / "cpuq-fuzz-failures",
                    help="where failing inputs (and the workers' logs) go")
    ap.add_argument("--replay", type=Path, help="run one saved failing input in this process")
    ap.add_argument("--grep", help="run only the cases whose mutated input holds this text (the others pass as "
                                   "'skipped'): re-check the cases a fix can change")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)  # a worker's folder for its cases
    args = ap.parse_args(argv)
    for name in ("cases", "workers", "mem_mb", "batch"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    if args.timeout <= 0:
        raise ToolError(f"--timeout {args.timeout}: expected a positive number of seconds")
    if args.replay is not None:
        require_file(args.replay, "saved failing input")
    if args.worker:
        worker(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup below and drive's
    own_work = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="cpuq-fuzz-seeds-")) if own_work else args.work.resolve()
    try:
        return replay(args) if args.replay else drive(args)
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    run(main)
