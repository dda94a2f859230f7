"""Decode stage: bytes of one file -> `DecodedImage` (pixels as ImageMagick would hold them + metadata).

In:  the file's bytes and its name (the name's extension is only a hint; content decides).
Out: `DecodedImage` with the pixels at the file's own depth — uint8 for 1- and 8-bit samples (each standing for
     the Q16 value v*257 that ImageMagick Q16 holds), uint16 Q16 for 16-bit ones — shape (H, W, C) with C = 1
     (grey) or 3 (RGB), an optional Q16 alpha plane, and metadata. 8-bit films are never widened to uint16
     here: at the pixel limit that copy alone was 512 MB a grey film (issue 11); `DecodedImage.q16()` gives it
     to a caller that needs it.

One module per family: `raster` (PNG/JPEG/TIFF via Pillow/tifffile) and `dicom` (pydicom + pylibjpeg,
mapped to 8 bits exactly as DCMTK's `dcmj2pnm -O +ot +G` did for the original pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrage_ray.config import DecodeOptions

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
#: `--decode fast` never reduces the short side below this: twice the 512 px the seed chain resizes to,
#: so the final Lanczos downscale still has real detail to average.
FAST_DECODE_MIN_SIDE = 1024


@dataclass(slots=True)
class DecodedImage:
    """One decoded image, before any preprocessing.

    Attributes:
        pixels: (H, W, C), C in {1, 3}: uint8 8-bit samples v standing for the Q16 value v*257, or uint16
            Q16 values (16-bit sources, or any caller that built Q16 itself).
        alpha: uint16 (H, W) alpha plane in Q16 when the file had one, else None.
        meta: format-specific metadata destined for output columns (never raw patient identifiers).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def q16(self) -> np.ndarray:
        """The pixels as uint16 Q16 values (H, W, C): 8-bit samples scaled v -> v*257 (a new array), Q16 kept."""
        if self.pixels.dtype == np.uint8:
            return np.multiply(self.pixels, 257, dtype=np.uint16)
        return self.pixels

    def eight_bit(self) -> np.ndarray:
        """The pixels as uint8 levels: 8-bit samples kept, Q16 values truncated (v // 257, as IM's 8-bit output)."""
        if self.pixels.dtype == np.uint8:
            return self.pixels
        return (self.pixels // 257).astype(np.uint8)


def is_dicom(data: bytes, name: str = "") -> bool:
    """True for DICOM by extension or by the `DICM` magic at offset 128."""
    if name.lower().endswith(DICOM_EXTENSIONS):
        return True
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode_image(data: bytes, name: str = "", options: DecodeOptions = DecodeOptions()) -> DecodedImage:
    """Decode one file's bytes; raises `DecodeError` (or a subclass) for anything unusable.

    This is the decode boundary: whatever a library raises past the decoders' own checks (a numpy error
    while filling a frame, a MemoryError, ...) leaves as `DecodeError` / `DecompressionBombError` with a plain
    message (`decode.messages`), the library's exception chained for the logs.
    """
    from cxrage_ray.decode.messages import plain_reason
    from cxrage_ray.errors import CxrAgeError, DecompressionBombError, DecodeError

    try:
        return _decode_any(data, name, options)
    except CxrAgeError:
        raise
    except MemoryError as exc:
        raise DecompressionBombError(f"not decoded: {plain_reason(exc)}") from exc
    except Exception as exc:  # a library failure the decoders did not anticipate
        raise DecodeError(f"not decoded: {plain_reason(exc)}") from exc


def _decode_any(data: bytes, name: str, options: DecodeOptions) -> DecodedImage:
    """DICOM by extension or magic, else raster; an extension-less ACR-NEMA file is tried last."""
    from cxrage_ray.errors import EmptyFileError

    if not data:
        raise EmptyFileError("file is empty (0 bytes)")
    if is_dicom(data, name):
        from cxrage_ray.decode.dicom import decode_dicom

        return decode_dicom(data, options)
    from cxrage_ray.decode.raster import decode_raster

    try:
        return decode_raster(data, options)
    except Exception as raster_error:  # an extension-less ACR-NEMA file has no magic; try DICOM last
        from cxrage_ray.decode.dicom import decode_dicom, looks_like_acr_nema

        if looks_like_acr_nema(data):
            return decode_dicom(data, options)
        raise raster_error
