"""DICOM bytes -> `DecodedImage` holding the 8-bit image `dcmj2pnm -O +ot +G` would write (spec §10).

In:  the bytes of one DICOM file (Part-10, or bare ACR-NEMA with no preamble/meta) and `DecodeOptions`.
Out: `decode_dicom`: `DecodedImage` with pixels = that 8-bit image (uint8, each v standing for Q16 v*257),
     shape (H, W, 1), and `meta` for the output columns (`cxrage_ray.decode.dicom_metadata.dicom_meta`).
     For the GPU path the same work in two halves: `encoded_first_frame` (header parsed, refusals applied,
     frame 1's codestream cut out, nothing decoded) and `decode_codestream_cpu` / `decode_stored_frame` (the
     stored values before the mapping, on the CPU).

Pipeline, one module a step:
  `dicom_parse`      parse the header, refuse (modality, missing pixels, absurd size)   -> dataset, meta
  `dicom_frame`      decode frame 1 only (pydicom + pylibjpeg; `dicom_pillow` for JPEG baseline and for
                     reduced-resolution JPEG 2000)                                       -> stored values
  `dicom_window`     the mapping's parameters from the header and the frame             -> `WindowPlan`
  `dicom_greyscale`  the mapping itself (DCMTK 3.6.7 `dcmimgle`, bit-exact)             -> uint8 (H, W)
JPEG 2000 and JPEG-LS, which DCMTK cannot decode, get the same mapping applied to pylibjpeg's output.
See docs/dicom.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom_frame import (
    J2K_SYNTAXES,
    JPEG_DCT_SYNTAXES,
    decode_first_frame,
    encapsulated_frame,
    frame_decoder,
    pydicom_frame,
    repair_sequential_sos,
)
from cxrage_ray.decode.dicom_greyscale import dcmtk_8bit
from cxrage_ray.decode.dicom_parse import parse_checked
from cxrage_ray.decode.dicom_pillow import jpeg_pillow
from cxrage_ray.decode.dicom_values import int_value
from cxrage_ray.decode.dicom_window import GreyscaleParams
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import DecodeError


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
    ds, meta = parse_checked(data, options)
    frame = decode_first_frame(ds, options)
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
    ds, meta = parse_checked(data, options)
    tsyntax = ds.file_meta.TransferSyntaxUID
    codec = "j2k" if tsyntax in J2K_SYNTAXES else "jpeg" if tsyntax in JPEG_DCT_SYNTAXES else "other"
    stream = encapsulated_frame(ds, options) if tsyntax.is_compressed else b""
    if codec == "jpeg":
        stream = repair_sequential_sos(stream)
    return EncodedFrame(codec=codec, codestream=stream, transfer_syntax=str(tsyntax), rows=int_value(ds.Rows, 0),
                        columns=int_value(ds.Columns, 0), samples=int_value(ds.get("SamplesPerPixel"), 1),
                        bits_allocated=int_value(ds.get("BitsAllocated"), 16),
                        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                        planar_configuration=int_value(ds.get("PlanarConfiguration"), 0),
                        params=GreyscaleParams.from_dataset(ds), meta=meta)


def decode_codestream_cpu(frame: EncodedFrame) -> np.ndarray:
    """An encapsulated frame's stored values, decoded on the CPU exactly as `decode_dicom` does
    (Pillow for 8-bit JPEG, else pydicom + pylibjpeg): the fallback of the GPU decoder."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    if not frame.codestream:
        raise DecodeError("no encapsulated frame to decode")
    tsyntax = UID(frame.transfer_syntax)
    if tsyntax in JPEG_DCT_SYNTAXES and frame.bits_allocated == 8:
        pillow = jpeg_pillow(frame.codestream, fast=False)
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
    decoder = frame_decoder(tsyntax)
    plugin = "pylibjpeg" if tsyntax in JPEG_DCT_SYNTAXES else ""
    return pydicom_frame(decoder, header, frame.codestream, plugin)


def decode_stored_frame(data: bytes, options: DecodeOptions = DecodeOptions()) -> tuple[np.ndarray, GreyscaleParams]:
    """Frame 1's stored values (H, W) (sign-extended) or RGB (H, W, 3), and the mapping's parameters:
    `decode_dicom` before `dcmtk_8bit` (exact decode; the CPU fallback of the GPU decoders)."""
    ds, _ = parse_checked(data, options)
    return decode_first_frame(ds, DecodeOptions(mode="exact")), GreyscaleParams.from_dataset(ds)
