"""DICOM frames Pillow decodes: 8-bit JPEG (exactly as DCMTK) and reduced-resolution JPEG 2000 (fast mode).

In:  frame 1's codestream (cut out by `cxrage_ray.decode.dicom_frame.encapsulated_frame`) and, for JPEG 2000,
     the dataset whose header describes it.
Out: stored values as numpy arrays — (H, W) grey or (H, W, 3) RGB for JPEG, uint16 (h, w) for JPEG 2000 — or
     None when Pillow cannot take the stream (the caller then decodes it with pydicom + pylibjpeg).

Pillow's libjpeg-turbo has the same islow IDCT and colour conversion as the IJG code inside DCMTK, so its 8-bit
JPEG samples are dcmj2pnm's. In `fast` mode JPEG uses DCT-domain scaling and JPEG 2000 drops resolution levels,
never leaving the short side below `FAST_DECODE_MIN_SIDE`, and the reduced image keeps the full image's fill
geometry (`cxrage_ray.decode.geometry.crop_to_fill_grid`).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from cxrage_ray.decode.dicom_values import int_value
from cxrage_ray.decode.geometry import FAST_DECODE_MIN_SIDE, crop_to_fill_grid


def jpeg_pillow(stream: bytes, fast: bool) -> np.ndarray | None:
    """8-bit JPEG via Pillow (libjpeg-turbo: same islow IDCT and colour conversion as the IJG code
    in DCMTK, so bit-exact with dcmj2pnm), with DCT-domain scaling (`draft`) in fast mode."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(stream), formats=["JPEG"])
            width, height = image.size
            scale = 1
            if fast:
                while scale < 8 and -(-min(width, height) // (scale * 2)) >= FAST_DECODE_MIN_SIDE:
                    scale *= 2
                if scale > 1:
                    image.draft(image.mode, (width // scale, height // scale))
            image.load()
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            pixels = np.asarray(image)
            # libjpeg's scaled IDCT keeps block centres, so no phase shift; only odd sizes need care
            return crop_to_fill_grid(pixels, height, width) if fast and scale > 1 else pixels
    except Exception:
        return None


def j2k_reduced(codestream: bytes, ds: Any) -> np.ndarray | None:
    """Frame 1 of a JPEG 2000 stream at the coarsest resolution level that keeps the short side
    >= FAST_DECODE_MIN_SIDE; None when no level qualifies or Pillow cannot decode the stream
    (the caller then decodes at full resolution)."""
    header = _j2k_header(codestream)
    if header is None:
        return None
    levels = header[2]
    rows, cols = int_value(ds.Rows, 0), int_value(ds.Columns, 0)
    reduce = 0
    while reduce < levels and -(-min(rows, cols) // (2 ** (reduce + 1))) >= FAST_DECODE_MIN_SIDE:
        reduce += 1
    stored = decode_j2k_pillow(codestream, ds, reduce) if reduce else None
    if stored is None:
        return None
    stored = j2k_phase_align(stored, reduce, (1 << min(int_value(ds.get("BitsStored"), 16), 16)) - 1)
    return crop_to_fill_grid(stored, rows, cols)


def j2k_phase_align(stored: np.ndarray, reduce: int, max_value: int) -> np.ndarray:
    """Resample a reduced JPEG 2000 image onto the grid of a box-filtered downscale.

    The wavelet low-pass band keeps the even samples' positions: sample k of resolution level `reduce`
    sits on full-resolution pixel 2^r k, while a downscale by 2^r (and the seed chain's Lanczos resize
    of the full image) puts it at the centre of its 2^r x 2^r block, 2^r k + (2^r - 1)/2. Left alone,
    the fast picture is shifted by (2^r - 1)/2 full-resolution pixels (1/8 of an output pixel at r = 1
    for a 2048 px film). A separable Keys cubic (a = -0.5) at offset 1/2 - 2^-(r+1) moves it back;
    over 10 benchmark films it halved the model's mean |Δraw| against the exact path (0.093 -> 0.043,
    benchmarks/decode.py; docs/dicom.md). Edges are replicated.

    Args:
        stored: (h, w) unsigned stored values from `decode_j2k_pillow`.
        reduce: the resolution levels dropped (>= 1).
        max_value: the largest stored value (2^BitsStored - 1); results are rounded and clipped to it.

    Returns:
        uint16 (h, w).
    """
    a = 0.5 - 0.5 ** (reduce + 1)
    taps = [_keys_cubic(t) for t in (a + 1.0, a, 1.0 - a, 2.0 - a)]  # neighbours -1, 0, +1, +2
    x = stored.astype(np.float32)
    for axis in (0, 1):
        n = x.shape[axis]
        padded = np.pad(x, [(1, 2) if i == axis else (0, 0) for i in range(2)], mode="edge")
        window = (lambda s: padded[s : s + n]) if axis == 0 else (lambda s: padded[:, s : s + n])
        x = taps[0] * window(0) + taps[1] * window(1) + taps[2] * window(2) + taps[3] * window(3)
    return np.clip(np.rint(x), 0, max_value).astype(np.uint16)


def _keys_cubic(t: float) -> float:
    t = abs(t)
    if t < 1.0:
        return 1.5 * t**3 - 2.5 * t**2 + 1.0
    if t < 2.0:
        return -0.5 * t**3 + 2.5 * t**2 - 4.0 * t + 2.0
    return 0.0


def decode_j2k_pillow(codestream: bytes, ds: Any, reduce: int) -> np.ndarray | None:
    """Greyscale unsigned JPEG 2000 via Pillow's OpenJPEG with `reduce` resolution levels dropped.

    Returns stored values like pydicom's decoder (Pillow's scaling to 16 bits undone, masked to
    BitsStored), or None for what this path does not handle (colour, signed, Pillow errors).
    """
    from PIL import Image

    header = _j2k_header(codestream)
    if header is None or int_value(ds.get("SamplesPerPixel"), 1) != 1 or int_value(ds.get("PixelRepresentation"), 0):
        return None
    precision, signed, _ = header
    if signed or precision > 16:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
            image.reduce = reduce
            image.load()
            arr = np.asarray(image)
    except Exception:
        return None
    if image.mode == "I;16":  # Pillow scales samples up to 16 bits: undo it
        arr = arr >> (16 - precision)
    elif image.mode != "L":
        return None
    bits = int_value(ds.get("BitsStored"), precision)
    return arr.astype(np.uint16) & np.uint16((1 << min(bits, 16)) - 1)


def _j2k_header(stream: bytes) -> tuple[int, bool, int] | None:
    """(precision, signed, decomposition levels) of component 0 from the SIZ and COD markers."""
    start = stream.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return None
    pos, precision, signed, levels = start + 2, None, False, None
    while pos + 4 <= len(stream):
        marker = stream[pos : pos + 2]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        body = stream[pos + 4 : pos + 2 + length]
        if marker == b"\xff\x51" and len(body) >= 37:
            ssiz = body[36]
            precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
        elif marker == b"\xff\x52" and len(body) >= 6:
            levels = body[5]
        elif marker in (b"\xff\x90", b"\xff\x93") or marker[0:1] != b"\xff":
            break
        pos += 2 + length
    if precision is None or levels is None:
        return None
    return precision, signed, levels
