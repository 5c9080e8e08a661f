"""Interrupted and starved writes: `cpuq convert` (also with --force and --calibrate) killed
with SIGKILL at random points of its run, and `cpuq convert` / `cpuq imatrix -o` writing
into a tmpfs too small for the file. The real CLI runs as a subprocess (the `cpuq` script
beside sys.executable), because SIGKILL and ENOSPC are what the process itself sees.

What must hold: the destination is never there unless complete (byte-identical to an
uninterrupted run), an existing destination survives a killed --force, the checkpoint is
never written, temporary files do not pile up and the next run takes them over, and a full
disk is one `error:` line naming the file, exit code 2, nothing left behind.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import cpuq
from make_tiny_checkpoint import make_tiny_checkpoint


CPUQ = Path(sys.executable).with_name("cpuq")
QTYPE = "q4_k_m"
N_KILLS = 20     # the issue asks for at least 20 kill points per scenario
PAGE = 4096      # tmpfs sizes and usage count whole pages
TEMPEST = Path(__file__).resolve().parents[1] / "data" / "tempest.txt"

# The check before writing is bypassed in-process, as when another program fills the disk
# between the check and the write: then the write itself meets ENOSPC.
PLENTY_OF_SPACE = (
    "import shutil, sys\n"
    "real = shutil.disk_usage\n"
    "shutil.disk_usage = lambda p: real(p)._replace(free=1 << 50)\n"
    "from cpuq.cli import app\n"
    "sys.argv = ['cpuq', *sys.argv[1:]]\n"
    "app()\n")


@pytest.fixture(scope="module")
def source(module_tmp_factory) -> Path:
    # Hidden 256 (Q4_K rows), 4 layers, 78.7 MiB of bf16. On the quiet 2-core dev machine a run
    # takes ~2.4 s: ~1.1 s start-up (imports, Numba's cache, tokenizer), ~0.4 s writing the
    # 151936-token vocabulary, ~0.7 s of tensors, ~0.2 s after the rename (summary, exit).
    return make_tiny_checkpoint(module_tmp_factory.mktemp("src") / "qwen2", arch="qwen2", dtype="bf16",
                                hidden_size=256, intermediate_size=512, num_hidden_layers=4)


def _cpuq(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CPUQ), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted conversion of `source`."""
    data: bytes         # the file
    data_offset: int    # where its tensor data starts (after header, metadata, tensor infos)
    seconds: float      # how long the CLI took, warm


def _reference(src: Path, out: Path) -> Reference:
    # The first run also fills Numba's on-disk cache (cold in a fresh checkout), so the timed
    # second run measures the warm start that the killed runs make.
    first = _cpuq("convert", src, "-o", out / "first.gguf", "--type", QTYPE)
    assert first.returncode == 0, first.stderr
    start = time.perf_counter()
    second = _cpuq("convert", src, "-o", out / "second.gguf", "--type", QTYPE)
    seconds = time.perf_counter() - start
    assert second.returncode == 0, second.stderr
    data = (out / "first.gguf").read_bytes()
    assert (out / "second.gguf").read_bytes() == data  # deterministic: the byte comparisons below rely on it
    with cpuq.open_gguf(out / "first.gguf") as f:  # valid, so a file equal to it is valid too
        assert f.get("general.file_type") == 15 and len(f.tensors) == 50
        data_offset = f.data_offset
    return Reference(data, data_offset, seconds)


