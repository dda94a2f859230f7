"""DICOM bytes -> `DecodedImage` holding the 8-bit image `dcmj2pnm -O +ot +G` would write (spec §10).

In:  the bytes of one DICOM file (Part-10, or bare ACR-NEMA with no preamble/meta) and `DecodeOptions`.
Out: `DecodedImage` with pixels = that 8-bit image (uint8, each v standing for Q16 v*257), shape (H, W, 1),
     and `meta` for the
     output columns (modality, view_position, body_part, patient_sex, study_date, chronological_age,
     frames, photometric, transfer_syntax, image_laterality, patient_orientation[, patient_id_hash]).

Pipeline: parse header -> refuse (modality, missing pixels, absurd size) -> decode frame 1 only
(pydicom + pylibjpeg; Pillow for JPEG baseline and for reduced-resolution JPEG 2000) -> `dcmtk_8bit`.

The 8-bit mapping reproduces DCMTK 3.6.7 `dcmimgle` (`dimoipxt.h: rescale/modlut`,
`dimoopxt.h: nowindow`) including its double arithmetic, C truncation and the look-up-table path it
takes for large images, so it is bit-exact where DCMTK can read the file at all; JPEG 2000 and JPEG-LS,
which DCMTK cannot decode, get the same mapping applied to pylibjpeg's output. See docs/dicom.md.
Patient name and ID never leave this module (only a salted hash, when asked).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.image import FAST_DECODE_MIN_SIDE, DecodedImage
from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.decode.messages import plain_reason
from cxrage_ray.errors import DecodeError, DecompressionBombError, UnsupportedModalityError

#: Modalities scored by default: computed / digital radiography and conventional radiography (film).
#: Missing Modality (old ACR-NEMA files) is accepted too; everything else needs allow_any_modality.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})

_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
#: DCMTK's +G weights (dcmj2pnm: `--grayscale`), applied in this order in double precision.
_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_VR_CODES = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


# ----------------------------------------------------------------------------------------------- API


def decode_dicom(data: bytes, options: DecodeOptions = DecodeOptions()) -> DecodedImage:
    """Decode one DICOM file to the 8-bit image dcmj2pnm writes, uint8 (H, W, 1).

    Args:
        data: the whole file.
        options: decode mode (fast/exact), modality policy, patient-id salt, size limit.

    Raises:
        DecodeError: not DICOM, truncated, no pixel data, corrupt stream, unsupported layout.
        UnsupportedModalityError: modality is not a radiograph and `allow_any_modality` is False.
        DecompressionBombError: Rows x Columns exceeds `options.max_pixels` (checked before decoding).
    """
    ds, meta = _parse_checked(data, options)
    frame = _decode_first_frame(ds, options)
    params = GreyscaleParams.from_dataset(ds)
    del ds  # its copy of the pixel data (2 B a pixel for a native file) is not needed by the mapping
    grey = dcmtk_8bit(frame, params)
    del frame
    return DecodedImage(pixels=grey[..., None], meta=meta)  # 8-bit, as `DecodedImage` keeps 8-bit films


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """Frame 1 of a DICOM file, header parsed and refusals applied, pixels not yet decoded.

    What a GPU decoder needs (the codestream) and what the mapping needs afterwards (`params`), cheap to
    produce on a CPU (no decompression) and small to ship.

    Attributes:
        codec: "j2k" (JPEG 2000 / HTJ2K), "jpeg" (JPEG baseline/extended) or "other" (native, RLE,
            JPEG-LS, JPEG lossless, ...: decoded on the CPU).
        codestream: the encapsulated frame's bytes (empty for native data).
        rows, columns, samples, bits_allocated: the header's pixel description.
        params: the dcmj2pnm mapping's parameters.
        meta: the output columns (`dicom_meta`).
    """

    codec: str
    codestream: bytes
    transfer_syntax: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    photometric: str
    planar_configuration: int
    params: GreyscaleParams
    meta: dict


def encoded_first_frame(data: bytes, options: DecodeOptions = DecodeOptions()) -> EncodedFrame:
    """Parse a DICOM file's header and cut out frame 1's codestream (no decoding); same refusals as
    `decode_dicom` (modality, missing pixels, declared size)."""
    ds, meta = _parse_checked(data, options)
    tsyntax = ds.file_meta.TransferSyntaxUID
    codec = "j2k" if tsyntax in _J2K_SYNTAXES else "jpeg" if tsyntax in _JPEG_DCT_SYNTAXES else "other"
    stream = _encapsulated_frame(ds, options) if tsyntax.is_compressed else b""
    if codec == "jpeg":
        stream = repair_sequential_sos(stream)
    return EncodedFrame(codec=codec, codestream=stream, transfer_syntax=str(tsyntax), rows=_int(ds.Rows, 0),
                        columns=_int(ds.Columns, 0), samples=_int(ds.get("SamplesPerPixel"), 1),
                        bits_allocated=_int(ds.get("BitsAllocated"), 16),
                        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                        planar_configuration=_int(ds.get("PlanarConfiguration"), 0),
                        params=GreyscaleParams.from_dataset(ds), meta=meta)


def decode_codestream_cpu(frame: EncodedFrame) -> np.ndarray:
    """An encapsulated frame's stored values, decoded on the CPU exactly as `decode_dicom` does
    (Pillow for 8-bit JPEG, else pydicom + pylibjpeg): the fallback of the GPU decoder."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if not frame.codestream:
        raise DecodeError("no encapsulated frame to decode")
    tsyntax = UID(frame.transfer_syntax)
    if tsyntax in _JPEG_DCT_SYNTAXES and frame.bits_allocated == 8:
        pillow = _jpeg_pillow(frame.codestream, None, fast=False)
        if pillow is not None:
            return pillow
    header = Dataset()
    header.file_meta = FileMetaDataset()
    header.file_meta.TransferSyntaxUID = tsyntax
    header.Rows, header.Columns, header.SamplesPerPixel = frame.rows, frame.columns, frame.samples
    header.BitsAllocated, header.BitsStored = frame.bits_allocated, frame.params.bits_stored
    header.PixelRepresentation = int(frame.params.signed)
    header.PhotometricInterpretation = frame.photometric
    header.PlanarConfiguration = frame.planar_configuration
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DecodeError(f"unsupported transfer syntax {tsyntax} ({tsyntax.name})") from None
    plugin = "pylibjpeg" if tsyntax in _JPEG_DCT_SYNTAXES else ""
    return _pydicom_frame(decoder, header, frame.codestream, plugin)


