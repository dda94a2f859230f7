"""Decode stage entry point: bytes of one file -> `DecodedImage`, whatever the format.

In:  the file's bytes and its name (the name's extension is only a hint; content decides), and `DecodeOptions`.
Out: `DecodedImage` (`cxrage_ray.decode.types`) from the family's decoder — `dicom` (DICOM by extension or the
     `DICM` magic, and extension-less ACR-NEMA tried last) or `raster` (PNG/JPEG/TIFF) — or `DecodeError` (or a
     subclass) with a plain message for anything unusable.

The dispatcher sits above both decoders and neither imports it.
"""

from __future__ import annotations

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_dicom
from cxrage_ray.decode.dicom_parse import looks_like_acr_nema
from cxrage_ray.decode.messages import plain_reason
from cxrage_ray.decode.raster import decode_raster
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import CxrAgeError, DecodeError, DecompressionBombError, EmptyFileError

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")


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
    if not data:
        raise EmptyFileError("file is empty (0 bytes)")
    if is_dicom(data, name):
        return decode_dicom(data, options)
    try:
        return decode_raster(data, options)
    except Exception as raster_error:  # an extension-less ACR-NEMA file has no magic; try DICOM last
        if looks_like_acr_nema(data):
            return decode_dicom(data, options)
        raise raster_error
