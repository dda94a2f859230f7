"""Frame 1 of a checked DICOM dataset -> its stored values (pydicom + pylibjpeg, Pillow where it is exact).

In:  a dataset from `cxrage_ray.decode.dicom_parse.parse_checked` and `DecodeOptions` (mode, max_pixels).
Out: numpy stored values, (H, W) sign-extended to BitsStored or (H, W, 3) RGB; in `fast` mode possibly a
     reduced-resolution frame (`cxrage_ray.decode.dicom_pillow`). Also the pieces the GPU path reuses: the
     transfer-syntax families, frame 1's codestream (`encapsulated_frame`, size-checked before decoding) and
     the repair of sequential JPEG scans that IJG accepts and libjpeg refuses.

Any decoder failure leaves as `DecodeError` with a plain reason (`cxrage_ray.decode.messages`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom_pillow import j2k_reduced, jpeg_pillow
from cxrage_ray.decode.dicom_values import int_value
from cxrage_ray.decode.limits import check_codestream
from cxrage_ray.decode.messages import plain_reason
from cxrage_ray.errors import DecodeError

J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def decode_first_frame(ds: Any, options: DecodeOptions) -> np.ndarray:
    """Frame 1 as stored values: (H, W) sign-extended to BitsStored, or (H, W, 3) RGB.

    `fast` mode may return a reduced-resolution frame (JPEG 2000 resolution levels, JPEG DCT scaling).
    """
    tsyntax = ds.file_meta.TransferSyntaxUID
    decoder = frame_decoder(tsyntax)
    if not tsyntax.is_compressed:
        return pydicom_frame(decoder, ds, None, "")
    frame_bytes = encapsulated_frame(ds, options)
    fast = options.mode == "fast"
    if tsyntax in J2K_SYNTAXES and fast:
        reduced = j2k_reduced(frame_bytes, ds)
        if reduced is not None:
            return reduced
    if tsyntax in JPEG_DCT_SYNTAXES:
        frame_bytes = repair_sequential_sos(frame_bytes)
        if int_value(ds.get("BitsAllocated"), 8) == 8:
            pillow = jpeg_pillow(frame_bytes, fast)
            if pillow is not None:
                return pillow
        return pydicom_frame(decoder, ds, frame_bytes, "pylibjpeg")
    return pydicom_frame(decoder, ds, frame_bytes, "")


def frame_decoder(tsyntax: Any) -> Any:
    """pydicom's decoder for a transfer syntax; `DecodeError` when it has none."""
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(tsyntax)
    except NotImplementedError:
        raise DecodeError(f"unsupported transfer syntax {tsyntax} ({tsyntax.name})") from None


def encapsulated_frame(ds: Any, options: DecodeOptions = DecodeOptions()) -> bytes:
    """Frame 1's codestream, after checking the size it declares (`limits.check_codestream`)."""
    from pydicom.encaps import get_frame

    frames = int_value(ds.get("NumberOfFrames"), 1) or 1
    try:
        stream = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as e:
        raise DecodeError(f"corrupt or truncated encapsulated pixel data: {plain_reason(e)}") from e
    check_codestream(stream, int_value(ds.Rows, 0), int_value(ds.Columns, 0), options.max_pixels)
    return stream


def pydicom_frame(decoder: Any, ds: Any, frame_bytes: bytes | None, plugin: str) -> np.ndarray:
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
                    rows=int_value(ds.Rows, 0),
                    columns=int_value(ds.Columns, 0),
                    samples_per_pixel=int_value(ds.get("SamplesPerPixel"), 1),
                    bits_allocated=int_value(ds.BitsAllocated, 16),
                    bits_stored=int_value(ds.BitsStored, 16),
                    pixel_representation=int_value(ds.get("PixelRepresentation"), 0),
                    photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                    planar_configuration=int_value(ds.get("PlanarConfiguration"), 0),
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
