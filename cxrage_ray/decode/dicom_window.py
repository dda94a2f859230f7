"""The parameters of dcmj2pnm's 8-bit mapping (`dcmj2pnm -O +ot +G`, no VOI window), computed once per frame.

In:  a parsed dataset (`GreyscaleParams.from_dataset`), then a frame's pixel count and stored-value range.
Out: `GreyscaleParams` (what the header says: depth, sign, polarity, rescale or Modality LUT) and `WindowPlan`
     (DCMTK's `nowindow` arguments for that frame) with its `OutputRamp` (the three numbers each modality value
     is mapped with).

Plain Python (numpy only to read the Modality LUT): the per-pixel kernels that apply these parameters are
`cxrage_ray.decode.dicom_greyscale.dcmtk_8bit` (numpy, the exact CPU path) and
`cxrage_ray.preprocess.tensor.dcmtk_8bit_tensor` (torch, the GPU path). Both read every number from here, so
they cannot drift apart. The arithmetic follows DCMTK 3.6.7 `dcmimgle` (`dimoipxt.h`, `dimoopxt.h`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrage_ray.decode.dicom_values import float_value, int_value

#: DCMTK's +G weights (dcmj2pnm: `--grayscale`), applied in this order in double precision.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True, slots=True)
class GreyscaleParams:
    """What DCMTK's no-VOI rendering depends on, read from the header.

    Args:
        bits_stored: BitsStored (b).
        signed: PixelRepresentation == 1.
        colour: 3 samples per pixel (converted with +G weights, no modality transform).
        invert: render low values bright (MONOCHROME1, or Presentation LUT Shape INVERSE).
        slope, intercept: Rescale Slope/Intercept when both present, non-zero slope, and no LUT.
        lut_first, lut_data, lut_bits: the Modality LUT (first input value mapped, entries, bits).
    """

    bits_stored: int
    signed: bool
    colour: bool = False
    invert: bool = False
    slope: float | None = None
    intercept: float | None = None
    lut_first: int | None = None
    lut_data: np.ndarray | None = None
    lut_bits: int | None = None

    @classmethod
    def from_dataset(cls, ds: Any) -> GreyscaleParams:
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        samples = int_value(ds.get("SamplesPerPixel"), 1)
        bits = int_value(ds.get("BitsStored"), 0) or int_value(ds.get("BitsAllocated"), 16)
        signed = int_value(ds.get("PixelRepresentation"), 0) == 1
        if samples == 3:
            return cls(bits_stored=bits, signed=False, colour=True)
        # DCMTK: an explicit Presentation LUT Shape decides polarity (IDENTITY un-inverts a MONOCHROME1
        # image, INVERSE inverts a MONOCHROME2 one); without it MONOCHROME1 is inverted. Verified with
        # dcmj2pnm 3.6.7 on 966_fixed (MONOCHROME1 + INVERSE: inverted once) and on synthetic files.
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
        invert = shape == "INVERSE" if shape in ("INVERSE", "IDENTITY") else photometric == "MONOCHROME1"
        lut = _modality_lut(ds)
        if lut is not None:
            first, data, lut_bits = lut
            return cls(bits, signed, invert=invert, lut_first=first, lut_data=data, lut_bits=lut_bits)
        slope, intercept = float_value(ds.get("RescaleSlope")), float_value(ds.get("RescaleIntercept"))
        if slope is None or intercept is None or slope == 0.0:
            slope = intercept = None
        return cls(bits, signed, invert=invert, slope=slope, intercept=intercept)


def _modality_lut(ds: Any) -> tuple[int, np.ndarray, int] | None:
    """First item of ModalityLUTSequence as DCMTK's DiLookupTable reads it, or None."""
    seq = ds.get("ModalityLUTSequence")
    if not seq:
        return None
    item = seq[0]
    desc = item.get("LUTDescriptor")
    raw = item.get("LUTData")
    if desc is None or raw is None or len(desc) < 3:
        return None
    count = int(desc[0]) or 65536
    first = int(desc[1])
    if int_value(ds.get("PixelRepresentation"), 0) == 1 and first >= 32768:
        first -= 65536
    bits = int(desc[2])
    if isinstance(raw, (bytes, bytearray)):
        order = "<" if ds.is_little_endian in (None, True) else ">"
        words = np.frombuffer(bytes(raw[: len(raw) // 2 * 2]), dtype=f"{order}u2")
    else:
        words = np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw], dtype=np.uint16)
    if words.size == 0:
        return None
    packed8 = words.size != count and words.size == (count + 1) >> 1
    if packed8:  # 8-bit entries packed two per word
        data = words.astype("<u2").view(np.uint8)[:count].astype(np.uint16)
    else:
        data = words[: min(words.size, 65536)].astype(np.uint16)
    if bits < 8 or bits > 16:  # DiLookupTable::checkBits: derive the depth from the largest entry
        bits = max(8, min(16, int(data.max()).bit_length())) if data.max() > 0 else 16
    mask = (1 << bits) - 1
    return first, (data & mask).astype(np.uint16), bits


@dataclass(frozen=True, slots=True)
class OutputRamp:
    """The 8-bit output of a modality value v: clip(trunc(low + (v - origin) * gradient), 0, 255)."""

    low: float
    origin: float
    gradient: float


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """dimoopxt.h `nowindow`'s whole-frame arguments (VOI NONE, no presentation/display LUT).

    Args:
        absmin, absmax: the range of modality values the output ramp spans.
        invert: high values dark.
        inter_size: bytes of DCMTK's intermediate integer type (with `count`, decides its look-up-table path).
        count: pixels in the frame.
    """

    absmin: float
    absmax: float
    invert: bool
    inter_size: int
    count: int

    def ramp(self) -> OutputRamp:
        """The per-value map DCMTK applies, including the origin its look-up-table path shifts to."""
        low, high = (255.0, 0.0) if self.invert else (0.0, 255.0)
        absrange = self.absmax - self.absmin + 1.0
        gradient = (high - low + 1.0) / absrange
        ocnt = int(absrange) if absrange <= 10_000_000.0 else 0
        if self.inter_size <= 2 and ocnt > 0 and self.count > 3 * ocnt:
            # LUT path: entry i = low + i*gradient, indexed by v - (integer cast of absmin)
            return OutputRamp(low, float(int(self.absmin)), gradient)
        return OutputRamp(low, self.absmin, gradient)


def needs_stored_range(params: GreyscaleParams) -> bool:
    """Whether `window_plan` needs the frame's stored min/max (not for colour or a Modality LUT)."""
    return not params.colour and params.lut_data is None


def window_plan(params: GreyscaleParams, count: int, stored_range: tuple[float, float] | None) -> WindowPlan:
    """`nowindow`'s arguments for one frame.

    Args:
        params: the header's parameters.
        count: the frame's pixels (rows x columns).
        stored_range: the frame's smallest and largest stored value, when `needs_stored_range(params)`.
    """
    bits = params.bits_stored
    if params.colour:  # DiColorMonoTemplate: 0..2^b-1 -> 0..255, a 4-byte intermediate
        return WindowPlan(0.0, float((1 << bits) - 1), False, 4, count)
    if params.signed:
        absmin, absmax = float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    else:
        absmin, absmax = 0.0, float((1 << bits) - 1)
    if params.lut_data is not None:
        absmin, absmax = 0.0, float((1 << params.lut_bits) - 1)
        lo, hi = float(params.lut_data.min()), float(params.lut_data.max())
    else:
        if stored_range is None:
            raise ValueError("window_plan needs the frame's stored range for a grey image without Modality LUT")
        lo, hi = stored_range
        if params.slope is not None:
            slope, intercept = params.slope, params.intercept
            lo, hi = lo * slope + intercept, hi * slope + intercept
            absmin, absmax = absmin * slope + intercept, absmax * slope + intercept
            if slope < 0:
                absmin, absmax = absmax, absmin
                lo, hi = hi, lo
    return WindowPlan(absmin, absmax, params.invert, representation_size(lo, hi), count)


def representation_size(lo: float, hi: float) -> int:
    """Bytes of DCMTK's intermediate integer type for the value range (determineRepresentation)."""
    if lo < 0:
        if lo >= -128 and hi <= 127:
            return 1
        return 2 if lo >= -32768 and hi <= 32767 else 4
    if hi <= 255:
        return 1
    return 2 if hi <= 65535 else 4
