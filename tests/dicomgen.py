"""Synthetic DICOM builders for tests and benchmarks (pydicom only; no binary fixtures in the repo).

In:  a pixel array (frames, rows, cols[, samples]) or (rows, cols[, samples]) plus the header fields a
     test cares about.
Out: the bytes of a Part-10 file (or of a deliberately broken one), ready for `decode_dicom`.

Everything not given gets a plausible default for a chest DX, so a test names only what it varies.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
NATIVE_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)


def ramp(rows: int = 64, cols: int = 48, bits: int = 12, signed: bool = False, seed: int = 0) -> np.ndarray:
    """A test image covering the full stored range (both extremes present) plus noise.

    Args:
        rows, cols: image size.
        bits: BitsStored; values span [0, 2^bits-1] or the signed equivalent.
        signed: produce two's complement range values (int16) instead of uint16.
        seed: noise seed.
    """
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    img = rng.integers(lo, hi + 1, size=(rows, cols), dtype=np.int64)
    img[0, 0], img[0, 1] = lo, hi
    img[1, : min(cols, 256)] = np.linspace(lo, hi, min(cols, 256)).astype(np.int64)
    return img.astype(np.int16 if signed else np.uint16)


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    bits_allocated: int | None = None,
    signed: bool | None = None,
    modality: str | None = "DX",
    frames: int | None = None,
    **fields: Any,
) -> Dataset:
    """A complete dataset (with file meta, Explicit VR LE) holding `pixels` natively.

    Args:
        pixels: (rows, cols), (rows, cols, 3), or (frames, rows, cols[, 3]) when `frames` is given.
        photometric: PhotometricInterpretation; RGB/YBR imply 3 samples per pixel.
        bits_stored / bits_allocated / signed: default from the array's dtype.
        modality: Modality, or None to leave it out.
        frames: NumberOfFrames to write (pixels' first axis).
        **fields: any further DICOM keywords, e.g. PatientAge="068Y", RescaleSlope=2.
    """
    color = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    arr = np.asarray(pixels)
    if signed is None:
        signed = arr.dtype.kind == "i"
    if bits_allocated is None:
        bits_allocated = 8 if arr.dtype.itemsize == 1 else 16
    if bits_stored is None:
        bits_stored = bits_allocated
    shape = arr.shape[1:] if frames else arr.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN-0001"
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames:
        ds.NumberOfFrames = frames
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    dtype = {(8, False): "<u1", (8, True): "<i1", (16, False): "<u2", (16, True): "<i2"}[(bits_allocated, bool(signed))]
    ds.PixelData = arr.astype(dtype).tobytes()
    return ds


def to_bytes(ds: Dataset, transfer_syntax: str | None = None, *, acr_nema: bool = False) -> bytes:
    """Serialise a dataset, optionally re-encoding it to a native `transfer_syntax` or as ACR-NEMA
    (no preamble, no file meta: the bare implicit VR little endian dataset)."""
    buf = io.BytesIO()
    if acr_nema:
        ds = copy.deepcopy(ds)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return buf.getvalue()
    if transfer_syntax is not None and transfer_syntax != ds.file_meta.TransferSyntaxUID:
        ds = copy.deepcopy(ds)
        if transfer_syntax == ExplicitVRBigEndian and ds.BitsAllocated == 16:
            arr = np.frombuffer(ds.PixelData, "<u2")
            ds.PixelData = arr.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(pixels: np.ndarray, transfer_syntax: str | None = None, **kw: Any) -> bytes:
    """`make_dataset` + `to_bytes` in one call."""
    return to_bytes(make_dataset(pixels, **kw), transfer_syntax)


def compressed(ds: Dataset, transfer_syntax: str, **encode_kw: Any) -> bytes:
    """Re-encode a native dataset with pydicom's encoders (RLE, JPEG 2000 via pylibjpeg-openjpeg)."""
    ds = copy.deepcopy(ds)
    ds.compress(transfer_syntax, **encode_kw)
    return to_bytes(ds)


def jpeg_baseline(gray8: np.ndarray, quality: int = 90, **kw: Any) -> bytes:
    """An 8-bit MONOCHROME2 JPEG Baseline DICOM, encoded by Pillow and encapsulated."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(gray8, dtype=np.uint8), "L").save(out, "JPEG", quality=quality)
    ds = make_dataset(np.asarray(gray8, dtype=np.uint8), **kw)
    ds.PixelData = encapsulate([out.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return to_bytes(ds)


def bomb_header(rows: int = 60000, cols: int = 60000) -> bytes:
    """A small file whose header declares an absurd image: only the header may be read."""
    ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12)
    ds.Rows, ds.Columns = rows, cols
    return to_bytes(ds)


def without_pixel_data(**kw: Any) -> bytes:
    """A valid DICOM (e.g. a structured report lookalike) with no PixelData element."""
    ds = make_dataset(np.zeros((4, 4), np.uint16), bits_stored=12, **kw)
    del ds.PixelData
    return to_bytes(ds)


def read(data: bytes) -> Dataset:
    """Parse bytes back (helper for tests that inspect what they built)."""
    return pydicom.dcmread(io.BytesIO(data), force=True)
