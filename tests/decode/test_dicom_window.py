"""The dcmj2pnm mapping's parameters (`dicom_window`), which the numpy and torch kernels both apply."""

from __future__ import annotations

import numpy as np
import pytest

from cxrage_ray.decode.dicom_window import (
    GreyscaleParams,
    OutputRamp,
    needs_stored_range,
    representation_size,
    window_plan,
)

RESCALED = GreyscaleParams(bits_stored=12, signed=False, slope=0.37, intercept=-100.3)


def test_large_frames_take_dcmtks_lookup_table_origin() -> None:
    # absmin = -100.3, range 1516 values: over 3 x 1516 pixels DCMTK indexes a table from int(absmin)
    small = window_plan(RESCALED, 100, (0.0, 4095.0)).ramp()
    large = window_plan(RESCALED, 200 * 200, (0.0, 4095.0)).ramp()
    assert small.origin == pytest.approx(-100.3) and large.origin == -100.0
    assert small.low == large.low == 0.0 and small.gradient == large.gradient


def test_negative_slope_swaps_the_range_and_colour_has_a_fixed_plan() -> None:
    plan = window_plan(GreyscaleParams(10, False, slope=-1.5, intercept=7.0), 64, (0.0, 1023.0))
    assert (plan.absmin, plan.absmax) == (1023 * -1.5 + 7.0, 7.0)
    colour = window_plan(GreyscaleParams(8, False, colour=True), 12, None)
    assert (colour.absmin, colour.absmax, colour.invert, colour.inter_size, colour.count) == (0.0, 255.0, False, 4, 12)


def test_inverted_ramp_runs_from_white() -> None:
    ramp = window_plan(GreyscaleParams(8, False, invert=True), 10, (0.0, 255.0)).ramp()
    assert ramp == OutputRamp(low=255.0, origin=0.0, gradient=(0.0 - 255.0 + 1.0) / 256.0)


def test_the_stored_range_is_needed_only_without_lut_or_colour() -> None:
    lut = GreyscaleParams(12, False, lut_first=0, lut_data=np.arange(4096, dtype=np.uint16), lut_bits=12)
    assert not needs_stored_range(lut) and not needs_stored_range(GreyscaleParams(8, False, colour=True))
    assert needs_stored_range(RESCALED)
    assert window_plan(lut, 10, None).absmax == 4095.0
    with pytest.raises(ValueError):
        window_plan(RESCALED, 10, None)


@pytest.mark.parametrize(("lo", "hi", "size"), [(0, 255, 1), (0, 256, 2), (-128, 127, 1), (-129, 127, 2),
                                                (0, 65535, 2), (0, 65536, 4), (-32768, 32767, 2), (-32769, 0, 4)])
def test_representation_size_follows_dcmtk(lo: float, hi: float, size: int) -> None:
    assert representation_size(lo, hi) == size
