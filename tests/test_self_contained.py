"""The repository stands alone: every fixture the tests and tools read lies inside it and is
tracked by git (so a fresh clone has it), nothing tracked points outside it (a sibling
folder of the checkout), and no test skips because a fixture of the repo is missing (a
missing fixture fails loudly instead)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from make_tiny_checkpoint import QWEN2_VOCAB

ROOT = Path(__file__).resolve().parent.parent
# Source folders whose files name fixtures (tests, the golden generators, benchmarks, examples).
SOURCES = ("tests/", "tools/", "benchmarks/", "examples/")
# A fixture named in source: the folder name golden or data quoted and joined with / to a quoted
# file name, or the path tests/golden/<name> written out.
FIXTURE_REFS = [re.compile(r"""["'](golden|data)["']\s*/\s*["']([^"'/]+)["']"""),
                re.compile(r"""tests/(golden|data)/([\w.\-]+\w)(?![\w{])""")]  # not a name built in an f-string
# The sibling folder the fixtures were once read from, and the ways to reach it from the
# checkout: by relative path, joined to its fixtures folder, or through a parent.
SIBLING = "shared"
_S = re.escape(SIBLING)
OUTSIDE = [re.compile(rf"\.\./{_S}\b"), re.compile(rf"""["']{_S}["']\s*/\s*["']fixtures["']"""),
           re.compile(rf"""\.parent\s*/\s*["']{_S}["']"""), re.compile(rf"/work/{_S}\b")]


def tracked() -> set[str]:
    """Paths git tracks in this checkout; skip when the tests run outside a git checkout
    (an unpacked sdist), where 'tracked' has no meaning."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare with what a clone holds")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    return {p for p in out.stdout.decode("utf-8").split("\0") if p}


def source_files(files: set[str]) -> list[str]:
    return sorted(p for p in files if p.endswith(".py") and p.startswith(SOURCES))


def fixture_refs(text: str) -> set[tuple[str, str]]:
    """The fixtures `text` names, as (folder, file name) with folder "golden" or "data"."""
    return {(folder, name) for pattern in FIXTURE_REFS for folder, name in pattern.findall(text)
            if "*" not in name and "{" not in name}


def candidates(source: str, folder: str, name: str) -> list[str]:
    """Where a fixture named in `source` may lie: tests/<folder>/ or beside the source
    (tests/runtime/data/ for tests/runtime/*.py)."""
    return [f"tests/{folder}/{name}", (Path(source).parent / folder / name).as_posix()]


def test_fixture_refs_reads_the_forms_the_sources_use():
    text = '''GOLDEN = Path(__file__).parent / "golden" / "quants.npz"
TEXT = ROOT / 'tests' / 'data' / 'tempest.txt'
IMATRIX_ARG = "tests/golden/imatrix.gguf"  # written by tools/make_imatrix_golden.py.
PER_ARCH = f"tests/golden/imatrix_{arch}.gguf"
see tests/golden/README.md.'''
    assert fixture_refs(text) == {("golden", "quants.npz"), ("data", "tempest.txt"),
                                  ("golden", "imatrix.gguf"), ("golden", "README.md")}


def test_every_fixture_the_sources_name_is_in_the_repo_and_tracked():
    files = tracked()
    named = {}  # fixture -> the places it may lie
    for path in source_files(files):
        if path == Path(__file__).relative_to(ROOT).as_posix():
            continue  # this file's samples name made-up fixtures
        for folder, name in fixture_refs((ROOT / path).read_text(encoding="utf-8")):
            named.setdefault(f"{path}: {folder}/{name}", candidates(path, folder, name))
    vocab = QWEN2_VOCAB.relative_to(ROOT).as_posix()  # ValueError if it lay outside the repo
    for suffix in ("", ".inp", ".out"):  # .inp/.out are read beside the vocabulary
        named[f"make_tiny_checkpoint.QWEN2_VOCAB{suffix}"] = [vocab + suffix]
    # The scan must find fixtures we know the tests read, or it checks nothing.
    every_place = {p for places in named.values() for p in places}
    assert {"tests/golden/quants.npz", "tests/golden/runtime_logits.npz", "tests/data/tempest.txt",
            "tests/runtime/data/qwen2.5-instruct.jinja"} <= every_place
    missing = sorted(ref for ref, places in named.items() if not any((ROOT / p).is_file() for p in places))
    untracked = sorted(ref for ref, places in named.items()
                       if any((ROOT / p).is_file() for p in places) and not any(p in files for p in places))
    assert not missing, f"fixtures named in the sources but absent: {missing}"
    assert not untracked, f"fixtures present here but not tracked by git (a clone lacks them): {untracked}"


def test_every_golden_file_is_tracked():
    """A golden file that exists only in one working tree passes there and fails in a clone."""
    files = tracked()
    golden = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "golden").iterdir() if p.is_file())
    assert "tests/golden/ggml-vocab-qwen2.gguf" in golden
    assert [p for p in golden if p not in files] == []


def outside_refs(text: str) -> list[str]:
    return [m.group(0) for pattern in OUTSIDE for m in pattern.finditer(text)]


def test_outside_refs_finds_a_sibling_folder():
    up, q = "..", '"'  # the samples are assembled, so this file names no such path itself
    assert outside_refs(f"ROOT.parent / {q}{SIBLING}{q} / {q}fixtures{q} / {q}v.gguf{q}") == [
        f"{q}{SIBLING}{q} / {q}fixtures{q}", f".parent / {q}{SIBLING}{q}"]
    assert outside_refs(f"- Layout and house style: `{up}/{SIBLING}/DESIGN.md`.") == [f"{up}/{SIBLING}"]
    assert outside_refs(f"tests/golden/ggml-vocab-qwen2.gguf, a {SIBLING} fixture") == []


def test_no_tracked_file_refers_outside_the_repo():
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # it spells the patterns out
    hits = []
    for path in sorted(tracked() - {this}):
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):  # binary fixtures; a deletion not yet committed
            continue
        hits += [f"{path}: {ref}" for ref in outside_refs(text)]
    assert hits == []


# A test that skips when a repo fixture is absent hides exactly what a fresh clone lacks.
_FIXTURE_NAME = re.compile(r"""QWEN2_VOCAB|GOLDEN\w*|["'](golden|data)["']|tests/(golden|data)/""")
_GUARD = re.compile(r"(not\s+)?([\w.]+)\.(exists|is_file)\(\)")


def fixture_skips(text: str) -> list[str]:
    """Lines of `text` that skip on a missing fixture: a skip whose line (or the line before,
    for `if not X.exists():` then `pytest.skip(...)`) tests the existence of a fixture path,
    or whose reason names one."""
    lines = text.splitlines()
    fixture_vars = {m.group(1) for m in re.finditer(r"^(\w+)\s*=.*$", text, re.M)
                    if _FIXTURE_NAME.search(m.group(0))} | {"QWEN2_VOCAB"}
    hits = []
    for i, line in enumerate(lines):
        if "skip" not in line:
            continue
        window = (lines[i - 1] if i else "") + "\n" + line
        guarded = any(m.group(2).split(".")[0] in fixture_vars for m in _GUARD.finditer(window))
        if guarded or ("skip" in line and _FIXTURE_NAME.search(line)):
            hits.append(line.strip())
    return hits


def test_fixture_skips_finds_the_old_patterns():
    old = '''from make_tiny_checkpoint import QWEN2_VOCAB
pytestmark = pytest.mark.skipif(not QWEN2_VOCAB.exists(), reason=f"{QWEN2_VOCAB} not present")
GOLDEN = ROOT / "tests" / "golden" / "x.npz"
def test_a():
    if not GOLDEN.exists():
        pytest.skip("no golden")
'''
    assert len(fixture_skips(old)) == 2
    fine = '''PEER = Path.home() / ".cache" / "cpuq-peer"
    if not PEER.exists():
        pytest.skip(f"{PEER} missing (tools/peer_env.sh)")
'''
    assert fixture_skips(fine) == []


def test_no_test_skips_for_a_missing_repo_fixture():
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples hold the pattern
    hits = []
    for path in source_files(tracked()):
        if path.startswith("tests/") and path != this:
            hits += [f"{path}: {line}" for line in fixture_skips((ROOT / path).read_text(encoding="utf-8"))]
    assert hits == []
