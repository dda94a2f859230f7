"""`--decode fast`: reduced-resolution J2K / JPEG decode lands on the exact path's 512 px seed-chain grid.

A real film (../shared cxr-sample, upscaled to an archive-like 2048 x 2517) is stored as J2K lossless and
JPEG baseline DICOM; fast decode must give the expected half-size image, the same seed-chain geometry
and a seed-chain picture close to the exact one; syntaxes without a reduced decode must be identical.
Bounds come from `benchmarks/decode.py` (see docs/dicom.md).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

import dicomgen as gen
from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom_frame import encapsulated_frame
from cxrage_ray.decode.dicom_pillow import decode_j2k_pillow, j2k_phase_align
from cxrage_ray.decode.geometry import FAST_DECODE_MIN_SIDE, crop_to_fill_grid, fill_size
from cxrage_ray.decode.image import decode_image
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.preprocess.seed_chain import seed_chain

EXACT, FAST = DecodeOptions(mode="exact"), DecodeOptions(mode="fast")
#: Odd width: ceil(2517 / 2) = 1259 would resize to 630 px wide, the exact film to 629.
ROWS, COLS = 2048, 2517


@pytest.fixture(scope="module")
def film(cxr_sample: Path) -> np.ndarray:
    with Image.open(cxr_sample / "images" / "nih_00012751_000.png") as im:
        return np.asarray(im.convert("L").resize((COLS, ROWS), Image.LANCZOS))


def twelve_bit(grey8: np.ndarray) -> np.ndarray:
    return (grey8.astype(np.uint16) << 4) | (grey8.astype(np.uint16) >> 4)


def both(data: bytes) -> tuple[DecodedImage, DecodedImage]:
    return decode_image(data, "x.dcm", EXACT), decode_image(data, "x.dcm", FAST)


def close_on_512_grid(exact: DecodedImage, fast: DecodedImage) -> float:
    a, b = seed_chain(exact), seed_chain(fast)
    assert a.shape == b.shape  # same 512 px geometry, so every fastai view sees the same field
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def test_j2k_fast_is_half_size_and_close(film: np.ndarray) -> None:
    data = gen.compressed(gen.make_dataset(twelve_bit(film), bits_stored=12), JPEG2000Lossless)
    exact, fast = both(data)
    assert exact.pixels.shape == (ROWS, COLS, 1)
    assert fast.pixels.shape == (1024, 1258, 1)  # reduce 1 (short side >= 1024), odd column dropped
    assert min(fast.pixels.shape[:2]) >= FAST_DECODE_MIN_SIDE
    # measured 0.37 grey levels on this film; a wrong level, scale or crop lands at 1.5-3 levels
    # (reduce 2 averaged 3.3 over 6 films, benchmarks/decode.py); the phase is checked on a ramp below
    assert close_on_512_grid(exact, fast) < 0.6


def test_j2k_phase_alignment_matches_a_box_downscale() -> None:
    # a diagonal 12-bit ramp: the wavelet low band samples pixel 2k, a 2x2 box average pixel 2k + 0.5
    y, x = np.mgrid[0:2200, 0:2100]
    ramp = (x * 0.9 + y * 0.7).astype(np.uint16)  # <= 3430, inside 12 bits
    data = gen.compressed(gen.make_dataset(ramp, bits_stored=12), JPEG2000Lossless)
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = decode_j2k_pillow(encapsulated_frame(ds), ds, 1).astype(float)
    aligned = j2k_phase_align(stored, 1, 4095).astype(float)
    box = ramp.reshape(1100, 2, 1050, 2).astype(float).mean(axis=(1, 3))
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(stored - box)[inner].mean() > 0.7  # the raw low band is off by (0.9 + 0.7) / 2
    assert np.abs(aligned - box)[inner].max() <= 1.0  # aligned: rounding only


def test_jpeg_fast_uses_dct_scaling_on_the_same_grid(film: np.ndarray) -> None:
    exact, fast = both(gen.jpeg_baseline(film, quality=92, modality="DX"))
    assert exact.pixels.shape == (ROWS, COLS, 1)
    assert fast.pixels.shape == (1024, 1258, 1)
    assert close_on_512_grid(exact, fast) < 0.6  # measured 0.32 on this film


@pytest.mark.parametrize("syntax", [RLELossless, ExplicitVRLittleEndian])
def test_syntaxes_without_reduced_decode_are_identical(film: np.ndarray, syntax: str) -> None:
    ds = gen.make_dataset(twelve_bit(film[:, :2100]), bits_stored=12)
    data = gen.to_bytes(ds) if syntax == ExplicitVRLittleEndian else gen.compressed(ds, syntax)
    exact, fast = both(data)
    assert exact.pixels.shape == (ROWS, 2100, 1)
    assert np.array_equal(exact.pixels, fast.pixels)


def test_small_j2k_film_is_not_reduced(film: np.ndarray) -> None:
    small = film[: 2 * FAST_DECODE_MIN_SIDE - 2, : 2 * FAST_DECODE_MIN_SIDE - 2]  # ceil(2046 / 2) < 1024
    data = gen.compressed(gen.make_dataset(twelve_bit(small), bits_stored=12), JPEG2000Lossless)
    exact, fast = both(data)
    assert np.array_equal(exact.pixels, fast.pixels)


@pytest.mark.parametrize(("rows", "cols"), [(2048, 2517), (2049, 2048), (2500, 2048), (2047, 3001)])
def test_crop_to_fill_grid_keeps_the_full_images_geometry(rows: int, cols: int) -> None:
    reduced = np.zeros((-(-rows // 2), -(-cols // 2)), np.uint16)
    out = crop_to_fill_grid(reduced, rows, cols)
    assert fill_size(out.shape[1], out.shape[0]) == fill_size(cols, rows)
    assert reduced.shape[0] - out.shape[0] in (0, 1) and reduced.shape[1] - out.shape[1] in (0, 1)
