"""The memory budget of one film, checked before a pixel is allocated.

In:  the sizes a file declares — a DICOM header's Rows x Columns, and the size declared *inside* its
     codestream (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) — or a picture's size before the seed chain's fill resize.
Out: nothing, or `DecompressionBombError` / `DecodeError` saying what was refused and why.

A 27 KB DICOM whose header says 512² but whose JPEG SOF says 30000² made the decoder allocate 4.4 GB before
failing with a numpy broadcast error; a 1,964-byte 5 x 5000 PNG became a 512 x 512,000 picture in the seed
chain's `-resize 512x512^` (6.2 GB). Both are refused here, in microseconds, with a message a user can act on.
"""

from __future__ import annotations

from cxrage_ray.decode.geometry import FILL_TARGET
from cxrage_ray.errors import DecodeError, DecompressionBombError

#: The seed chain fills 512 x 512, so the long side becomes 512 x aspect: beyond this aspect ratio (a 512 x 8192
#: picture, 4 M pixels, ~100 MB of float64 work) the input is no radiograph and resizing it only costs memory.
MAX_FILL_ASPECT = 16.0

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOF0-15 but DHT/JPG/DAC; JPEG-LS SOF55


def codestream_size(stream: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG / JPEG-LS / JPEG 2000 codestream declares, or None when it declares none we read."""
    if stream[:2] == b"\xff\xd8":
        return _jpeg_size(stream)
    # a raw codestream starts with SOC + SIZ; a JP2 file wraps it in boxes (signature box first). Anything else
    # (RLE, native data) may hold those bytes by chance and is not parsed.
    start = 0 if stream[:4] == b"\xff\x4f\xff\x51" else stream.find(b"\xff\x4f\xff\x51") if stream[4:8] == b"jP  " else -1
    if start >= 0 and len(stream) >= start + 4 + 2 + 2 + 16:
        body = stream[start + 6:]  # after SOC, SIZ marker and Lsiz: Rsiz, Xsiz, Ysiz, XOsiz, YOsiz
        x, y, xo, yo = (int.from_bytes(body[k:k + 4], "big") for k in (2, 6, 10, 14))
        return max(0, x - xo), max(0, y - yo)
    return None


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF and pos + 9 <= len(stream):
            height = int.from_bytes(stream[pos + 5:pos + 7], "big")
            width = int.from_bytes(stream[pos + 7:pos + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def check_codestream(stream: bytes, rows: int, columns: int, max_pixels: int) -> None:
    """Refuse a frame whose codestream declares more pixels than allowed, or another size than its header.

    A JPEG whose SOF says height 0 (the DNL convention) declares no height: only its width is compared.
    """
    size = codestream_size(stream)
    if size is None:
        return
    width, height = size
    if width * max(height, 1) > max_pixels:
        raise DecompressionBombError(
            f"the pixel data's codestream declares {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (the DICOM header says {columns}x{rows})")
    if width != columns or (height and height != rows):
        raise DecodeError(f"the pixel data's codestream is {width}x{height} but the DICOM header says "
                          f"{columns}x{rows} (Columns x Rows): corrupt or mislabelled file")


def check_fill_aspect(width: int, height: int) -> None:
    """Refuse a picture whose 512 px fill resize would explode (`MAX_FILL_ASPECT`)."""
    short, long = sorted((max(width, 1), max(height, 1)))
    if long / short > MAX_FILL_ASPECT:
        fill_long = round(FILL_TARGET * long / short)
        raise DecompressionBombError(
            f"a {width}x{height} picture (aspect {long / short:.0f}:1) is no radiograph: the seed chain's "
            f"{FILL_TARGET} px fill would make it {FILL_TARGET}x{fill_long}; pictures beyond "
            f"{MAX_FILL_ASPECT:.0f}:1 are refused")