def decode_stored_frame(data: bytes, options: DecodeOptions = DecodeOptions()) -> tuple[np.ndarray, GreyscaleParams]:
    """Frame 1's stored values (H, W) (sign-extended) or RGB (H, W, 3), and the mapping's parameters:
    `decode_dicom` before `dcmtk_8bit` (exact decode; the CPU fallback of the GPU decoders)."""
    ds, _ = _parse_checked(data, options)
    return _decode_first_frame(ds, DecodeOptions(mode="exact")), GreyscaleParams.from_dataset(ds)


def _parse_checked(data: bytes, options: DecodeOptions) -> tuple[Any, dict[str, Any]]:
    """Parsed dataset and its metadata, after the refusals that need no pixel decoding."""
    ds = _parse(data)
    meta = dicom_meta(ds, options)
    modality = meta["modality"]
    if not options.allow_any_modality and modality is not None and modality not in RADIOGRAPH_MODALITIES:
        raise UnsupportedModalityError(
            f"modality {modality!r} is not a radiograph (accepted: {', '.join(sorted(RADIOGRAPH_MODALITIES))}); "
            "use --allow-any-modality to score it anyway"
        )
    _check_pixel_header(ds, options)
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


def parse_patient_age(text: Any) -> float | None:
    """PatientAge in years from every real-world form: `068Y`, `68`, `6M`, `012W`, `003D`, `68 Y`.

    Returns None for empty or unparsable values. Implausible ages are returned as they are: the QC step
    (`cxrage_ray.orient.stage.plausible_age`) nulls them and flags the row `age_implausible`, so they are seen.
    """
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWDymwd]?)\s*", str(text))
    if not match:
        return None
    value = float(match.group(1))
    unit = match.group(2).upper() or "Y"
    years = {"Y": value, "M": value / 12.0, "W": value * 7.0 / 365.25, "D": value / 365.25}[unit]
    return years


