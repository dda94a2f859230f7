"""PNG / JPEG / TIFF bytes -> `DecodedImage` holding what ImageMagick Q16 holds after reading the file.

In:  the file's bytes and `DecodeOptions` (mode "exact" or "fast", max_pixels).
Out: (H, W, C) pixels at the file's own depth, C = 1 for grey and 3 for colour (palettes expanded): uint8 for
     1- and 8-bit samples (1-bit as 0/255; each v stands for the Q16 value v*257), uint16 for 16-bit samples
     (and palette TIFFs, whose colour map is Q16); alpha, when the file has one, as a (H, W) Q16 plane.
     `meta` is empty except `{"frames": n}` for a TIFF with n > 1 pages (the first page is decoded).

Decoders: Pillow for PNG and JPEG (its libjpeg-turbo "islow" IDCT gives the same samples as IM's reader),
tifffile for TIFF (Pillow as a fallback), and imagecodecs (libpng) for 16-bit colour PNGs, which Pillow would
truncate to 8 bits, and for plain 1/8/16-bit grey and 8-bit RGB PNGs: it decodes straight into one array of
the file's depth, where Pillow holds its own copy (1 byte a pixel even for 1-bit, 4 for RGB) and hands numpy
a second one (a 16384² 16-bit PNG peaked at 2.7 GB through Pillow). Every PNG's critical chunks are checked
against their CRC first, as libpng and ImageMagick do (Pillow skips the IDAT CRC). The declared size is checked
against `max_pixels` from the header, before any pixel is decoded; Pillow's own process-wide bomb limit is
bypassed (its plugin classes are opened directly) so the one limit that applies is the caller's.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.geometry import FAST_DECODE_MIN_SIDE, crop_to_fill_grid
from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.decode.messages import plain_reason
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import DecodeError, DecompressionBombError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff_format(data: bytes) -> str | None:
    """"png", "jpeg", "tiff" from the magic bytes, else None (the file name is never trusted)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def _check_size(width: int, height: int, options: DecodeOptions) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"image declares an empty size {width}x{height}")
    if width * height > options.max_pixels:
        raise DecompressionBombError(
            f"image declares {width}x{height} = {width * height} pixels, above the limit of "
            f"{options.max_pixels} (raise DecodeOptions.max_pixels if this image is genuine)")
    check_fill_aspect(width, height)


def _own_depth(samples: np.ndarray) -> np.ndarray:
    """Decoder samples -> the `DecodedImage` depth: uint8 kept, bool -> 0/255 (uint8), uint16 kept."""
    if samples.dtype == np.bool_:
        return np.multiply(samples, np.uint8(255), dtype=np.uint8)
    if samples.dtype in (np.uint8, np.uint16):
        return samples
    if samples.dtype.kind in "iu" and samples.size and 0 <= samples.min() and samples.max() <= 65535:
        return samples.astype(np.uint16)
    raise DecodeError(f"unsupported sample type {samples.dtype} (expected 1, 8 or 16 bits per sample)")


def _as_q16(samples: np.ndarray) -> np.ndarray:
    """uint8 samples -> Q16 (v*257); uint16 kept (the alpha plane is always Q16)."""
    return np.multiply(samples, 257, dtype=np.uint16) if samples.dtype == np.uint8 else samples


def _split(samples: np.ndarray, has_alpha: bool) -> DecodedImage:
    """(H, W[, S]) samples at their own depth -> DecodedImage with the last sample as a Q16 alpha when `has_alpha`."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    if has_alpha:
        colour, alpha = samples[:, :, :-1], np.ascontiguousarray(_as_q16(samples[:, :, -1]))
    else:
        colour, alpha = samples, None
    if colour.shape[2] not in (1, 3):
        raise DecodeError(f"unsupported number of colour samples: {colour.shape[2]}")
    return DecodedImage(pixels=np.ascontiguousarray(colour), alpha=alpha)


# ---------------------------------------------------------------------------------------------------
# PNG / JPEG through Pillow
# ---------------------------------------------------------------------------------------------------


def _from_pillow(im) -> DecodedImage:
    """A loaded Pillow image -> DecodedImage (mode decides grey/colour/alpha)."""
    mode = im.mode
    if mode == "P" or (mode in ("L", "RGB", "I;16", "I;16B", "I;16L", "I") and "transparency" in im.info):
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "L":
            im = im.convert("LA")
        elif mode == "RGB":
            im = im.convert("RGBA")
        mode = im.mode
    if mode == "1":
        # Pillow's own "1" storage is a byte a pixel; its packed bits are an eighth of that (no second full copy)
        width = im.size[0]
        packed = np.frombuffer(im.tobytes("raw", "1"), dtype=np.uint8).reshape(im.size[1], -1)
        del im
        return _split(_own_depth(np.unpackbits(packed, axis=1, count=width).view(np.bool_)), has_alpha=False)
    if mode == "CMYK":
        im, mode = im.convert("RGB"), "RGB"
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im)
        return _split(_own_depth(arr.astype(np.uint16, copy=False) if arr.dtype.kind == "u" else arr), has_alpha=False)
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise DecodeError(f"unsupported Pillow mode {mode!r}")
    return _split(_own_depth(np.asarray(im)), has_alpha=mode in ("LA", "RGBA"))


def _png_ihdr(data: bytes) -> tuple[int, int, int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError("truncated or corrupt PNG: no IHDR chunk")
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour_type


#: PNG chunks whose CRC libpng checks as an error (critical chunks); an ancillary chunk's bad CRC is only a warning.
_CRITICAL_CHUNKS = frozenset((b"IHDR", b"PLTE", b"IDAT", b"IEND"))


def _chunk_headers(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(position, type, end of data) of each PNG chunk whose 8-byte header is in the file, in order; the chunk's
    data and CRC may run past the end of a truncated file (the callers check `end`)."""
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        yield pos, data[pos + 4:pos + 8], pos + 8 + length
        pos += 12 + length


