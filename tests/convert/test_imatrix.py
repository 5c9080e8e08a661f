"""The importance matrix (cpuq.convert.imatrix, cpuq.convert.calibration, convert --imatrix,
cpuq imatrix) against llama.cpp's own llama-imatrix and llama-quantize --imatrix, through
the golden files of tools/make_imatrix_golden.py (tests/golden/imatrix.gguf: llama-imatrix's
file for a tiny Qwen2 checkpoint over tests/data/tempest.txt; imatrix.json: the sha256 of
llama-quantize --imatrix's outputs and the exact arguments). No llama.cpp needed here;
test_imatrix_peer.py re-runs the tools live and checks the golden is current.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import cpuq
from cpuq.convert.imatrix import Imatrix
from cpuq.convert.calibration import collect_imatrix, convert_calibrated
from make_imatrix_golden import sha256, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "imatrix.json").read_text())
GOLDEN_IMATRIX = ROOT / GOLDEN["imatrix"]
TEXT = ROOT / GOLDEN["text"]


# cpuq's imatrix against llama-imatrix's over the same windows (relative L2 per entry, max
# relative per channel). Bars:
# * layer 0's attn_q/k/v: their input (RMSNorm of the F16 embedding rows) meets no F16
#   product, so only the sums' precision differs (llama.cpp adds squares one token at a time
#   in float32, cpuq in float64): 512 positive terms summed in float32 err by at most
#   511 * 2^-24 = 3.0e-5 relative, plus a few ulps of the RMSNorm; bar 5e-5 for entries and
#   channels alike, measured 4.8e-7 per entry, 1.4e-6 per channel.
# * the rest: llama.cpp multiplies F16 weights by activations rounded to F16 (unit roundoff
#   2^-11 = 4.9e-4) and an importance is a square (twice the relative error), so the bar is
#   1e-3 per entry; measured 3.9e-4 here, 3.1e-4 on the real-weights checkpoint. A single
#   channel is not averaged over the others: bar 1e-2, measured 1.4e-3 here, 6.8e-3 on the
#   real-weights checkpoint.
UNROUNDED = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight")
BAR_UNROUNDED, BAR_ENTRY, BAR_CHANNEL = 5e-5, 1e-3, 1e-2


def cpuq_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpuq.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)})


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def differences(ours: Imatrix, theirs: Imatrix) -> dict[str, tuple[float, float]]:
    """Per entry: (relative L2, max relative per channel) of ours' importance to theirs'."""
    out = {}
    for name in theirs.sums:
        a = theirs.importance(name).astype(np.float64)
        b = ours.importance(name).astype(np.float64)
        out[name] = (float(np.linalg.norm(b - a) / np.linalg.norm(a)), float(np.max(np.abs(b - a) / a)))
    return out


def assert_agrees_with_golden(ours: Imatrix) -> dict[str, tuple[float, float]]:
    golden = Imatrix.read(GOLDEN_IMATRIX)
    assert sorted(ours.sums) == sorted(golden.sums)
    for name in golden.sums:  # the same tokens reach every matrix: counts are exact
        np.testing.assert_array_equal(ours.counts[name], golden.counts[name], err_msg=name)
    assert (ours.chunk_count, ours.chunk_size) == (golden.chunk_count, golden.chunk_size) == \
        (GOLDEN["chunks"], GOLDEN["ctx"])
    diffs = differences(ours, golden)
    for name, (rel, channel) in diffs.items():
        if name in UNROUNDED:
            assert rel <= BAR_UNROUNDED and channel <= BAR_UNROUNDED, (name, rel, channel)
        else:
            assert rel <= BAR_ENTRY and channel <= BAR_CHANNEL, (name, rel, channel)
    return diffs


# imatrix files written by gguf-py (not cpuq's writer), for the broken-file cases ----------

def golden_entries() -> dict[str, dict[str, np.ndarray]]:
    """{tensor name: float32 data} of the golden file, read by gguf-py."""
    return {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(GOLDEN_IMATRIX).tensors}


def write_imatrix_file(path: Path, tensors: dict[str, np.ndarray], metadata: bool = True) -> Path:
    w = gguf.GGUFWriter(path, arch="")
    w.kv_data[0].pop("general.architecture", None)
    w.add_string("general.type", "imatrix")
    if metadata:
        w.add_array("imatrix.datasets", [GOLDEN["text"]])
        w.add_uint32("imatrix.chunk_count", GOLDEN["chunks"])
        w.add_uint32("imatrix.chunk_size", GOLDEN["ctx"])
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(module_tmp_factory) -> Path:
    return tiny_checkpoint(module_tmp_factory.mktemp("imatrix-ckpt"))


@pytest.fixture(scope="module")
def f16(checkpoint, module_tmp_factory) -> Path:
    path = cpuq.convert(checkpoint, module_tmp_factory.mktemp("imatrix-f16") / "f16.gguf", "f16")
    # The checkpoint the golden was made from (its F16 file is what llama-imatrix and
    # llama-quantize read); if this fails, make_tiny_checkpoint changed: regenerate the golden.
    assert sha256(path) == GOLDEN["f16_sha256"], "tiny checkpoint differs from the golden's: " \
                                                 "run tools/make_imatrix_golden.py"
    return path


# the file format -------------------------------------------------------------------------

def test_golden_file_rewrites_byte_identical(tmp_path):
    im = Imatrix.read(GOLDEN_IMATRIX)
    out = im.write(tmp_path / "again.gguf")
    assert out.read_bytes() == GOLDEN_IMATRIX.read_bytes()


def test_golden_file_read_as_gguf_py_reads_it():
    im = Imatrix.read(GOLDEN_IMATRIX)
    reader = gguf.GGUFReader(GOLDEN_IMATRIX)
    assert im.datasets == [GOLDEN["text"]]
    assert (im.chunk_count, im.chunk_size) == (GOLDEN["chunks"], GOLDEN["ctx"])
    tensors = golden_entries()
    assert len(reader.tensors) == 2 * len(im.sums) == 28  # 7 matrices x 2 layers, sums + counts each
    for name in im.sums:
        np.testing.assert_array_equal(im.sums[name].reshape(-1), tensors[name + ".in_sum2"], err_msg=name)
        np.testing.assert_array_equal(im.counts[name], tensors[name + ".counts"], err_msg=name)
        assert im.counts[name][0] == GOLDEN["ctx"] * GOLDEN["chunks"]
        np.testing.assert_array_equal(im.importance(name), tensors[name + ".in_sum2"] / tensors[name + ".counts"])


def test_add_sums_squares_and_counts_tokens():
    rng = np.random.default_rng(7)
    im = Imatrix(chunk_size=4)
    # Small integers: every square and sum is exact in float32 and float64, so equality is exact.
    a = rng.integers(-50, 50, size=(5, 8)).astype(np.float32)
    b = rng.integers(-50, 50, size=(3, 8)).astype(np.float32)
    c = rng.integers(-50, 50, size=(4, 16)).astype(np.float32)
    im.add(a, ("blk.0.attn_q.weight", "blk.0.attn_k.weight"))
    im.add(b, ("blk.0.attn_q.weight", "blk.0.attn_k.weight"))
    im.add(c, ("blk.0.ffn_down.weight",))
    want = (np.concatenate([a, b]).astype(np.float64) ** 2).sum(axis=0)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        np.testing.assert_array_equal(im.sums[name], want[None])
        np.testing.assert_array_equal(im.counts[name], [8])
        np.testing.assert_array_equal(im.importance(name), (want / 8).astype(np.float32))
    np.testing.assert_array_equal(im.sums["blk.0.ffn_down.weight"], (c.astype(np.float64) ** 2).sum(axis=0)[None])
    np.testing.assert_array_equal(im.counts["blk.0.ffn_down.weight"], [4])
    assert im.importance("blk.0.ffn_up.weight") is None  # no entry

    # Gaussian inputs: the sums are float64 (llama.cpp's float32 would be ~1e-6 off);
    # the remaining difference is summation order only (bar 1e-12, measured ~1e-16).
    x = rng.standard_normal((1000, 32)).astype(np.float32) * np.float32(1e3)
    big = Imatrix(chunk_size=1000)
    big.add(x, ("m",))
    assert big.sums["m"].dtype == np.float64
    np.testing.assert_allclose(big.sums["m"][0], (x.astype(np.float64) ** 2).sum(axis=0), rtol=1e-12)


def test_importance_of_a_matrix_never_seen_is_ones():
    """llama-quantize's rule (tools/quantize's load_imatrix): sums / count per matrix (expert), ones
    where the count is 0."""
    im = Imatrix(chunk_size=4)
    im.sums["e"] = np.array([[4.0, 8.0, 12.0], [5.0, 6.0, 7.0]])
    im.counts["e"] = np.array([4.0, 0.0])
    np.testing.assert_array_equal(im.importance("e"), np.array([1, 2, 3, 1, 1, 1], np.float32))
    im.sums["z"], im.counts["z"] = np.zeros((1, 4)), np.zeros(1)
    np.testing.assert_array_equal(im.importance("z"), np.ones(4, np.float32))


def test_write_refuses_to_overwrite(tmp_path):
    im = Imatrix.read(GOLDEN_IMATRIX)
    dst = tmp_path / "im.gguf"
    dst.write_bytes(b"keep")
    with pytest.raises(cpuq.InputError, match="already exists") as e:
        im.write(dst)
    assert str(dst) in str(e.value) and dst.read_bytes() == b"keep"
    im.write(dst, force=True)
    assert dst.read_bytes() == GOLDEN_IMATRIX.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]


def test_write_without_a_dataset_name_is_a_clear_error(tmp_path):
    im = Imatrix(chunk_size=64)
    im.add(np.ones((16, 32), np.float32), ("blk.0.attn_q.weight",))
    with pytest.raises(cpuq.InputError, match="names no dataset"):
        im.write(tmp_path / "im.gguf")
    assert list(tmp_path.iterdir()) == []


# llama-quantize --imatrix's bytes ---------------------------------------------------------

@pytest.mark.parametrize("qtype", sorted(GOLDEN["quantized"]))
def test_convert_with_imatrix_is_llama_quantizes_bytes(qtype, checkpoint, f16, tmp_path, monkeypatch):
    # quantize.imatrix.file holds the path string as given: give the generator's, from ROOT.
    monkeypatch.chdir(ROOT)
    out = cpuq.convert(checkpoint, tmp_path / f"{qtype}.gguf", qtype, imatrix=GOLDEN["imatrix"])
    want = GOLDEN["quantized"][qtype]
    assert out.stat().st_size == want["bytes"]
    assert sha256(out) == want["sha256"]  # bit-exact: files move between the tools


# collecting ------------------------------------------------------------------------------

def test_collect_agrees_with_llama_imatrix(f16):
    ours = collect_imatrix(f16, TEXT.read_text(encoding="utf-8"), n_ctx=GOLDEN["ctx"], n_chunks=GOLDEN["chunks"],
                           dataset=GOLDEN["text"])
    assert ours.datasets == [GOLDEN["text"]]
    diffs = assert_agrees_with_golden(ours)
    worst = max((v for k, v in diffs.items() if k not in UNROUNDED), key=lambda v: v[0])
    print("\nunrounded inputs: max rel L2", max(diffs[k][0] for k in UNROUNDED),
          "| others: max rel L2", worst[0], "max channel", max(v[1] for v in diffs.values()))


# errors ------------------------------------------------------------------------------------

def _broken(case: str, tmp_path: Path, f16_path: Path | None) -> tuple[Path, list[str]]:
    """A bad imatrix argument and the words its error must contain."""
    t = golden_entries()
    entry = "blk.1.ffn_down.weight"
    if case == "model file":
        return f16_path, [str(f16_path), "not 'imatrix'"]
    if case == "text file":
        return TEXT, [str(TEXT), "not a GGUF imatrix file"]
    path = tmp_path / f"{case.replace(' ', '-')}.gguf"
    if case == "sums without counts":
        del t[entry + ".counts"]
        words = [entry, ".counts"]
    elif case == "nan":
        t[entry + ".in_sum2"][17] = np.nan
        words = [entry, "non-finite"]
    elif case == "negative":
        t[entry + ".in_sum2"][3] = -1.0
        words = [entry, "negative"]
    elif case == "f16 entry":
        t[entry + ".in_sum2"] = t[entry + ".in_sum2"].astype(np.float16)
        words = [entry, "F16", "F32"]
    elif case == "another model (row length)":
        # The golden cut to 64 channels: the imatrix of a model of hidden size 64.
        t = {k: (v if k.endswith(".counts") else v[:64]) for k, v in t.items()}
        words = ["blk.0.attn_k.weight", "64", "256", "another model"]
    elif case == "no entry matches":
        t = {k.replace("blk.", "model.layers."): v for k, v in t.items()}
        words = ["no entry matches"]
    elif case == "no metadata":  # llama-quantize: "missing imatrix metadata"
        return write_imatrix_file(path, t, metadata=False), [str(path), "imatrix.datasets", "missing"]
    else:
        raise AssertionError(case)
    return write_imatrix_file(path, t), [str(path), *words]


BROKEN = ["model file", "text file", "sums without counts", "nan", "negative", "f16 entry",
          "another model (row length)", "no entry matches", "no metadata"]


@pytest.mark.parametrize("case", BROKEN)
def test_bad_imatrix_names_file_and_entry(case, checkpoint, f16, tmp_path):
    bad, words = _broken(case, tmp_path, f16)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(cpuq.CpuqError) as e:
        cpuq.convert(checkpoint, out_dir / "x.gguf", "q4_k_m", imatrix=bad)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_type_without_importance_refuses_imatrix(qtype, checkpoint, tmp_path):
    with pytest.raises(cpuq.InputError, match=f"{qtype} does not use an importance matrix"):
        cpuq.convert(checkpoint, tmp_path / "x.gguf", qtype, imatrix=GOLDEN_IMATRIX)
    assert list(tmp_path.iterdir()) == []


def test_calibration_and_imatrix_both_refused(checkpoint, tmp_path):
    with pytest.raises(cpuq.InputError, match="not both"):
        cpuq.convert(checkpoint, tmp_path / "x.gguf", "q4_k_m", calibration="some text", imatrix=GOLDEN_IMATRIX)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_without_force(checkpoint, tmp_path):
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"keep")
    with pytest.raises(cpuq.InputError, match="already exists"):
        cpuq.convert(checkpoint, dst, "q4_k_m", imatrix=GOLDEN_IMATRIX)
    with pytest.raises(cpuq.InputError, match="already exists"):
        cpuq.convert(checkpoint, dst, "q4_k_m", calibration=TEXT.read_text(encoding="utf-8"))
    assert dst.read_bytes() == b"keep" and list(tmp_path.iterdir()) == [dst]


# convert with calibration text -------------------------------------------------------------

def test_convert_calibrated_leaves_only_the_output(checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = convert_calibrated(checkpoint, out_dir / "x.gguf", "q4_k_m", TEXT.read_text(encoding="utf-8"),
                             dataset="tempest", n_ctx=64, n_chunks=2)
    assert list(out_dir.iterdir()) == [dst]
    with cpuq.open_gguf(dst) as g:
        # llama-quantize's keys for an imatrix that was never a file: no quantize.imatrix.file
        assert g.get("quantize.imatrix.file") is None
        assert g.get("quantize.imatrix.dataset") == "tempest"
        assert g.get("quantize.imatrix.entries_count") == 14
        assert g.get("quantize.imatrix.chunks_count") == 2


def test_convert_calibrated_error_leaves_nothing(checkpoint, tmp_path):
    """The text is shorter than one window: the error comes after the temporary Q8_0 file
    was written, which must be gone."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(cpuq.InputError, match="calibration text is .* tokens"):
        cpuq.convert(checkpoint, out_dir / "x.gguf", "q4_k_m", calibration="Full fathom five thy father lies.")
    assert list(out_dir.iterdir()) == []