def chronological_age(ds: Any) -> float | None:
    """Age at the study in years: PatientAge when parsable, else (StudyDate - PatientBirthDate).

    When StudyDate is absent the acquisition, series or content date stands in for it.
    """
    age = parse_patient_age(ds.get("PatientAge"))
    if age is not None:
        return age
    birth = _parse_da(ds.get("PatientBirthDate"))
    if birth is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate", "SeriesDate", "ContentDate"):
        when = _parse_da(ds.get(keyword))
        if when is not None:
            return (when - birth).days / 365.25  # implausible values are flagged later, not dropped here
    return None


def _anatomic_region(ds: Any) -> str | None:
    """AnatomicRegionSequence's first item as "CODE MEANING" (upper case), or None."""
    try:
        items = ds.get("AnatomicRegionSequence") or []
        if not items:
            return None
        item = items[0]
        text = " ".join(str(v) for v in (item.get("CodeValue"), item.get("CodeMeaning")) if v)
        return text.upper() or None
    except Exception:  # a malformed sequence must not cost the film its score
        return None


def dicom_meta(ds: Any, options: DecodeOptions) -> dict[str, Any]:
    """Output-column metadata of a dataset; never the raw patient name or ID."""
    study_date = _parse_da(ds.get("StudyDate"))
    meta: dict[str, Any] = {
        "modality": _text(ds.get("Modality"), upper=True),
        "view_position": _text(ds.get("ViewPosition"), upper=True),
        "body_part": _text(ds.get("BodyPartExamined"), upper=True),
        "patient_sex": _text(ds.get("PatientSex"), upper=True),
        "study_date": study_date.isoformat() if study_date else None,
        "chronological_age": chronological_age(ds),
        "frames": _int(ds.get("NumberOfFrames"), 1) or 1,
        "photometric": _text(ds.get("PhotometricInterpretation"), upper=True),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "image_laterality": _text(ds.get("ImageLaterality") or ds.get("Laterality"), upper=True),
        "patient_orientation": _text(ds.get("PatientOrientation"), upper=True),
        # what the film shows, for the non_chest QC flag (cxrage_ray.orient.stage.dicom_non_chest)
        "study_description": _text(ds.get("StudyDescription"), upper=True),
        "series_description": _text(ds.get("SeriesDescription"), upper=True),
        "protocol_name": _text(ds.get("ProtocolName"), upper=True),
        "anatomic_region": _anatomic_region(ds),
    }
    if options.patient_id_salt is not None:
        patient_id = str(ds.get("PatientID", "") or "")
        meta["patient_id_hash"] = (
            hashlib.sha256((options.patient_id_salt + patient_id).encode("utf-8")).hexdigest() if patient_id else None
        )
    return meta


# ------------------------------------------------------------------------------ the dcmj2pnm mapping


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
        samples = _int(ds.get("SamplesPerPixel"), 1)
        bits = _int(ds.get("BitsStored"), 0) or _int(ds.get("BitsAllocated"), 16)
        signed = _int(ds.get("PixelRepresentation"), 0) == 1
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
        slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
        if slope is None or intercept is None or slope == 0.0:
            slope = intercept = None
        return cls(bits, signed, invert=invert, slope=slope, intercept=intercept)


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
    window = _window(frame, params)
    out = np.empty(frame.shape[:2], dtype=np.uint8)
    for top in range(0, frame.shape[0], MAP_BAND_ROWS):
        out[top:top + MAP_BAND_ROWS] = _nowindow(_modality_values(frame[top:top + MAP_BAND_ROWS], params), *window)
    return out