@pytest.fixture(scope="module")
def reference(source, module_tmp_factory) -> Reference:
    return _reference(source, module_tmp_factory.mktemp("ref"))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Cheap per-kill check of the checkpoint (the hashes are compared once, at the end)."""
    return {p.name: (s.st_size, s.st_mtime_ns, s.st_ino) for p in sorted(folder.iterdir()) for s in [p.stat()]}


def _kill_plan(seconds: float, seed: int, n_timed: int = 12, n_written: int = 8) -> list[tuple[str, float]]:
    """Kill points, each ("time", seconds after start) or ("written", fraction of the
    output's bytes in this run's temporary file). The timed ones take one time in each of
    n_timed equal slices of [0, 1.1 x the unkilled run]: start-up (Numba and all), writing,
    the rename and, for the last slice, after a normal exit. The written ones do the same
    over the bytes written, so the writing phase gets its kills even when the machine is
    slower than it was for the unkilled run (a shared 2-core CI machine)."""
    rng = np.random.default_rng(seed)
    timed = [("time", (i + rng.random()) * 1.1 * seconds / n_timed) for i in range(n_timed)]
    written = [("written", (i + rng.random()) / n_written) for i in range(n_written)]
    return timed + written


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        s = path.stat()
    except FileNotFoundError:
        return None
    return s.st_size, s.st_mtime_ns, s.st_ino


def _leftovers(folder: Path, dst: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p != dst)


def _run_killed(args, kind: str, value: float, folder: Path, dst: Path, n_bytes: int) -> int:
    """Start `cpuq args` and SIGKILL it (its whole process group) at the kill point unless it
    has exited first; its return code: -9 when the kill landed, else its own."""
    before = {p.name: _file_state(p) for p in _leftovers(folder, dst)}
    target = value * n_bytes

    def written_enough() -> bool:  # a temporary file that this run wrote `target` bytes into
        for p in _leftovers(folder, dst):
            state = _file_state(p)
            if state is not None and state != before.get(p.name) and state[0] >= target:
                return True
        return False

    p = subprocess.Popen([str(CPUQ), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        if kind == "time":
            return p.wait(timeout=value)
        deadline = time.monotonic() + 300
        while p.poll() is None and not written_enough() and time.monotonic() < deadline:
            time.sleep(0.003)
        if p.poll() is not None:
            return p.returncode
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return p.wait()


def _kill_loop(src: Path, dst: Path, reference: Reference, extra: tuple, seed: int,
               old: bytes | None) -> Counter:
    """Kill `cpuq convert src -o dst` at each point of _kill_plan; after each: dst is absent
    (or `old`), or byte-identical to the reference; at most one temporary file beside it; the
    checkpoint unchanged. Returns how many kills landed in each phase."""
    folder = dst.parent
    src_stats = _stats(src)
    phases: Counter = Counter()
    leftover_names = set()
    plan = _kill_plan(reference.seconds, seed)
    assert len(plan) >= N_KILLS
    for kind, value in plan:
        where = f"killed at {value:.2f} {'s' if kind == 'time' else 'of the bytes'}"
        if old is not None and (not dst.exists() or dst.read_bytes() != old):
            dst.write_bytes(old)
        before = {p.name: _file_state(p) for p in _leftovers(folder, dst)}
        rc = _run_killed(["convert", src, "-o", dst, "--type", QTYPE, *extra], kind, value, folder, dst,
                         len(reference.data))
        assert rc in (0, -signal.SIGKILL), f"{where}: exit code {rc}"
        data = dst.read_bytes() if dst.exists() else None
        if rc == 0:
            assert data == reference.data, f"{where}: exit 0 but the file is not the reference"
            phase = "exited 0 before the kill"
        elif data is not None and data != old:
            # The rename is the last step of the conversion and the process exits after it
            # (summary, interpreter shutdown): a kill in that window leaves the whole file.
            assert data == reference.data, f"{where}: {dst.name} is incomplete ({len(data)} bytes)"
            phase = "after the rename"
        else:
            assert data == old, f"{where}: {dst.name} changed"
            touched = [p for p in _leftovers(folder, dst) if before.get(p.name) != _file_state(p)]
            phase = "writing a temporary file" if touched else "before any file"
        phases[kind, phase] += 1
        left = _leftovers(folder, dst)
        leftover_names.update(p.name for p in left)
        # SIGKILL runs no cleanup, so a temporary file can stay; it must be one, always the
        # same name (the next run takes it over), never a growing heap.
        assert len(left) <= 1 and len(leftover_names) <= 1, f"{where}: left {sorted(leftover_names)}"
        assert _stats(src) == src_stats, f"{where}: the checkpoint changed"
        if data == reference.data and old is None:
            dst.unlink()  # the next kill needs a fresh destination
    print(f"\n{dst.name} {' '.join(extra)}: unkilled run {reference.seconds:.2f} s; kills by (trigger, phase): "
          f"{dict(sorted(phases.items()))}; temporary files seen: {sorted(leftover_names)}")
    return phases


def _assert_phases_covered(phases: Counter) -> None:
    # Start-up is ~45% of the unkilled run (the timeline at `source`), more on a loaded
    # machine: ~5 of the 12 timed slices at least; 2 leaves room for a faster machine.
    assert phases["time", "before any file"] >= 2, phases
    # A byte-triggered kill misses the temporary file only when the last bytes and the rename
    # fall between two polls 3 ms apart: possible for the last slice (fractions 7/8..1) alone.
    assert phases["written", "writing a temporary file"] >= 7, phases


def test_sigkill_never_leaves_a_partial_destination(source, reference, tmp_path):
    hashes = _hashes(source)
    dst = tmp_path / "out.gguf"
    _assert_phases_covered(_kill_loop(source, dst, reference, (), seed=8, old=None))
    assert _hashes(source) == hashes
    # The next run succeeds and takes over what the killed ones left.
    dst.unlink(missing_ok=True)
    r = _cpuq("convert", source, "-o", dst, "--type", QTYPE)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == reference.data
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]
    assert _hashes(source) == hashes


def test_sigkill_with_force_keeps_the_old_file(source, reference, tmp_path):
    hashes = _hashes(source)
    dst = tmp_path / "out.gguf"
    old = b"the file that --force replaces, and only with a complete one\n" * 1000
    _assert_phases_covered(_kill_loop(source, dst, reference, ("--force",), seed=9, old=old))
    assert _hashes(source) == hashes
    dst.write_bytes(old)
    r = _cpuq("convert", source, "-o", dst, "--type", QTYPE, "--force")
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == reference.data
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]


def test_sigkill_during_calibrate(module_tmp_factory, tmp_path):
    """--calibrate writes a temporary Q8_0 file, reads it, then writes the output: killed
    anywhere in that, only a complete output appears, and what is left is taken over by the
    next run. Hidden 64 (the default tiny checkpoint) keeps a run at ~4 s; 6 timed kills,
    not 20, because the temporary files are the same partial_file that the tests above kill
    40 times; what this adds is the Q8_0 file and the sequence of two conversions."""
    src = make_tiny_checkpoint(module_tmp_factory.mktemp("src64") / "qwen2", arch="qwen2", dtype="bf16")
    hashes = _hashes(src)
    extra = ("--calibrate", TEMPEST, "--calibrate-ctx", 64, "--calibrate-chunks", 1)
    ref_path = module_tmp_factory.mktemp("ref64") / "ref.gguf"
    start = time.perf_counter()
    r = _cpuq("convert", src, "-o", ref_path, "--type", QTYPE, *extra)
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    ref = ref_path.read_bytes()
    dst = tmp_path / "out.gguf"
    leftover_names = set()
    for kind, value in _kill_plan(seconds, seed=10, n_timed=6, n_written=0):
        rc = _run_killed(["convert", src, "-o", dst, "--type", QTYPE, *extra], kind, value, tmp_path, dst,
                         len(ref))
        assert rc in (0, -signal.SIGKILL)
        if dst.exists():
            assert dst.read_bytes() == ref, f"killed at {value:.2f} s: incomplete output"
            dst.unlink()
        else:
            assert rc != 0
        leftover_names.update(p.name for p in _leftovers(tmp_path, dst))
        # At most the Q8_0 file and the temporary file of each of the two conversions.
        assert len(leftover_names) <= 3, sorted(leftover_names)
    assert _hashes(src) == hashes
    print(f"\n--calibrate: unkilled run {seconds:.2f} s; temporary files seen: {sorted(leftover_names)}")
    r = _cpuq("convert", src, "-o", dst, "--type", QTYPE, *extra)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == ref  # also: the calibrated conversion is deterministic
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]


def test_second_writer_of_the_same_destination_stops(source, tmp_path):
    """The temporary file has a fixed name (so killed runs cannot pile them up); it is locked,
    so a second conversion to the same destination stops instead of writing over the first's."""
    from cpuq.gguf_io import partial_file
    dst = tmp_path / "out.gguf"
    with partial_file(dst) as tmp:
        tmp.write_bytes(b"the first writer's bytes")
        with pytest.raises(cpuq.InputError, match=f"{re.escape(str(dst))}: another process is writing it"):
            cpuq.convert(source, dst, QTYPE)
        assert tmp.read_bytes() == b"the first writer's bytes" and not dst.exists()
    assert list(tmp_path.iterdir()) == []  # the with block removes what was not moved into place