# the CLI -------------------------------------------------------------------------------------

def test_cli_convert_errors_exit_2_and_leave_nothing(checkpoint, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("Full fathom five thy father lies.\n", encoding="utf-8")
    r = cpuq_cli("convert", str(checkpoint), "-o", str(out_dir / "x.gguf"), "--imatrix", str(TEXT))
    assert_one_line_error(r, str(TEXT), "not a GGUF imatrix file")
    r = cpuq_cli("convert", str(checkpoint), "-o", str(out_dir / "x.gguf"), "--imatrix", str(GOLDEN_IMATRIX),
                 "--calibrate", str(TEXT))
    assert_one_line_error(r, "not both")
    r = cpuq_cli("convert", str(checkpoint), "-o", str(out_dir / "x.gguf"), "--calibrate", str(short),
                 "--calibrate-ctx", "64")
    assert_one_line_error(r, "calibration text is", "tokens")
    assert list(out_dir.iterdir()) == []


def test_cli_imatrix_end_to_end(f16, tmp_path):
    out = tmp_path / "im.gguf"
    args = ("imatrix", str(f16), "-f", GOLDEN["text"], "-o", str(out), "--ctx", str(GOLDEN["ctx"]),
            "--chunks", str(GOLDEN["chunks"]))
    r = cpuq_cli(*args)  # from ROOT, the text's path as llama-imatrix was given it
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: 14 matrices, {GOLDEN['chunks']} windows of {GOLDEN['ctx']} tokens" in r.stdout
    ours = Imatrix.read(out)
    assert ours.datasets == [GOLDEN["text"]]  # llama-imatrix stores the text's path as given
    assert_agrees_with_golden(ours)
    before = out.read_bytes()
    r = cpuq_cli(*args)
    assert_one_line_error(r, str(out), "already exists")
    assert out.read_bytes() == before
    r = cpuq_cli(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]