def _window(frame: np.ndarray, params: GreyscaleParams) -> tuple[float, float, bool, int, int]:
    """`_nowindow`'s whole-frame arguments: (absmin, absmax, invert, intermediate size, pixel count)."""
    bits = params.bits_stored
    if params.colour:  # DiColorMonoTemplate: 0..2^b-1 -> 0..255, a 4-byte intermediate
        return 0.0, float((1 << bits) - 1), False, 4, frame.shape[0] * frame.shape[1]
    if params.signed:
        absmin, absmax = float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    else:
        absmin, absmax = 0.0, float((1 << bits) - 1)
    if params.lut_data is not None:
        absmin, absmax = 0.0, float((1 << params.lut_bits) - 1)
        lo, hi = float(params.lut_data.min()), float(params.lut_data.max())
    elif params.slope is not None:
        slope, intercept = params.slope, params.intercept
        lo, hi = float(frame.min()) * slope + intercept, float(frame.max()) * slope + intercept
        absmin, absmax = absmin * slope + intercept, absmax * slope + intercept
        if slope < 0:
            absmin, absmax = absmax, absmin
            lo, hi = hi, lo
    else:
        lo, hi = float(frame.min()), float(frame.max())
    count = frame[..., 0].size if frame.ndim == 3 else frame.size
    return absmin, absmax, params.invert, _representation_size(lo, hi), count


def _modality_values(band: np.ndarray, params: GreyscaleParams) -> np.ndarray:
    """float64 values of some rows after DCMTK's colour-to-grey or modality transform (per value)."""
    if params.colour:  # DiColorMonoTemplate: T(r*0.299 + g*0.587 + b*0.114)
        rgb = band.astype(np.float64)
        return np.trunc(rgb[..., 0] * _GREY_WEIGHTS[0] + rgb[..., 1] * _GREY_WEIGHTS[1] + rgb[..., 2] * _GREY_WEIGHTS[2])
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


def _nowindow(values: np.ndarray, absmin: float, absmax: float, invert: bool, inter_size: int, count: int) -> np.ndarray:
    """dimoopxt.h `nowindow` without presentation/display LUT (VOI NONE #6 and #8)."""
    low, high = (255.0, 0.0) if invert else (0.0, 255.0)
    absrange = absmax - absmin + 1.0
    gradient = (high - low + 1.0) / absrange
    ocnt = int(absrange) if absrange <= 10_000_000.0 else 0
    if inter_size <= 2 and ocnt > 0 and count > 3 * ocnt:
        # LUT path: entry i = low + i*gradient, indexed by v - (integer cast of absmin)
        offset = values - float(int(absmin))
    else:
        offset = values - absmin
    out = np.trunc(low + offset * gradient)
    return np.clip(out, 0, 255).astype(np.uint8)


def _representation_size(lo: float, hi: float) -> int:
    """Bytes of DCMTK's intermediate integer type for the value range (determineRepresentation)."""
    if lo < 0:
        if lo >= -128 and hi <= 127:
            return 1
        return 2 if lo >= -32768 and hi <= 32767 else 4
    if hi <= 255:
        return 1
    return 2 if hi <= 65535 else 4


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
    if _int(ds.get("PixelRepresentation"), 0) == 1 and first >= 32768:
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


# ------------------------------------------------------------------------------------------ parsing


def _parse(data: bytes) -> Any:
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
        raise DecodeError(f"unreadable DICOM header or truncated file: {_short(e)}") from None
    except Exception as e:  # pydicom raises assorted types on garbage; never let one escape
        raise DecodeError(f"unreadable DICOM: {type(e).__name__}: {_short(e)}") from None
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise DecodeError(f"truncated DICOM file: {_short(eof[0].replace(' in file <no filename>', ''))}")
    if len(ds) == 0:
        raise DecodeError("not a DICOM file or truncated: no data elements could be read")
    if "TransferSyntaxUID" not in ds.file_meta:  # ACR-NEMA: use the encoding the reader detected
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little in (True, None) else _EXPLICIT_BE)
        )
    return ds


