"""dcmj2pnm's 8-bit mapping on the CPU (numpy): a frame's stored values -> the 8-bit image DCMTK writes.

In:  frame 1's stored values (H, W) sign-extended to BitsStored, or (H, W, 3) RGB, and its `GreyscaleParams`.
Out: uint8 (H, W), bit-exact with `dcmj2pnm -O +ot +G` (DCMTK 3.6.7), including its double arithmetic, C
     truncation and the look-up-table path it takes for large images.

Only the per-pixel kernels live here; every parameter they apply comes from `cxrage_ray.decode.dicom_window`,
which the torch version (`cxrage_ray.preprocess.tensor.dcmtk_8bit_tensor`) reads too.
"""

from __future__ import annotations

import numpy as np

from cxrage_ray.decode.dicom_window import GREY_WEIGHTS, GreyscaleParams, OutputRamp, needs_stored_range, window_plan

#: Rows mapped at a time. The mapping makes several float64 temporaries per value; over a whole 16384² frame each
#: is 2 GB (a 67 M px native DICOM peaked at 2.6 GB). Every step after the frame's min/max is per value, so
#: mapping bands of rows gives the same bytes with temporaries of a few tens of MB.
MAP_BAND_ROWS = 256


def dcmtk_8bit(frame: np.ndarray, params: GreyscaleParams) -> np.ndarray:
    """Map stored values (sign-extended, BitsStored wide) to dcmj2pnm's 8-bit output, bit-exactly.

    Args:
        frame: (H, W) stored values, or (H, W, 3) RGB for colour images.
        params: header parameters (`GreyscaleParams.from_dataset`).

    Returns:
        uint8 (H, W), mapped `MAP_BAND_ROWS` rows at a time with the whole frame's range.
    """
    stored_range = (float(frame.min()), float(frame.max())) if needs_stored_range(params) else None
    ramp = window_plan(params, frame.shape[0] * frame.shape[1], stored_range).ramp()
    out = np.empty(frame.shape[:2], dtype=np.uint8)
    for top in range(0, frame.shape[0], MAP_BAND_ROWS):
        out[top:top + MAP_BAND_ROWS] = apply_ramp(modality_values(frame[top:top + MAP_BAND_ROWS], params), ramp)
    return out


def modality_values(band: np.ndarray, params: GreyscaleParams) -> np.ndarray:
    """float64 values of some rows after DCMTK's colour-to-grey or modality transform (per value)."""
    if params.colour:  # DiColorMonoTemplate: T(r*0.299 + g*0.587 + b*0.114)
        rgb = band.astype(np.float64)
        return np.trunc(rgb[..., 0] * GREY_WEIGHTS[0] + rgb[..., 1] * GREY_WEIGHTS[1] + rgb[..., 2] * GREY_WEIGHTS[2])
    if params.lut_data is not None:  # dimoipxt.h modlut: clamp to the first/last entry, else table
        lut = params.lut_data
        index = np.clip(band.astype(np.int64) - params.lut_first, 0, len(lut) - 1)
        return lut[index].astype(np.float64)
    values = band.astype(np.float64)
    if params.slope is not None:  # dimoipxt.h rescale: T3(double(v) * slope + intercept), truncated
        slope, intercept = params.slope, params.intercept
        if slope == 1.0:
            return np.trunc(values + intercept)
        if intercept == 0.0:
            return np.trunc(values * slope)
        return np.trunc(values * slope + intercept)
    return values


def apply_ramp(values: np.ndarray, ramp: OutputRamp) -> np.ndarray:
    """dimoopxt.h `nowindow`'s per-value step: float64 modality values -> uint8."""
    out = np.trunc(ramp.low + (values - ramp.origin) * ramp.gradient)
    return np.clip(out, 0, 255).astype(np.uint8)