def test_imatrix_output_checked_before_the_work(tmp_path):
    """A bad -o is reported before the model runs: with a text too short for one window, the
    error is about the output folder, not the text."""
    from cpuq.demo import demo_model_path
    short = tmp_path / "short.txt"
    short.write_text("too short for a window of 64 tokens")
    missing = tmp_path / "missing"
    r = _cpuq("imatrix", demo_model_path(), "-f", short, "--ctx", 64, "-o", missing / "imatrix.gguf")
    _assert_one_line_error(r, str(missing), words=r"no such directory")


# disk full --------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_bytes) -> a fresh tmpfs of that size; skips where mounting is not allowed."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                               capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount command")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)  # busy: detach


def _assert_one_line_error(r: subprocess.CompletedProcess, *names: str, words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert re.search(words, lines[0], re.IGNORECASE), lines[0]


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def test_disk_exactly_big_enough(source, reference, tmpfs):
    """The check before writing counts the whole file (header and vocabulary included) and
    nothing more: a tmpfs of exactly the file's pages takes it."""
    where = tmpfs(_pages(len(reference.data)))
    r = _cpuq("convert", source, "-o", where / "x.gguf", "--type", QTYPE)
    assert r.returncode == 0, r.stderr
    assert (where / "x.gguf").read_bytes() == reference.data
    assert [p.name for p in where.iterdir()] == ["x.gguf"]


def test_disk_full_found_before_writing(source, reference, tmpfs):
    """One page short of the file: refused by the check, before the long work of writing."""
    where = tmpfs(_pages(len(reference.data)) - PAGE)
    dst = where / "x.gguf"
    r = _cpuq("convert", source, "-o", dst, "--type", QTYPE)
    _assert_one_line_error(r, str(where), dst.name, words=r"not enough disk space")
    assert list(where.iterdir()) == []


@pytest.mark.parametrize("part", ["metadata", "tensors"])
def test_disk_full_while_writing(part, source, reference, tmpfs):
    """The disk fills after the check (simulated: the check sees plenty of room): the write
    meets ENOSPC in the vocabulary (`metadata`) or halfway through the tensor data."""
    header = reference.data_offset
    size = header // 2 if part == "metadata" else (header + len(reference.data)) // 2
    where = tmpfs(_pages(size))
    dst = where / "x.gguf"
    r = subprocess.run([sys.executable, "-c", PLENTY_OF_SPACE, "convert", str(source), "-o", str(dst),
                        "--type", QTYPE], capture_output=True, text=True, timeout=300)
    _assert_one_line_error(r, str(dst), words=r"no space left on device")
    assert list(where.iterdir()) == []  # the temporary file went too: cleanup can run here


def test_imatrix_disk_full(tmpfs):
    """`cpuq imatrix -o` into a tmpfs half the size of its file (631 KiB for the demo model)."""
    from cpuq.demo import demo_model_path
    where = tmpfs(_pages(300_000))
    dst = where / "imatrix.gguf"
    r = _cpuq("imatrix", demo_model_path(), "-f", TEMPEST, "--chunks", 1, "--ctx", 64, "-o", dst)
    _assert_one_line_error(r, str(dst), words=r"no space left on device")
    assert list(where.iterdir()) == []
