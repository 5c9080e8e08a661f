"""cpuq.eval.compare and `cpuq compare` on the tiny Qwen2 checkpoint of the imatrix golden
(tools/make_imatrix_golden.py: 2 layers, hidden 256 so every block matrix is a k-quant, the
real 151936-token Qwen2 vocabulary). Scored on the first half of tests/data/tempest.txt,
calibrated on a slice of the second half, so the "+imatrix" and "+awq" rows see a text they
are not scored on.

Each number in a row is checked against a computation that does not go through compare:
sizes against the files on disk, bits/weight against gguf-py's tensor table, perplexity, KL
and top-1 against cpuq.eval.perplexity run directly (whose own numbers are checked against
llama-perplexity and an independent float64 computation in test_perplexity.py), the
+imatrix and +awq files against conversions with the importance matrix given by hand (the
+awq one with channel scaling, whose exactness tests/convert/test_scaling.py checks). Speeds
are only checked to be positive: they are timings.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
from typer.testing import CliRunner

import cpuq
from cpuq import InputError
from cpuq.cli import app
from cpuq.convert.imatrix import Imatrix
from cpuq.eval import compare as compare_mod
from cpuq.convert.calibration import collect_imatrix
from cpuq.eval.compare import HEADERS, CompareRow, compare, markdown_table, parse_types, write_reports
from cpuq.eval.perplexity import perplexity
from make_imatrix_golden import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "tests" / "data" / "tempest.txt").read_text(encoding="utf-8")
SCORED, CALIBRATION = TEXT[:15000], TEXT[15000:22000]  # disjoint; 7000 characters: 28 windows of 64
SETTINGS = dict(n_ctx=64, n_chunks=2, n_prompt=16, n_gen=4, repeat=1)
TYPES = "q8_0,q4_k"
# q8_0 takes no importance matrix: no q8_0+imatrix or q8_0+awq
LABELS = ["f16", "q8_0", "q4_k", "q4_k+imatrix", "q4_k+awq"]


# perplexity/KL/top-1 of the same file over the same windows, computed twice (inside compare,
# and by the test): the same deterministic kernels on the same float32 logits, then the same
# float64 sums. Measured bit-identical (difference 0); the bar leaves room for a float64 sum
# in another order (~n_vocab * 2^-53 = 1.7e-11 relative at worst on a log-normalizer).
SAME = 1e-9


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def run(module_tmp_factory) -> SimpleNamespace:
    where = module_tmp_factory.mktemp("compare")
    src = tiny_checkpoint(where / "src")
    out = where / "out"
    stages = []
    rows = compare(src, TYPES, SCORED, out, calibration=CALIBRATION, **SETTINGS,
                   progress=lambda stage, done, total: stages.append(stage))
    return SimpleNamespace(src=src, out=out, models=out / "models", rows=rows, by={r.type: r for r in rows},
                           stages=stages)


# compare(): the rows ------------------------------------------------------------------------

def test_rows_in_order_with_their_files(run):
    assert [r.type for r in run.rows] == LABELS
    for r in run.rows:
        assert Path(r.path) == run.models / f"{r.type}.gguf" and Path(r.path).is_file()
    # every type was converted once, the calibrated ones after the importance matrix was collected
    converts = [s for s in dict.fromkeys(run.stages) if s.startswith("convert ")]
    assert converts == [f"convert {t}" for t in LABELS]
    stages = list(dict.fromkeys(run.stages))
    assert stages.index("calibrate") < stages.index("convert q4_k+imatrix") < stages.index("convert q4_k+awq")


def test_sizes_ratio_and_bits_per_weight(run):
    src_bytes = sum(p.stat().st_size for p in run.src.glob("*.safetensors"))
    assert src_bytes > 0
    for r in run.rows:
        path = Path(r.path)
        assert r.file_bytes == path.stat().st_size
        # the same two integers divided: exact
        assert r.ratio == src_bytes / path.stat().st_size
        # bytes from gguf-py's block sizes (GGML_QUANT_SIZES: elements, bytes per block), not
        # cpuq's type table; shapes from the file (gguf.GGUFReader would take ~6 s a file to
        # parse the 151936-entry vocabulary)
        with cpuq.open_gguf(path) as g:
            shapes = [(math.prod(t.shape), gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype.ggml_type)])
                      for t in g]
        n_params = sum(n for n, _ in shapes)
        n_bytes = sum(n // block * type_size for n, (block, type_size) in shapes)
        assert r.bits_per_weight == round(8 * n_bytes / n_params, 4) == cpuq.summarize(path)["bits_per_weight"]
        assert r.pp_tok_s > 0 and r.tg_tok_s > 0
    # Q8_0 is 8.5 bits per weight and Q4_K 4.5 (block scales included); the few F32 norm
    # vectors add under 0.01 here (measured 8.5014 and 4.5016; F16 16.0009)
    assert run.by["q8_0"].bits_per_weight == pytest.approx(8.5, abs=0.01)
    assert run.by["q4_k"].bits_per_weight == pytest.approx(4.5, abs=0.01)
    assert run.by["f16"].bits_per_weight == pytest.approx(16.0, abs=0.01)


def test_base_row_is_f16_against_itself(run):
    base = run.by["f16"]
    # the base against a second load of itself: identical logits, so KL is exactly 0 up to
    # float64 rounding of sum p (log p - log p) (measured 0.0)
    assert base.delta_ppl_percent == 0.0
    assert base.kl_mean == pytest.approx(0.0, abs=1e-12) and base.kl_p99 == pytest.approx(0.0, abs=1e-12)
    assert base.top1_agreement == 1.0
    direct = perplexity(base.path, SCORED, n_ctx=64, n_chunks=2)
    assert base.ppl == pytest.approx(direct.ppl, rel=SAME)


@pytest.mark.parametrize("label", ["q8_0", "q4_k", "q4_k+imatrix", "q4_k+awq"])
def test_quantized_rows_are_perplexity_against_f16(run, label):
    r = run.by[label]
    direct = perplexity(r.path, SCORED, n_ctx=64, n_chunks=2, kl_base=run.by["f16"].path)
    assert direct.base_ppl == pytest.approx(run.by["f16"].ppl, rel=SAME)
    for field in ("ppl", "delta_ppl_percent", "kl_mean", "kl_p99"):
        assert getattr(r, field) == pytest.approx(getattr(direct, field), rel=SAME), field
    assert r.top1_agreement == direct.top1_agreement
    # quantization moves the distribution: KL strictly above the base's 0
    # (measured q8_0 9.7e-6, q4_k 1.6e-3, q4_k+imatrix 1.8e-3, q4_k+awq 1.6e-3 on this
    # random-weight model, 2 windows of 64 tokens)
    assert r.kl_mean > 1e-7 and r.kl_p99 >= r.kl_mean


def test_fewer_bits_lose_more(run):
    """Q8_0 keeps 8 bits, Q4_K 4.5: its KL from F16 is larger (measured 1.6e-3 vs 9.7e-6,
    a factor 170) and so is its top-1 disagreement (72.6% vs 98.4% agreement)."""
    q8, q4 = run.by["q8_0"], run.by["q4_k"]
    assert q4.kl_mean > 10 * q8.kl_mean
    assert q4.top1_agreement < q8.top1_agreement
    assert q4.file_bytes < q8.file_bytes < run.by["f16"].file_bytes


def test_imatrix_row_is_q4_k_with_the_calibration_imatrix(run, tmp_path):
    plain, calibrated = Path(run.by["q4_k"].path), Path(run.by["q4_k+imatrix"].path)
    assert plain.read_bytes() != calibrated.read_bytes()
    im_path = run.out / "imatrix.gguf"
    im = Imatrix.read(im_path)
    # collected by the F16 model over the calibration text (not the scored one), in windows of n_ctx
    with cpuq.load(run.by["f16"].path, n_ctx=64) as f16:
        n_windows = len(f16.tokenize(CALIBRATION)) // 64
        # through the file, as compare stores it (the file holds float32 sums)
        again = Imatrix.read(collect_imatrix(f16, CALIBRATION, n_ctx=64, dataset="calibration text")
                             .write(tmp_path / "again.gguf"))
    assert (im.chunk_count, im.chunk_size) == (n_windows, 64) and n_windows >= 2
    assert sorted(im.sums) == sorted(again.sums)
    for name in im.sums:
        assert (im.sums[name] == again.sums[name]).all() and (im.counts[name] == again.counts[name]).all(), name
    with cpuq.open_gguf(calibrated) as g:
        assert g.get("quantize.imatrix.file") == str(im_path)
        assert g.get("quantize.imatrix.dataset") == "calibration text"
        assert g.get("quantize.imatrix.entries_count") == len(im.sums) == 14  # 7 matrices x 2 layers
        assert g.get("quantize.imatrix.chunks_count") == n_windows
    with cpuq.open_gguf(plain) as g:
        assert not [k for k in g.keys() if k.startswith("quantize.imatrix")]
    # the same conversion by hand: byte for byte
    by_hand = cpuq.convert(run.src, tmp_path / "q4_k+imatrix.gguf", "q4_k", imatrix=im_path)
    assert by_hand.read_bytes() == calibrated.read_bytes()


def test_awq_row_is_q4_k_with_the_calibration_imatrix_and_channel_scaling(run, tmp_path):
    """The same importance matrix as the +imatrix row, with channel scaling as well: the
    same metadata plus the cpuq.channel_scaling key, the same tensor table, other values in
    the scaled block tensors only, and byte for byte the conversion by hand with awq=True."""
    imatrix_file, awq_file = Path(run.by["q4_k+imatrix"].path), Path(run.by["q4_k+awq"].path)
    b = awq_file.read_bytes()
    assert b != imatrix_file.read_bytes()
    assert len(b) == run.by["q4_k+awq"].file_bytes
    with cpuq.open_gguf(awq_file) as g, cpuq.open_gguf(imatrix_file) as plain:
        assert g.get("quantize.imatrix.file") == str(run.out / "imatrix.gguf")
        assert g.get("cpuq.channel_scaling", "").startswith("awq") and plain.get("cpuq.channel_scaling") is None
        assert {k: g.get(k) for k in g.keys() if k != "cpuq.channel_scaling"} == \
            {k: plain.get(k) for k in plain.keys()}
        assert [(t.name, t.qtype.name, t.shape) for t in g] == [(t.name, t.qtype.name, t.shape) for t in plain]
        differing = {t.name for t in g if bytes(t.data) != bytes(plain.tensor(t.name).data)}
    # only tensors convert.scaling folds into (which of them depends on the alphas chosen)
    scaled = {f"blk.{i}.{m}" for i in range(2) for m in (
        "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
        "ffn_up.weight", "ffn_down.weight", "attn_norm.weight", "ffn_norm.weight", "attn_v.bias")}
    assert differing and differing <= scaled, sorted(differing)
    by_hand = cpuq.convert(run.src, tmp_path / "q4_k+awq.gguf", "q4_k", imatrix=run.out / "imatrix.gguf", awq=True)
    assert by_hand.read_bytes() == b


# the cache ------------------------------------------------------------------------------------

def _refuse(*args, **kwargs):
    raise AssertionError("converted or collected although the cache holds it")


def test_second_run_converts_nothing(run, monkeypatch):
    before = files_state(run.models), files_state(run.out)["imatrix.gguf"]
    monkeypatch.setattr(compare_mod, "convert", _refuse)
    monkeypatch.setattr(compare_mod, "collect_imatrix", _refuse)
    rows = compare(run.src, TYPES, SCORED, run.out, calibration=CALIBRATION, **SETTINGS)
    assert (files_state(run.models), files_state(run.out)["imatrix.gguf"]) == before
    assert [r.type for r in rows] == LABELS
    for a, b in zip(rows, run.rows):  # the same files over the same windows: the same numbers
        assert (a.path, a.file_bytes, a.ratio, a.bits_per_weight, a.top1_agreement) == \
            (b.path, b.file_bytes, b.ratio, b.bits_per_weight, b.top1_agreement)
        for field in ("ppl", "delta_ppl_percent", "kl_mean", "kl_p99"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=SAME, abs=1e-15), (a.type, field)


def test_changed_code_converts_again(run, tmp_path, monkeypatch):
    """A cached file is not reused once the quantizer/converter code differs (the key holds
    a digest of it): the first cached type is converted again (in a copy of the shared
    run's folder, which this invalidates)."""
    class Converted(Exception):
        pass

    def converting(src, dst, *args, **kwargs):
        raise Converted(Path(dst).name)

    monkeypatch.setattr(compare_mod, "_code_key", lambda *dirs: "another version of the code")
    monkeypatch.setattr(compare_mod, "convert", converting)
    out = tmp_path / "out"
    shutil.copytree(run.out, out, copy_function=shutil.copy2)
    with pytest.raises(Converted, match="f16.gguf"):
        compare(run.src, TYPES, SCORED, out, calibration=CALIBRATION, **SETTINGS)


def test_calibration_without_a_type_that_uses_it_collects_nothing(run, tmp_path, monkeypatch):
    """Q8_0 ignores importance: --calibrate with only q8_0 collects no matrix and adds no
    row (the cached F16 and Q8_0 files are reused from the shared run's folder)."""
    out = tmp_path / "out"
    shutil.copytree(run.models, out / "models", copy_function=shutil.copy2)
    monkeypatch.setattr(compare_mod, "convert", _refuse)
    monkeypatch.setattr(compare_mod, "collect_imatrix", _refuse)
    rows = compare(run.src, "q8_0", SCORED, out, calibration=CALIBRATION, **SETTINGS)
    assert [r.type for r in rows] == ["f16", "q8_0"]
    assert not (out / "imatrix.gguf").exists()


def test_cache_key_tells_awq_from_imatrix(run, tmp_path, monkeypatch):
    """A cached file keyed as +imatrix's (awq false) under the +awq name is not taken for
    the +awq row: that one alone is converted again, to the first run's tensors (the
    metadata differs: quantize.imatrix.file names this folder's imatrix.gguf)."""
    out = tmp_path / "out"
    shutil.copytree(run.out, out, copy_function=shutil.copy2)
    for ext in (".gguf", ".json"):
        shutil.copy2(run.models / f"q4_k+imatrix{ext}", out / "models" / f"q4_k+awq{ext}")
    converted = []
    real_convert = compare_mod.convert

    def recording(src_dir, dst, qtype, **kwargs):
        converted.append((Path(dst).name, kwargs.get("awq")))
        return real_convert(src_dir, dst, qtype, **kwargs)

    monkeypatch.setattr(compare_mod, "convert", recording)
    monkeypatch.setattr(compare_mod, "collect_imatrix", _refuse)
    rows = compare(run.src, TYPES, SCORED, out, calibration=CALIBRATION, **SETTINGS)
    assert converted == [("q4_k+awq.gguf", True)]
    assert [r.type for r in rows] == LABELS
    with cpuq.open_gguf(out / "models" / "q4_k+awq.gguf") as again, cpuq.open_gguf(run.by["q4_k+awq"].path) as first:
        assert again.get("quantize.imatrix.file") == str(out / "imatrix.gguf")
        assert [t.name for t in again] == [t.name for t in first]
        for t in again:
            assert bytes(t.data) == bytes(first.tensor(t.name).data), t.name


def test_changed_source_mtime_converts_again(run, tmp_path, monkeypatch):
    """A copy of the checkpoint with the same names, sizes and mtimes (copy2) and of the
    cached files: nothing is converted (the key holds no path); then one source file's
    mtime moves: F16 and Q8_0 are converted again, and the new key is kept."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(run.src, src)  # copy2: mtimes kept to the nanosecond
    (out / "models").mkdir(parents=True)
    for label in ("f16", "q8_0"):
        for ext in (".gguf", ".json"):
            shutil.copy2(run.models / f"{label}{ext}", out / "models" / f"{label}{ext}")
    converted = []
    real_convert = compare_mod.convert

    def recording(src_dir, dst, qtype, **kwargs):
        converted.append(Path(dst).name)
        return real_convert(src_dir, dst, qtype, **kwargs)

    monkeypatch.setattr(compare_mod, "convert", recording)
    compare(src, "q8_0", SCORED, out, **SETTINGS)
    assert converted == []
    weights = src / "model.safetensors"
    assert weights.is_file()
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rows = compare(src, "q8_0", SCORED, out, **SETTINGS)
    assert converted == ["f16.gguf", "q8_0.gguf"]
    # the same weights: the same files and numbers as before
    assert [r.file_bytes for r in rows] == [run.by["f16"].file_bytes, run.by["q8_0"].file_bytes]
    assert rows[1].kl_mean == pytest.approx(run.by["q8_0"].kl_mean, rel=SAME)
    compare(src, "q8_0", SCORED, out, **SETTINGS)
    assert converted == ["f16.gguf", "q8_0.gguf"]  # and the new key holds


# reports ---------------------------------------------------------------------------------------

def fake_rows() -> list[CompareRow]:
    """Rows with numbers chosen to need every digit the table prints (no conversion needed)."""
    return [CompareRow("f16", "/m/f16.gguf", 86090272, 0.9310919589149399, 16.0009, 571.54, 6.58, 156408.03830765915,
                       0.0, 0.0, 0.0, 1.0),
            CompareRow("q4_k", "/m/q4_k.gguf", 28482080, 2.814329571435794, 4.5016, 801.61, 10.41, 155836.93171800318,
                       -0.36513889940400035, 0.0016189382688079669, 0.0019344314833922307, 0.7258064516129032),
            CompareRow("q4_k+imatrix", "/m/q4_k+imatrix.gguf", 28482304, 2.8143074380499553, 4.5016, 1002.3, 10.42,
                       157017.3737477027, 0.38958064216939675, 0.001790195783767894, 0.002315865620374191,
                       0.7258064516129032),
            CompareRow("q4_k+awq", "/m/q4_k+awq.gguf", 28482304, 2.8143074380499553, 4.5016, 998.71, 10.38,
                       156301.0417745633, -0.06810270145912338, 0.0015470023389721513, 0.0020118003672910944,
                       0.7419354838709677)]


def _md_cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


def _matplotlib_importable() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_reports_round_trip(tmp_path):
    rows = fake_rows()
    written = write_reports(rows, tmp_path, "# title line\n\n- a note")
    md = (tmp_path / "compare.md").read_text(encoding="utf-8").splitlines()
    assert md[:4] == ["# title line", "", "- a note", ""]
    table = md[4:]
    assert len(table) == 2 + len(rows)  # header, rule, one line per type
    assert _md_cells(table[0]) == HEADERS
    assert len({len(line) for line in table}) == 1  # padded to line up
    assert all(c.endswith(":") for c in _md_cells(table[1])[1:]) and not _md_cells(table[1])[0].endswith(":")
    for line, r in zip(table[2:], rows):
        cells = dict(zip(HEADERS, _md_cells(line)))
        assert cells["type"] == r.type
        # each printed number is the row's, to the digits printed (half a unit of the last)
        assert abs(float(cells["file MiB"]) - r.file_bytes / 2**20) <= 0.05
        assert abs(float(cells["ratio"].rstrip("x")) - r.ratio) <= 0.005
        assert abs(float(cells["perplexity"]) - r.ppl) <= 5e-5
        assert abs(float(cells["Δppl %"]) - r.delta_ppl_percent) <= 0.005
        assert abs(float(cells["KL mean"]) - r.kl_mean) <= 5e-6
        assert abs(float(cells["top-1 %"]) - 100 * r.top1_agreement) <= 0.005
    with open(tmp_path / "compare.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [b["type"] for b in back] == [r.type for r in rows]
    for b, r in zip(back, rows):  # repr of a float reads back to the same float
        for field, value in r.to_dict().items():
            assert type(value)(b[field]) == value, field
    png = tmp_path / "compare.png"
    if _matplotlib_importable():
        assert written == [tmp_path / "compare.md", tmp_path / "compare.csv", png]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert written == [tmp_path / "compare.md", tmp_path / "compare.csv"] and not png.exists()


def test_reports_without_matplotlib(tmp_path, monkeypatch):
    """CI installs .[dev] only: no matplotlib, no PNG, and no error."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    written = write_reports(fake_rows(), tmp_path, "# t")
    assert written == [tmp_path / "compare.md", tmp_path / "compare.csv"]
    assert not (tmp_path / "compare.png").exists()


def test_plot_of_the_base_alone(tmp_path):
    """--types f16: one row, KL 0 (left out of the log-scale panel): still a report."""
    written = write_reports(fake_rows()[:1], tmp_path, "# only F16")
    assert (tmp_path / "compare.md").read_text(encoding="utf-8").count("\n| f16 ") == 1
    assert len(written) == (3 if _matplotlib_importable() else 2)


def test_markdown_table_alignment():
    text = markdown_table(["name", "n"], [["a", "1"], ["long name", "12345"]], right={"n"})
    assert text.splitlines() == ["| name      |     n |",
                                 "| --------- | ----: |",
                                 "| a         |     1 |",
                                 "| long name | 12345 |"]


# parse_types and bad input ---------------------------------------------------------------------

def test_parse_types():
    assert parse_types("q8_0, Q4_K ,q8_0,") == ["q8_0", "q4_k"]
    assert parse_types(["F16", "q4_k_m"]) == ["f16", "q4_k_m"]
    for bad in ("", " , ", []):
        with pytest.raises(InputError, match="names no type"):
            parse_types(bad)
    with pytest.raises(InputError, match="'q3_k' is not a type cpuq converts to") as e:
        parse_types("q8_0,q3_k")
    assert "q4_k_m" in str(e.value) and "\n" not in str(e.value)


def test_bad_input_before_any_work(tmp_path):
    with pytest.raises(InputError, match="'iq2_xs'"):
        compare(tmp_path, "iq2_xs", SCORED, tmp_path / "out")
    with pytest.raises(InputError, match="no config.json"):
        compare(tmp_path, "q8_0", SCORED, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# the CLI ---------------------------------------------------------------------------------------

CLI_SETTINGS = ["--ctx", "64", "--chunks", "2", "--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "1"]


@pytest.fixture(scope="module")
def scored_file(module_tmp_factory) -> Path:
    path = module_tmp_factory.mktemp("text") / "scored.txt"
    path.write_text(SCORED, encoding="utf-8")
    return path


def test_cli_end_to_end(run, scored_file, monkeypatch):
    monkeypatch.setattr(compare_mod, "convert", _refuse)  # F16 and Q8_0 are in the module's cache
    res = CliRunner().invoke(app, ["compare", str(run.src), "--types", "q8_0", "-f", str(scored_file),
                                   "-o", str(run.out), *CLI_SETTINGS])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 4, res.stdout  # header, rule, f16, q8_0
    assert _md_cells(lines[0]) == HEADERS
    for line, label in zip(lines[2:], ["f16", "q8_0"]):
        cells = dict(zip(HEADERS, _md_cells(line)))
        r = run.by[label]
        assert cells["type"] == label
        assert abs(float(cells["perplexity"]) - r.ppl) <= 5e-5
        assert abs(float(cells["KL mean"]) - r.kl_mean) <= 5e-6
    md = (run.out / "compare.md").read_text(encoding="utf-8")
    assert md.startswith(f"# cpuq compare: {run.src.name}\n") and "scored.txt" in md
    with open(run.out / "compare.csv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [b["type"] for b in back] == ["f16", "q8_0"]
    assert float(back[1]["ppl"]) == pytest.approx(run.by["q8_0"].ppl, rel=SAME)


def test_cli_json(run, scored_file, monkeypatch):
    import json
    monkeypatch.setattr(compare_mod, "convert", _refuse)
    res = CliRunner().invoke(app, ["compare", str(run.src), "--types", "f16", "-f", str(scored_file),
                                   "-o", str(run.out), "--json", *CLI_SETTINGS])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [o["type"] for o in out] == ["f16"] and out[0]["file_bytes"] == run.by["f16"].file_bytes
    assert math.isclose(out[0]["ppl"], run.by["f16"].ppl, rel_tol=SAME)


@pytest.mark.parametrize("case", ["types", "empty types", "missing text", "missing calibration", "no checkpoint"])
def test_cli_errors_are_one_line_exit_2(case, scored_file, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "config.json").write_text("{}")
    args = {"types": (["--types", "q8_0,q3_k"], "'q3_k' is not a type"),
            "empty types": (["--types", " , "], "names no type"),
            "missing text": (["-f", str(tmp_path / "missing.txt")], "cannot read the text file"),
            "missing calibration": (["--calibrate", str(tmp_path / "nope.txt")], "nope.txt: cannot read"),
            "no checkpoint": (["--types", "q8_0"], "no config.json")}[case]
    if case == "no checkpoint":
        (src / "config.json").unlink()
    extra, message = args
    base = ["compare", str(src), "-o", str(out)]
    if "-f" not in extra:
        base += ["-f", str(scored_file)]
    res = CliRunner().invoke(app, base + extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()
