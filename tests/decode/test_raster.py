"""Raster decoding: Q16 values and shapes per format/mode, and the error types for bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.geometry import FAST_DECODE_MIN_SIDE
from cxrage_ray.decode.raster import decode_raster
from cxrage_ray.errors import DecodeError, DecompressionBombError
from conftest import require_tool, run_reference
from imagegen import palette_png, pillow_bytes, radiograph, tiff_bytes

OPTS = DecodeOptions()


def _q(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint16) * np.uint16(257)


def test_png_grey_rgb_rgba_la() -> None:
    g = radiograph(40, 30)
    d = decode_raster(pillow_bytes(g, "PNG"), OPTS)
    assert d.pixels.dtype == np.uint8 and d.q16().shape == (40, 30, 1) and d.alpha is None  # its own depth
    assert np.array_equal(d.q16()[:, :, 0], _q(g)) and d.meta == {}
    rgb = np.dstack([g, 255 - g, g // 2])
    d = decode_raster(pillow_bytes(rgb, "PNG"), OPTS)
    assert np.array_equal(d.q16(), _q(rgb))
    rgba = np.dstack([rgb, g])
    d = decode_raster(pillow_bytes(rgba, "PNG"), OPTS)
    assert np.array_equal(d.q16(), _q(rgb)) and np.array_equal(d.alpha, _q(g))
    la = np.dstack([g, 255 - g])
    d = decode_raster(pillow_bytes(la, "PNG", mode="LA"), OPTS)
    assert d.q16().shape == (40, 30, 1) and np.array_equal(d.alpha, _q(255 - g))


def test_png_16bit_grey_kept_as_is() -> None:
    g = radiograph(33, 21, dtype=np.uint16)
    d = decode_raster(pillow_bytes(g, "PNG", mode="I;16"), OPTS)
    assert d.q16().shape == (33, 21, 1) and np.array_equal(d.q16()[:, :, 0], g)


def test_png_16bit_rgb_kept_as_is() -> None:
    imagecodecs = pytest.importorskip("imagecodecs")
    rgb = np.dstack([radiograph(20, 25, seed=s, dtype=np.uint16) for s in range(3)])
    d = decode_raster(imagecodecs.png_encode(rgb), OPTS)
    assert np.array_equal(d.q16(), rgb) and d.alpha is None


def test_palette_png_is_expanded() -> None:
    from PIL import Image

    data = palette_png(30, 20, seed=1)
    expect = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    d = decode_raster(data, OPTS)
    assert d.q16().shape == (30, 20, 3) and np.array_equal(d.q16(), _q(expect)) and d.alpha is None
    d = decode_raster(palette_png(30, 20, seed=1, transparent_index=3), OPTS)
    assert d.alpha is not None and set(np.unique(d.alpha)) <= {0, 65535}


def test_tiff_8_16_bit_rgb_palette_and_pages() -> None:
    g8 = radiograph(30, 40)
    assert np.array_equal(decode_raster(tiff_bytes(g8), OPTS).q16()[:, :, 0], _q(g8))
    g16 = radiograph(30, 40, dtype=np.uint16)
    d = decode_raster(tiff_bytes(g16, compression="zlib"), OPTS)
    assert d.q16().shape == (30, 40, 1) and np.array_equal(d.q16()[:, :, 0], g16)
    rgb16 = np.dstack([g16, g16 // 2, 65535 - g16])
    d = decode_raster(tiff_bytes(rgb16, photometric="rgb"), OPTS)
    assert np.array_equal(d.q16(), rgb16) and d.alpha is None
    rgba = np.dstack([g8, g8, g8 // 3, 255 - g8])
    d = decode_raster(tiff_bytes(rgba, photometric="rgb", extrasamples=[2]), OPTS)
    assert np.array_equal(d.q16(), _q(rgba[:, :, :3])) and np.array_equal(d.alpha, _q(rgba[:, :, 3]))
    cmap = np.stack([np.arange(256) * 257, np.arange(256)[::-1] * 257, np.full(256, 1000)]).astype(np.uint16)
    d = decode_raster(tiff_bytes(g8, photometric="palette", colormap=cmap), OPTS)
    assert d.q16().shape == (30, 40, 3) and np.array_equal(d.q16(), cmap.T[g8])
    pages = [g8, 255 - g8, g8 // 2]
    d = decode_raster(tiff_bytes(pages), OPTS)
    assert d.q16().shape == (30, 40, 1) and np.array_equal(d.q16()[:, :, 0], _q(g8)) and d.meta == {"frames": 3}


def _im_decode(path: Path, channels: str) -> np.ndarray:
    out = run_reference([require_tool("convert"), str(path), "-depth", "16", f"{channels}:-"]).stdout
    return np.frombuffer(out, dtype="<u2")


def test_decodes_like_imagemagick(tmp_path: Path) -> None:
    """JPEG (libjpeg-turbo islow in both), 16-bit and MinIsWhite TIFF: the Q16 values IM holds."""
    g = radiograph(96, 80, seed=2)
    rgb = np.dstack([g, np.roll(g, 9, 0), 255 - g])
    cases = {
        "grey.jpg": (pillow_bytes(g, "JPEG", quality=90), "gray"),
        "rgb.jpg": (pillow_bytes(rgb, "JPEG", quality=75), "rgb"),
        "g16.tif": (tiff_bytes(radiograph(50, 60, dtype=np.uint16)), "gray"),
        "white.tif": (tiff_bytes(g, photometric="miniswhite"), "gray"),
    }
    for name, (data, channels) in cases.items():
        (tmp_path / name).write_bytes(data)
        ours = decode_raster(data, OPTS).q16().ravel()
        assert np.array_equal(ours, _im_decode(tmp_path / name, channels)), name


def test_fast_mode_reduces_jpeg_but_not_below_min_side() -> None:
    big = radiograph(2 * FAST_DECODE_MIN_SIDE + 200, 2 * FAST_DECODE_MIN_SIDE + 100, seed=4)
    data = pillow_bytes(big, "JPEG", quality=80)
    fast = decode_raster(data, DecodeOptions(mode="fast"))
    exact = decode_raster(data, OPTS)
    assert exact.q16().shape[:2] == big.shape
    assert FAST_DECODE_MIN_SIDE <= min(fast.q16().shape[:2]) < min(big.shape)
    png = pillow_bytes(big[:1200, :1300], "PNG")
    assert decode_raster(png, DecodeOptions(mode="fast")).q16().shape[:2] == (1200, 1300)


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


@pytest.mark.parametrize("data", [b"", b"hello world, not an image", b"GIF89a" + b"\0" * 40],
                         ids=["empty", "text", "gif"])
def test_unknown_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_raster(data, OPTS)


def test_corrupt_and_truncated_raise_decode_error() -> None:
    g = radiograph(64, 64)
    for fmt, data in (("PNG", pillow_bytes(g, "PNG")), ("JPEG", pillow_bytes(g, "JPEG")),
                      ("TIFF", tiff_bytes(g, compression="zlib"))):
        with pytest.raises(DecodeError):
            decode_raster(data[: len(data) // 2], OPTS)
        corrupt = bytearray(data)
        corrupt[40:] = bytes(len(corrupt) - 40)  # keep the magic, zero everything after the header start
        with pytest.raises(DecodeError):
            decode_raster(bytes(corrupt), OPTS)


def test_bombs_are_refused_before_decoding() -> None:
    with pytest.raises(DecompressionBombError, match="100000x100000"):
        decode_raster(_png_header_only(100_000, 100_000), OPTS)
    small = DecodeOptions(max_pixels=1000)
    g = radiograph(40, 40)
    for data in (pillow_bytes(g, "PNG"), pillow_bytes(g, "JPEG"), tiff_bytes(g)):
        with pytest.raises(DecompressionBombError):
            decode_raster(data, small)


def test_png_without_imagecodecs_decodes_plain_layouts_with_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare machine (the GPU benchmark kit) has no imagecodecs: the plain layouts give the same samples through
    Pillow; a 16-bit colour PNG, which Pillow would truncate, is refused with the fix, never silently cut."""
    import cxrage_ray.decode.raster as raster

    imagecodecs = pytest.importorskip("imagecodecs")
    grey8 = radiograph(31, 22)
    grey16 = radiograph(31, 22, dtype=np.uint16)
    rgb8 = np.dstack([radiograph(31, 22, seed=s) for s in range(3)])
    files = [pillow_bytes(grey8, "PNG"), pillow_bytes(grey16, "PNG", mode="I;16"), pillow_bytes(rgb8, "PNG")]
    with_codec = [decode_raster(f, OPTS).q16() for f in files]
    monkeypatch.setattr(raster, "_imagecodecs", lambda: None)
    for data, expect in zip(files, with_codec):
        assert np.array_equal(decode_raster(data, OPTS).q16(), expect)
    wide = imagecodecs.png_encode(np.dstack([radiograph(20, 25, seed=s, dtype=np.uint16) for s in range(3)]))
    with pytest.raises(DecodeError, match="imagecodecs"):
        decode_raster(wide, OPTS)