def _check_pixel_header(ds: Any, options: DecodeOptions) -> None:
    """Refuse files without a usable image before any pixel data is decompressed."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"only {other[0]}" if other else "no PixelData element"
        raise DecodeError(f"DICOM has {what} (not an image, e.g. a report or presentation state)")
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"DICOM image has invalid size Rows={rows} Columns={cols}")
    if rows * cols > options.max_pixels:
        raise DecompressionBombError(
            f"declared image size {cols}x{rows} = {rows * cols} pixels exceeds the limit of {options.max_pixels}"
        )
    check_fill_aspect(cols, rows)
    samples = _int(ds.get("SamplesPerPixel"), 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples not in (1, 3) or (samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2", "")):
        raise DecodeError(f"unsupported pixel layout: {samples} samples, PhotometricInterpretation {photometric!r}")
    bits_allocated, bits_stored = _int(ds.get("BitsAllocated"), 0), _int(ds.get("BitsStored"), 0)
    if bits_allocated not in (1, 8, 16, 32) or not 1 <= bits_stored <= min(bits_allocated, 16):
        raise DecodeError(f"unsupported bit depth: BitsAllocated={bits_allocated} BitsStored={bits_stored}")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = _int(ds.get("NumberOfFrames"), 1) or 1
        frame_bytes = rows * cols * samples * bits_allocated // 8
        if len(ds.PixelData) < frame_bytes:
            raise DecodeError(
                f"truncated pixel data: {len(ds.PixelData)} bytes, frame 1 needs {frame_bytes} "
                f"({cols}x{rows}x{samples}, {bits_allocated} bits; {frames} frame(s) declared)"
            )


# ------------------------------------------------------------------------------------------ decoding


def _decode_first_frame(ds: Any, options: DecodeOptions) -> np.ndarray:
    """Frame 1 as stored values: (H, W) sign-extended to BitsStored, or (H, W, 3) RGB.

    `fast` mode may return a reduced-resolution frame (JPEG 2000 resolution levels, JPEG DCT scaling).
    """
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DecodeError(f"unsupported transfer syntax {tsyntax} ({tsyntax.name})") from None
    if not tsyntax.is_compressed:
        return _pydicom_frame(decoder, ds, None, "")
    frame_bytes = _encapsulated_frame(ds, options)
    fast = options.mode == "fast"
    if tsyntax in _J2K_SYNTAXES and fast:
        reduced = _j2k_reduced(frame_bytes, ds)
        if reduced is not None:
            return reduced
    if tsyntax in _JPEG_DCT_SYNTAXES:
        frame_bytes = repair_sequential_sos(frame_bytes)
        if _int(ds.get("BitsAllocated"), 8) == 8:
            pillow = _jpeg_pillow(frame_bytes, ds, fast)
            if pillow is not None:
                return pillow
        return _pydicom_frame(decoder, ds, frame_bytes, "pylibjpeg")
    return _pydicom_frame(decoder, ds, frame_bytes, "")


def _encapsulated_frame(ds: Any, options: DecodeOptions = DecodeOptions()) -> bytes:
    """Frame 1's codestream, after checking the size it declares (`limits.check_codestream`)."""
    from pydicom.encaps import get_frame

    from cxrage_ray.decode.limits import check_codestream

    frames = _int(ds.get("NumberOfFrames"), 1) or 1
    try:
        stream = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as e:
        raise DecodeError(f"corrupt or truncated encapsulated pixel data: {plain_reason(e)}") from e
    check_codestream(stream, _int(ds.Rows, 0), _int(ds.Columns, 0), options.max_pixels)
    return stream


def _pydicom_frame(decoder: Any, ds: Any, frame_bytes: bytes | None, plugin: str) -> np.ndarray:
    """Decode one frame with pydicom (native data, or one encapsulated frame); errors -> DecodeError."""
    from pydicom.encaps import encapsulate

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if frame_bytes is None:
                arr, _ = decoder.as_array(ds, index=0)
            else:
                arr, _ = decoder.as_array(
                    encapsulate([frame_bytes]),
                    decoding_plugin=plugin,
                    rows=_int(ds.Rows, 0),
                    columns=_int(ds.Columns, 0),
                    samples_per_pixel=_int(ds.get("SamplesPerPixel"), 1),
                    bits_allocated=_int(ds.BitsAllocated, 16),
                    bits_stored=_int(ds.BitsStored, 16),
                    pixel_representation=_int(ds.get("PixelRepresentation"), 0),
                    photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                    planar_configuration=_int(ds.get("PlanarConfiguration"), 0),
                    number_of_frames=1,
                    pixel_keyword="PixelData",
                )
    except Exception as e:
        tsyntax = ds.file_meta.TransferSyntaxUID
        # the library's words name its internals (e.g. a numpy broadcast of 900000000 into 262144 values)
        raise DecodeError(f"cannot decode {tsyntax.name} pixel data: {plain_reason(e)}") from e
    if arr.ndim == 3 and arr.shape[-1] != 3:  # (frames, H, W) from a native multi-frame read
        arr = arr[0]
    return arr


