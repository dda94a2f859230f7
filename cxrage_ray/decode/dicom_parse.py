"""DICOM bytes -> a parsed, checked pydicom dataset and its output columns; no pixel is decoded.

In:  the bytes of one DICOM file (Part-10, or bare ACR-NEMA with no preamble/meta) and `DecodeOptions`.
Out: `parse_checked`: (dataset, `dicom_meta` columns), after every refusal that needs no pixel decoding — not
     DICOM or truncated header (`DecodeError`), a modality that is not a radiograph (`UnsupportedModalityError`),
     no usable pixel data or layout (`DecodeError`), a declared size over the limit (`DecompressionBombError`).
     `looks_like_acr_nema` tells a preamble-less dataset from other bytes.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom_metadata import dicom_meta
from cxrage_ray.decode.dicom_values import int_value, short_text
from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.errors import DecodeError, DecompressionBombError, UnsupportedModalityError

#: Modalities scored by default: computed / digital radiography and conventional radiography (film).
#: Missing Modality (old ACR-NEMA files) is accepted too; everything else needs allow_any_modality.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_VR_CODES = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def parse_checked(data: bytes, options: DecodeOptions) -> tuple[Any, dict[str, Any]]:
    """Parsed dataset and its metadata, after the refusals that need no pixel decoding."""
    ds = parse_dataset(data)
    meta = dicom_meta(ds, options)
    modality = meta["modality"]
    if not options.allow_any_modality and modality is not None and modality not in RADIOGRAPH_MODALITIES:
        raise UnsupportedModalityError(
            f"modality {modality!r} is not a radiograph (accepted: {', '.join(sorted(RADIOGRAPH_MODALITIES))}); "
            "use --allow-any-modality to score it anyway"
        )
    check_pixel_header(ds, options)
    return ds, meta


def looks_like_acr_nema(data: bytes) -> bool:
    """True when `data` starts like a bare ACR-NEMA / preamble-less DICOM dataset.

    The first element must be in group 0x0008 (or a 0x0000/0x0002 group length) in little or big
    endian, followed either by a valid two-letter VR (explicit VR) or by a 4-byte length that fits
    the file (implicit VR).
    """
    if len(data) < 12:
        return False
    for order in ("<", ">"):
        group, element = np.frombuffer(data[:4], dtype=f"{order}u2")
        if int(group) not in (0x0000, 0x0002, 0x0008):
            continue
        if data[4:6] in _VR_CODES:
            return True
        length = int(np.frombuffer(data[4:8], dtype=f"{order}u4")[0])
        if order == "<" and 0 < length <= len(data) - 8 and (int(element) != 0 or length == 4):
            return True
    return False


def parse_dataset(data: bytes) -> Any:
    """Header + pixel element, or DecodeError for anything that is not a readable DICOM dataset."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_magic and not looks_like_acr_nema(data):
        raise DecodeError("not a DICOM file: no 'DICM' marker at byte 128 and no ACR-NEMA header")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, IndexError) as e:
        raise DecodeError(f"unreadable DICOM header or truncated file: {short_text(e)}") from None
    except Exception as e:  # pydicom raises assorted types on garbage; never let one escape
        raise DecodeError(f"unreadable DICOM: {type(e).__name__}: {short_text(e)}") from None
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise DecodeError(f"truncated DICOM file: {short_text(eof[0].replace(' in file <no filename>', ''))}")
    if len(ds) == 0:
        raise DecodeError("not a DICOM file or truncated: no data elements could be read")
    if "TransferSyntaxUID" not in ds.file_meta:  # ACR-NEMA: use the encoding the reader detected
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little in (True, None) else _EXPLICIT_BE)
        )
    return ds


def check_pixel_header(ds: Any, options: DecodeOptions) -> None:
    """Refuse files without a usable image before any pixel data is decompressed."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"only {other[0]}" if other else "no PixelData element"
        raise DecodeError(f"DICOM has {what} (not an image, e.g. a report or presentation state)")
    rows, cols = int_value(ds.get("Rows"), 0), int_value(ds.get("Columns"), 0)
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"DICOM image has invalid size Rows={rows} Columns={cols}")
    if rows * cols > options.max_pixels:
        raise DecompressionBombError(
            f"declared image size {cols}x{rows} = {rows * cols} pixels exceeds the limit of {options.max_pixels}"
        )
    check_fill_aspect(cols, rows)
    samples = int_value(ds.get("SamplesPerPixel"), 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples not in (1, 3) or (samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2", "")):
        raise DecodeError(f"unsupported pixel layout: {samples} samples, PhotometricInterpretation {photometric!r}")
    bits_allocated, bits_stored = int_value(ds.get("BitsAllocated"), 0), int_value(ds.get("BitsStored"), 0)
    if bits_allocated not in (1, 8, 16, 32) or not 1 <= bits_stored <= min(bits_allocated, 16):
        raise DecodeError(f"unsupported bit depth: BitsAllocated={bits_allocated} BitsStored={bits_stored}")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = int_value(ds.get("NumberOfFrames"), 1) or 1
        frame_bytes = rows * cols * samples * bits_allocated // 8
        if len(ds.PixelData) < frame_bytes:
            raise DecodeError(
                f"truncated pixel data: {len(ds.PixelData)} bytes, frame 1 needs {frame_bytes} "
                f"({cols}x{rows}x{samples}, {bits_allocated} bits; {frames} frame(s) declared)"
            )