def check_png_crcs(data: bytes) -> None:
    """Refuse a PNG whose critical chunk (IHDR, PLTE, IDAT, IEND) fails its CRC, as libpng and ImageMagick do.

    In: the whole file. Out: nothing, or `DecodeError` naming the chunk. A chunk that runs past the end of the file
    is left to the decoder (it reports the truncation). One pass of zlib.crc32 over the file: ~1 ms a MB.
    """
    view = memoryview(data)  # slices of a view are not copies (one IDAT may hold the whole image)
    for pos, kind, end in _chunk_headers(data):
        if end + 4 > len(data):
            return
        if kind in _CRITICAL_CHUNKS:
            stored = int.from_bytes(data[end:end + 4], "big")
            if zlib.crc32(view[pos + 4:end]) != stored:
                raise DecodeError(
                    f"corrupt PNG: its {kind.decode()} chunk at byte {pos} fails its CRC check (the file was damaged "
                    f"in storage or transfer; libpng and ImageMagick refuse it too)")
        if kind == b"IEND":
            return


def _has_chunk(data: bytes, kind: bytes) -> bool:
    """Whether a chunk of this type is present (a cheap walk over the chunk headers, no CRC)."""
    for _, found, _ in _chunk_headers(data):
        if found == kind:
            return True
        if found == b"IDAT":  # the chunks that change the samples' meaning come before IDAT
            return False
    return False


def _libpng_native(depth: int, colour_type: int, data: bytes) -> bool:
    """Whether imagecodecs decodes this PNG to exactly the samples Pillow gives, at the file's own depth.

    Grey at 1, 8 or 16 bits (1-bit as 0/255, as Pillow's "1" -> "L"), 8-bit RGB, 16-bit colour; never with a
    tRNS chunk (Pillow turns it into an alpha plane its own way) nor palettes (Pillow expands those).
    """
    plain = (colour_type == 0 and depth in (1, 8, 16)) or (colour_type == 2 and depth == 8)
    return plain and not _has_chunk(data, b"tRNS")


def _decode_png(data: bytes, options: DecodeOptions) -> DecodedImage:
    width, height, depth, colour_type = _png_ihdr(data)
    _check_size(width, height, options)
    check_png_crcs(data)
    wide_colour = depth == 16 and colour_type in (2, 4, 6)
    imagecodecs = _imagecodecs() if wide_colour or _libpng_native(depth, colour_type, data) else None
    if wide_colour and imagecodecs is None:
        raise DecodeError("a 16-bit colour PNG needs imagecodecs (pip install imagecodecs): Pillow would keep "
                          "only the high byte of each sample")
    if imagecodecs is not None:
        # Pillow keeps only the high byte of 16-bit colour/grey-alpha samples; for the plain layouts libpng
        # is exact too and allocates one array of the file's depth (see the module docstring)
        try:
            arr = imagecodecs.png_decode(data)
        except Exception as exc:
            raise DecodeError(f"corrupt or truncated PNG: {plain_reason(exc)}") from exc
        return _split(_own_depth(arr), has_alpha=colour_type in (4, 6))
    from PIL import PngImagePlugin

    return _load_pillow(PngImagePlugin.PngImageFile, data, "PNG", options)


def _imagecodecs():
    """The imagecodecs module, or None where it is not installed (a bare machine running from a checkout, as the
    GPU benchmark kit does): then the plain layouts decode with Pillow, which gives the same samples."""
    try:
        import imagecodecs
    except ImportError:
        return None
    return imagecodecs