def _j2k_reduced(codestream: bytes, ds: Any) -> np.ndarray | None:
    """Frame 1 of a JPEG 2000 stream at the coarsest resolution level that keeps the short side
    >= FAST_DECODE_MIN_SIDE; None when no level qualifies or Pillow cannot decode the stream
    (the caller then decodes at full resolution)."""
    header = _j2k_header(codestream)
    if header is None:
        return None
    levels = header[2]
    rows, cols = _int(ds.Rows, 0), _int(ds.Columns, 0)
    reduce = 0
    while reduce < levels and -(-min(rows, cols) // (2 ** (reduce + 1))) >= FAST_DECODE_MIN_SIDE:
        reduce += 1
    stored = decode_j2k_pillow(codestream, ds, reduce) if reduce else None
    if stored is None:
        return None
    stored = j2k_phase_align(stored, reduce, (1 << min(_int(ds.get("BitsStored"), 16), 16)) - 1)
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


def crop_to_fill_grid(image: np.ndarray, full_rows: int, full_cols: int) -> np.ndarray:
    """Drop the last row/column of a reduced image when that makes the seed chain's 512 px
    `-resize ^` geometry equal the full-resolution image's.

    Reduced decoders round odd sizes up (ceil(n / 2^r)), which can make the fill size differ by one
    output pixel from the exact path (e.g. 2517 px -> 629 exact, 1259 -> 630 fast); a one-pixel
    different picture shifts every fastai view. Untrimmed films are the common case, so the full
    image's geometry is the target.

    Args:
        image: (h, w[, c]) reduced image.
        full_rows, full_cols: the full-resolution size.
    """
    from cxrage_ray.preprocess.seed_chain import fill_size

    h, w = image.shape[:2]
    want = fill_size(full_cols, full_rows)
    for dh, dw in ((0, 0), (0, 1), (1, 0), (1, 1)):
        if h - dh > 0 and w - dw > 0 and fill_size(w - dw, h - dh) == want:
            return image[: h - dh, : w - dw]
    return image


def decode_j2k_pillow(codestream: bytes, ds: Any, reduce: int) -> np.ndarray | None:
    """Greyscale unsigned JPEG 2000 via Pillow's OpenJPEG with `reduce` resolution levels dropped.

    Returns stored values like pydicom's decoder (Pillow's scaling to 16 bits undone, masked to
    BitsStored), or None for what this path does not handle (colour, signed, Pillow errors).
    """
    from PIL import Image

    header = _j2k_header(codestream)
    if header is None or _int(ds.get("SamplesPerPixel"), 1) != 1 or _int(ds.get("PixelRepresentation"), 0):
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
    bits = _int(ds.get("BitsStored"), precision)
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


def _jpeg_pillow(stream: bytes, ds: Any, fast: bool) -> np.ndarray | None:
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


def repair_sequential_sos(stream: bytes) -> bytes:
    """Set Ss=0, Se=63, Ah=Al=0 in the SOS of a sequential (SOF0/SOF1) JPEG.

    Some WG04 streams carry Se=0; IJG (DCMTK) warns and decodes them as sequential anyway, libjpeg
    (pylibjpeg) refuses. Patching the four bits reproduces what IJG does.
    """
    pos, sequential = 2, False
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1):
            sequential = True
        elif marker == 0xDA:
            if not sequential or pos + 2 + length > len(stream):
                return stream
            tail = pos + 2 + length - 3  # Ss, Se, Ah/Al
            if stream[tail : tail + 3] == b"\x00\x3f\x00":
                return stream
            return stream[:tail] + b"\x00\x3f\x00" + stream[tail + 3 :]
        pos += 2 + length
    return stream


# ------------------------------------------------------------------------------------------ helpers


def _parse_da(value: Any) -> dt.date | None:
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _text(value: Any, upper: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v).strip() for v in value)
    else:
        text = str(value).strip()
    if not text:
        return None
    return text.upper() if upper else text


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
