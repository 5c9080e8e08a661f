"""round_through_f16 against numpy's float16 conversion (IEEE round-to-nearest-even)."""
import numpy as np
import pytest

from cpuq.quants.floats import round_through_f16


def _check(x):
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    got = round_through_f16(x.copy())
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    bad = np.nonzero(ref[~nan].view(np.uint32) != got[~nan].view(np.uint32))[0]
    assert bad.size == 0, f"{bad.size} differ, first x={x[~nan][bad[0]]!r}: {got[~nan][bad[0]]!r} != {ref[~nan][bad[0]]!r}"


def test_every_4093rd_float32_bit_pattern():
    # ~1M patterns spread over all exponents, signs and mantissas
    _check(np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32))


def test_around_every_half_boundary():
    # every float16 value, the midpoints between neighbours and one float32 ulp either side:
    # where ties-to-even, subnormals and overflow are decided
    h = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    h = h[np.isfinite(h)]
    h.sort()
    mids = (h[:-1].astype(np.float64) + h[1:]) / 2
    pts = np.concatenate([h, mids.astype(np.float32), [65504, 65519.996, 65520, 1e30, np.inf, np.nan]])
    pts = pts.astype(np.float32)
    ulp = np.concatenate([np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))])
    _check(np.concatenate([pts, ulp, -pts, -ulp]).astype(np.float32))


def test_refuses_what_it_cannot_write_in_place():
    with pytest.raises(TypeError):
        round_through_f16(np.zeros(4, np.float64))
    with pytest.raises(TypeError):
        round_through_f16(np.zeros((4, 4), np.float32)[:, ::2])