def _load_pillow(plugin, data: bytes, label: str, options: DecodeOptions, draft: bool = False) -> DecodedImage:
    """Open with a Pillow plugin class directly (no process-wide bomb limit), check size, load."""
    try:
        im = plugin(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise DecodeError(f"corrupt {label}: {plain_reason(exc)}") from exc
    _check_size(im.size[0], im.size[1], options)
    full_w, full_h = im.size
    reduced = draft and min(im.size) >= 2 * FAST_DECODE_MIN_SIDE
    if reduced:
        # DCT scaling by 1/2, 1/4 or 1/8, never leaving the short side below FAST_DECODE_MIN_SIDE
        im.draft(im.mode, (FAST_DECODE_MIN_SIDE, FAST_DECODE_MIN_SIDE))
    try:
        im.load()
        image = _from_pillow(im)
        if reduced and im.size != (full_w, full_h):
            # odd sizes round up when scaled: keep the seed chain's 512 px geometry of the full image
            image.pixels = np.ascontiguousarray(crop_to_fill_grid(image.pixels, full_h, full_w))
            if image.alpha is not None:
                image.alpha = np.ascontiguousarray(crop_to_fill_grid(image.alpha, full_h, full_w))
        return image
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"corrupt or truncated {label}: {plain_reason(exc)}") from exc


def _decode_jpeg(data: bytes, options: DecodeOptions) -> DecodedImage:
    from PIL import JpegImagePlugin

    return _load_pillow(JpegImagePlugin.JpegImageFile, data, "JPEG", options, draft=options.mode == "fast")


# ---------------------------------------------------------------------------------------------------
# TIFF through tifffile
# ---------------------------------------------------------------------------------------------------


def _decode_tiff(data: bytes, options: DecodeOptions) -> DecodedImage:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            frames = len(tif.pages)
            page = tif.pages[0]
            height, width = int(page.imagelength), int(page.imagewidth)
            _check_size(width, height, options)
            photometric = int(page.photometric)
            extra = tuple(int(e) for e in (page.extrasamples or ()))
            colormap = page.colormap
            try:
                arr = page.asarray()
            except (ValueError, NotImplementedError, KeyError, ImportError) as exc:
                if "imagecodecs" not in str(exc):
                    raise
                arr = None  # a compression tifffile cannot decode without imagecodecs: try Pillow
    except (DecodeError, DecompressionBombError):
        raise
    except Exception as exc:
        raise DecodeError(f"corrupt or truncated TIFF: {plain_reason(exc)}") from exc
    if arr is None:
        from PIL import TiffImagePlugin

        image = _load_pillow(TiffImagePlugin.TiffImageFile, data, "TIFF", options)
    else:
        image = _tiff_samples(arr, photometric, extra, colormap)
    if frames > 1:
        image.meta["frames"] = frames
    return image


def _tiff_samples(arr: np.ndarray, photometric: int, extra: tuple[int, ...], colormap) -> DecodedImage:
    """tifffile's first-page array -> DecodedImage, following IM's reading of the photometric tag."""
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] > 4:  # planar -> contiguous
        arr = np.moveaxis(arr, 0, -1)
    if photometric == 3:  # palette: 16-bit colormap entries are Q16 values already
        if colormap is None:
            raise DecodeError("palette TIFF without a colour map")
        cmap = np.asarray(colormap, dtype=np.uint16)
        if cmap.max() <= 255:
            cmap = cmap * np.uint16(257)
        return DecodedImage(pixels=np.ascontiguousarray(cmap.T[arr.astype(np.intp)]))
    if photometric not in (0, 1, 2):
        raise DecodeError(f"unsupported TIFF photometric interpretation {photometric} (need grey, RGB or palette)")
    samples = _own_depth(arr)
    if photometric == 0:  # MinIsWhite: IM inverts the grey samples
        top = np.iinfo(samples.dtype).max
        if samples.ndim == 2:
            samples = top - samples
        else:
            samples = samples.copy()
            samples[..., 0] = top - samples[..., 0]
    has_alpha = bool(extra) and samples.ndim == 3 and samples.shape[2] in (2, 4)
    if samples.ndim == 3 and not has_alpha and samples.shape[2] in (2, 4):
        samples = samples[:, :, : samples.shape[2] - 1]  # unspecified extra sample: not alpha
    return _split(samples, has_alpha)


def decode_raster(data: bytes, options: DecodeOptions = DecodeOptions()) -> DecodedImage:
    """Decode PNG, JPEG or TIFF bytes (see the module docstring).

    Raises:
        DecodeError: empty, unknown, corrupt or truncated bytes, or an unsupported sample layout.
        DecompressionBombError: the header declares more than `options.max_pixels` pixels.
    """
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    kind = sniff_format(data)
    if kind == "png":
        return _decode_png(data, options)
    if kind == "jpeg":
        return _decode_jpeg(data, options)
    if kind == "tiff":
        return _decode_tiff(data, options)
    raise DecodeError(f"not a PNG, JPEG or TIFF file (starts with {data[:8]!r})")
