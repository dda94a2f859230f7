"""The tensor seed chain and dcmj2pnm mapping (the GPU path's preprocessing) against the exact CPU path,
run on the CPU: every real film of ../shared, the real DICOMs, and synthetic edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dicomgen as gen
from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_stored_frame, encoded_first_frame
from cxrage_ray.decode.dicom_greyscale import dcmtk_8bit
from cxrage_ray.decode.image import decode_image
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import CxrAgeError
from cxrage_ray.preprocess import seed_chain as sc
from cxrage_ray.preprocess.trim import trim_box
from cxrage_ray.preprocess.tensor import TensorSeedChain, dcmtk_8bit_tensor, dicom_q16_tensor, trim_box_tensor
from imagegen import radiograph

ANY = DecodeOptions(allow_any_modality=True)
#: The issue's bound for the fast path; the tensor chain sums in IM's order, so it is in fact exact.
MAX_LEVELS, MIN_IDENTICAL = 1, 0.999


def as_tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a.astype(np.int32))


def assert_agrees(exact: sc.SeedPicture, pixels: torch.Tensor, alpha: torch.Tensor | None, name: str) -> None:
    ours = pixels.numpy()
    assert ours.shape == exact.pixels.shape, name
    diff = np.abs(ours.astype(np.int16) - exact.pixels.astype(np.int16))
    assert diff.max() <= MAX_LEVELS, f"{name}: max diff {diff.max()}"
    assert (diff == 0).mean() >= MIN_IDENTICAL, f"{name}: {(diff > 0).mean():.5f} of pixels differ"
    assert (alpha is None) == (exact.alpha is None), name
    if alpha is not None:
        assert np.array_equal(alpha.numpy(), exact.alpha), name


@pytest.mark.slow
def test_every_sample_film_agrees_with_the_exact_chain(cxr_sample: Path) -> None:
    chain = TensorSeedChain()
    films = sorted((cxr_sample / "images").iterdir())
    assert len(films) == 250
    identical = 0
    for film in films:
        decoded = decode_image(film.read_bytes(), film.name)
        pixels, alpha = chain.picture(as_tensor(decoded.q16()), as_tensor(decoded.alpha))
        exact = sc.seed_picture(decoded)
        assert_agrees(exact, pixels, alpha, film.name)
        identical += bool(np.array_equal(pixels.numpy(), exact.pixels))
    assert identical == 250  # IM's summation order on the device: not merely within the bound


def dicom_files(dicom_sample: Path) -> list[Path]:
    return sorted(p for p in dicom_sample.rglob("*") if p.is_file() and p.suffix != ".csv")


def test_real_dicoms_map_and_chain_like_the_exact_path(dicom_sample: Path) -> None:
    chain = TensorSeedChain()
    checked = 0
    for path in dicom_files(dicom_sample):
        data = path.read_bytes()
        try:
            exact = decode_image(data, path.name, ANY)
        except CxrAgeError:
            continue  # the corrupt files: their refusal is the exact path's business
        frame, params = decode_stored_frame(data, ANY)
        grey = dcmtk_8bit_tensor(torch.from_numpy(frame.astype(np.int32)), params)
        assert np.array_equal(grey.numpy(), exact.eight_bit()[:, :, 0]), path.name
        q16 = dicom_q16_tensor(torch.from_numpy(frame.astype(np.int32)), params)
        assert_agrees(sc.seed_picture(exact), chain(q16), None, path.name)
        checked += 1
    assert checked >= 20


def test_encoded_frame_carries_what_the_mapping_needs(dicom_sample: Path) -> None:
    path = dicom_sample / "cxr" / "WG04_RG1_J2KR.dcm"
    frame = encoded_first_frame(path.read_bytes())
    assert frame.codec == "j2k" and frame.codestream[:2] == b"\xff\x4f"  # SOC marker: a raw codestream
    assert (frame.rows, frame.columns, frame.params.bits_stored, frame.params.invert) == (1955, 1841, 15, True)
    assert frame.meta["modality"] == "CR"


def synthetic_dicoms() -> dict[str, bytes]:
    big = gen.ramp(200, 200, bits=12)  # > 3x the value range: DCMTK's look-up-table path
    rgb = np.random.default_rng(3).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    return {
        "mono1_10": gen.make_dicom(gen.ramp(bits=10), bits_stored=10, photometric="MONOCHROME1"),
        "signed": gen.make_dicom(gen.ramp(bits=12, signed=True), bits_stored=12),
        "rescale_negative": gen.make_dicom(gen.ramp(bits=10), bits_stored=10, RescaleSlope=-1.5, RescaleIntercept=7),
        "rescale_lut_path": gen.make_dicom(big, bits_stored=12, RescaleSlope=0.37, RescaleIntercept=-100.3),
        "inverse": gen.make_dicom(gen.ramp(bits=12), bits_stored=12, PresentationLUTShape="INVERSE"),
        "rgb": gen.make_dicom(rgb, photometric="RGB"),
    }


@pytest.mark.parametrize("name", sorted(synthetic_dicoms()))
def test_mapping_matches_dcmtk_8bit_on_synthetic_headers(name: str) -> None:
    frame, params = decode_stored_frame(synthetic_dicoms()[name], ANY)
    ours = dcmtk_8bit_tensor(torch.from_numpy(frame.astype(np.int32)), params).numpy()
    assert np.array_equal(ours, dcmtk_8bit(frame, params))


def test_trim_box_matches_the_exact_one_on_edge_cases() -> None:
    cases = [np.zeros((6, 6, 1), dtype=np.uint16)]
    img = np.full((8, 10, 1), 100, dtype=np.uint16)
    img[2:6, 3:7] = 500
    img[7, 9] = 999
    cases.append(img)
    right = np.zeros((6, 6, 1), dtype=np.uint16)
    right[:, 5] = 7
    right[2:4, 2:4] = 300
    cases.append(right)
    colour = np.zeros((9, 7, 3), dtype=np.uint16)
    colour[3:5, 2:4, 1] = 40
    cases.append(colour)
    for case in cases:
        assert trim_box_tensor(torch.from_numpy(case.astype(np.int32))) == trim_box(case)


@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (512, 900), (2000, 150)])
def test_synthetic_shapes_and_colour_are_exact(shape: tuple[int, int]) -> None:
    grey = radiograph(*shape, seed=1, border=5, border_value=3).astype(np.uint16) * 257
    colour = np.stack([grey, grey // 2, grey], axis=2)
    chain = TensorSeedChain()
    for pixels in (grey[:, :, None], colour):
        decoded = DecodedImage(pixels=pixels)
        assert_agrees(sc.seed_picture(decoded), chain(torch.from_numpy(pixels.astype(np.int32))), None, str(shape))
