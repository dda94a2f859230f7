"""DICOM decode: the dcmj2pnm-exact 8-bit mapping on real and synthetic files, metadata, refusals."""

from __future__ import annotations

import csv
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_dicom
from cxrage_ray.decode.dicom_frame import repair_sequential_sos
from cxrage_ray.decode.dicom_metadata import parse_patient_age
from cxrage_ray.decode.dicom_parse import looks_like_acr_nema
from cxrage_ray.decode.dicom_pillow import decode_j2k_pillow
from cxrage_ray.decode.geometry import FAST_DECODE_MIN_SIDE
from cxrage_ray.decode.image import decode_image
from cxrage_ray.errors import DecodeError, DecompressionBombError, UnsupportedModalityError
import dicomgen as gen
from conftest import require_tool

ANY = DecodeOptions(allow_any_modality=True)
#: 12-bit lossy JPEG: only pylibjpeg (Richter's libjpeg) decodes it here; its IDCT rounds differently
#: from the IJG 12-bit codec inside DCMTK, so single pixels differ by 1 grey level.
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"


def grey8(image) -> np.ndarray:
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 3 and image.pixels.shape[2] == 1  # 8-bit kept
    return image.pixels[..., 0]


def dcmj2pnm(tool: str, data: bytes, tmp: Path, name: str = "in") -> np.ndarray | None:
    """What `dcmj2pnm -O +ot +G` writes for these bytes, or None when DCMTK cannot read them."""
    src, out = tmp / f"{name}.dcm", tmp / f"{name}.tif"
    src.write_bytes(data)
    result = subprocess.run([tool, "-O", "+ot", "+G", str(src), str(out)], capture_output=True, timeout=60)
    if result.returncode != 0 or not out.exists():
        return None
    with Image.open(out) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------------- real files


def sample_rows(dicom_sample: Path) -> list[dict]:
    with open(dicom_sample / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def decoded(dicom_sample: Path) -> dict[str, object]:
    """Every sample file decoded once (exact mode, any modality): DecodedImage or the exception."""
    results: dict[str, object] = {}
    for row in sample_rows(dicom_sample):
        try:
            results[row["file"]] = decode_dicom((dicom_sample / row["file"]).read_bytes(), ANY)
        except Exception as e:  # noqa: BLE001 - the tests below assert on the type
            results[row["file"]] = e
    return results


def test_sample_files_decode_or_fail_cleanly(dicom_sample: Path, decoded: dict) -> None:
    rows = sample_rows(dicom_sample)
    assert len(rows) >= 28
    failures = {name: r for name, r in decoded.items() if isinstance(r, Exception)}
    # only the corrupt J2K stream fails; the WG04 JPEG files with the Se=0 SOS quirk are repaired
    assert set(failures) == {"cxr/pylibjpeg-data_966.dcm"}
    assert isinstance(failures["cxr/pylibjpeg-data_966.dcm"], DecodeError)
    assert "JPEG 2000" in str(failures["cxr/pylibjpeg-data_966.dcm"])
    for row in rows:
        result = decoded[row["file"]]
        if isinstance(result, Exception):
            continue
        assert grey8(result).shape == (int(row["rows"]), int(row["cols"])), row["file"]
        assert result.meta["frames"] == int(row["frames"])
        assert result.meta["modality"] == row["modality"]
        assert result.meta["photometric"] == row["photometric"]


def test_matches_dcmj2pnm_on_every_sample_file(dicom_sample: Path, decoded: dict, tmp_path: Path) -> None:
    """Where DCMTK reads the file: our output == its TIFF. Where it cannot (JPEG 2000, JPEG-LS): the
    mapping alone is checked by running dcmj2pnm on an uncompressed copy of the same stored values."""
    tool = require_tool("dcmj2pnm")
    import pydicom

    direct, via_copy = 0, 0
    for row in sample_rows(dicom_sample):
        result = decoded[row["file"]]
        if isinstance(result, Exception):
            continue
        ours = grey8(result)
        data = (dicom_sample / row["file"]).read_bytes()
        ref = dcmj2pnm(tool, data, tmp_path)
        if ref is None:
            ds = pydicom.dcmread(dicom_sample / row["file"])
            ds.decompress()
            ref = dcmj2pnm(tool, gen.to_bytes(ds), tmp_path, "native")
            assert ref is not None, row["file"]
            via_copy += 1
        else:
            direct += 1
        assert ref.shape == ours.shape, row["file"]
        diff = np.abs(ref.astype(int) - ours.astype(int))
        if row["transfer_syntax"] == JPEG_EXTENDED_12BIT:
            assert diff.max() <= 1 and diff.mean() < 0.02, row["file"]
        else:
            assert diff.max() == 0, f"{row['file']}: {np.count_nonzero(diff)} pixels differ"
    assert direct >= 15 and via_copy >= 8


def test_lossless_encodings_of_one_film_agree(decoded: dict) -> None:
    ref = grey8(decoded["cxr/WG04_RG1_UNCR.dcm"])
    for name in ("cxr/WG04_RG1_J2KR.dcm", "derived/RG1_reencoded_RLELossless.dcm", "derived/RG1_reencoded_JPEGLosslessSV1.dcm"):
        assert np.array_equal(grey8(decoded[name]), ref), name
    # MONOCHROME1 15-bit: 255 - v*254/2^15 -> never 0, and the film's background is bright
    assert ref.min() >= 1
    lossy = grey8(decoded["cxr/WG04_RG1_J2KI.dcm"]).astype(int)
    assert np.abs(lossy - ref).mean() < 1.0


def test_inverse_presentation_lut_is_not_a_double_inversion(decoded: dict) -> None:
    """966_fixed is MONOCHROME1 + Presentation LUT Shape INVERSE: one inversion, like DCMTK."""
    image = grey8(decoded["cxr/pylibjpeg-data_966_fixed.dcm"])
    assert image.min() >= 1  # the inverted range is [1, 255]
    h, w = image.shape  # displayed normally: the right lung is darker than the mediastinum
    lung = image[h // 4 : h // 2, int(w * 0.15) : int(w * 0.35)].mean()
    mediastinum = image[h // 4 : h // 2, int(w * 0.46) : int(w * 0.54)].mean()
    assert lung + 40 < mediastinum


def test_real_file_metadata(decoded: dict) -> None:
    rsna = decoded["cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm"].meta
    assert rsna["modality"] == "CR" and rsna["view_position"] == "AP" and rsna["body_part"] == "CHEST"
    assert rsna["patient_sex"] == "F" and rsna["chronological_age"] == 68.0
    assert rsna["transfer_syntax"] == "1.2.840.10008.1.2.4.50" and "patient_id_hash" not in rsna
    nih = decoded["cxr/nih-gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"].meta
    assert nih["chronological_age"] == 81.0 and nih["patient_sex"] == "M" and nih["modality"] == "DX"
    wg04 = decoded["cxr/WG04_RG1_UNCR.dcm"].meta
    # no PatientAge: (StudyDate - PatientBirthDate) / 365.25
    assert wg04["chronological_age"] == pytest.approx(64.476, abs=0.001) and wg04["view_position"] == "PA"


def test_acr_nema_without_meta_is_found_by_content(dicom_sample: Path, decoded: dict) -> None:
    data = (dicom_sample / "cxr/barre_CR-MONO1-10-chest_acrnema").read_bytes()
    assert data[128:132] != b"DICM" and looks_like_acr_nema(data)
    image = decode_dicom(data, ANY)
    assert np.array_equal(grey8(image), grey8(decoded["cxr/gdcm-CR-MONO1-10-chest.dcm"]))
    assert image.meta["transfer_syntax"] == str(ImplicitVRLittleEndian)
    pytest.importorskip("cxrage_ray.decode.raster", reason="raster decoder not in this checkout yet")
    routed = decode_image(data, "CR-MONO1-10-chest", ANY)  # extension-less: raster fails, then ACR-NEMA
    assert np.array_equal(grey8(routed), grey8(image))


def test_non_radiograph_refused_unless_allowed(dicom_sample: Path) -> None:
    data = (dicom_sample / "other/pydicom_MR_small_bigendian.dcm").read_bytes()
    with pytest.raises(UnsupportedModalityError, match="'MR'"):
        decode_dicom(data, DecodeOptions())
    assert decode_dicom(data, ANY).meta["modality"] == "MR"


def test_truncated_and_non_dicom_files_raise_decode_error(dicom_sample: Path, cxr_sample: Path) -> None:
    for name in ("cxr/WG04_RG1_J2KI.dcm", "cxr/WG04_RG1_UNCR.dcm", "cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm"):
        data = (dicom_sample / name).read_bytes()
        for cut in (60, 131, 600, len(data) // 2, len(data) - 20_000):
            with pytest.raises(DecodeError):
                decode_dicom(data[:cut], ANY)
    png = next(p for p in sorted((cxr_sample / "images").iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    with pytest.raises(DecodeError, match="not a DICOM"):
        decode_image(png.read_bytes(), "image.dcm")


def test_fast_j2k_uses_resolution_levels(dicom_sample: Path, decoded: dict) -> None:
    import pydicom
    from pydicom.encaps import get_frame

    name = "other/pylibjpeg-data_NM_Kakadu44_SOTmarkerincons.dcm"  # 2500x2048 J2K lossless
    data = (dicom_sample / name).read_bytes()
    fast = grey8(decode_dicom(data, DecodeOptions(mode="fast", allow_any_modality=True)))
    exact = grey8(decoded[name])
    assert fast.shape == (1250, 1024) and min(fast.shape) >= FAST_DECODE_MIN_SIDE
    pooled = exact.reshape(1250, 2, 1024, 2).astype(float).mean(axis=(1, 3))
    assert np.abs(pooled - fast).mean() < 1.0  # same mapping, same picture
    # at reduce=0 the Pillow path returns exactly pydicom's stored values (its 16-bit scaling undone)
    for name in ("cxr/WG04_RG1_J2KI.dcm", "other/WG04_RG3_J2KR.dcm"):
        ds = pydicom.dcmread(dicom_sample / name)
        stored = decode_j2k_pillow(get_frame(ds.PixelData, 0, number_of_frames=1), ds, 0)
        assert np.array_equal(stored, ds.pixel_array), name
    # films whose short side is < 2x the floor are decoded at full resolution
    rg1 = (dicom_sample / "cxr/WG04_RG1_J2KR.dcm").read_bytes()
    assert np.array_equal(grey8(decode_dicom(rg1, DecodeOptions(mode="fast"))), grey8(decoded["cxr/WG04_RG1_J2KR.dcm"]))


def test_sos_repair_only_touches_broken_sequential_streams(dicom_sample: Path) -> None:
    import pydicom
    from pydicom.encaps import get_frame

    broken = pydicom.dcmread(dicom_sample / "other/WG04_RG2_JPLY.dcm")
    fixed = pydicom.dcmread(dicom_sample / "other/pylibjpeg-data_RG2_JPLY_fixed.dcm")
    frame = get_frame(broken.PixelData, 0, number_of_frames=1)
    assert repair_sequential_sos(frame) == get_frame(fixed.PixelData, 0, number_of_frames=1) != frame
    good = get_frame(fixed.PixelData, 0, number_of_frames=1)
    assert repair_sequential_sos(good) is good


# ------------------------------------------------------------------------------ synthetic files


def synthetic_cases() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
    rgb[0] = np.arange(48)[:, None] * 5  # greys, where 0.299+0.587+0.114 rounding bites
    big = gen.ramp(200, 200, bits=12)  # > 3x the value range: DCMTK's look-up-table path
    lut = np.clip(np.arange(1024) * 3 // 2, 0, 1023).astype(np.uint16)
    with_lut = gen.make_dataset(gen.ramp(bits=10), bits_stored=10, photometric="MONOCHROME1")
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [1000, 10, 12]
    item.add_new(0x00283006, "US", lut[:1000].tolist())  # LUTData, as US values
    item.ModalityLUTType = "US"
    with_lut.ModalityLUTSequence = [item]
    with_lut.RescaleSlope, with_lut.RescaleIntercept = 3, 5  # ignored in favour of the LUT
    return {
        "mono2_12": gen.make_dicom(gen.ramp(bits=12), bits_stored=12),
        "mono1_10": gen.make_dicom(gen.ramp(bits=10), bits_stored=10, photometric="MONOCHROME1"),
        "mono2_inverse": gen.make_dicom(gen.ramp(bits=12), bits_stored=12, PresentationLUTShape="INVERSE"),
        "mono1_identity": gen.make_dicom(
            gen.ramp(bits=12), bits_stored=12, photometric="MONOCHROME1", PresentationLUTShape="IDENTITY"
        ),
        "signed": gen.make_dicom(gen.ramp(bits=12, signed=True), bits_stored=12),
        "signed_mono1": gen.make_dicom(gen.ramp(bits=12, signed=True), bits_stored=12, photometric="MONOCHROME1"),
        "rescale_fraction": gen.make_dicom(gen.ramp(bits=12), bits_stored=12, RescaleSlope=0.37, RescaleIntercept=-100.3),
        "rescale_negative": gen.make_dicom(gen.ramp(bits=10), bits_stored=10, RescaleSlope=-1.5, RescaleIntercept=7),
        "rescale_ct_style": gen.make_dicom(
            gen.ramp(bits=12, signed=True), bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024
        ),
        "rescale_lut_path": gen.make_dicom(big, bits_stored=12, RescaleSlope=0.37, RescaleIntercept=-100.3),
        "rescale_lut_path_mono1": gen.make_dicom(
            big, bits_stored=12, photometric="MONOCHROME1", RescaleSlope=2.5, RescaleIntercept=-100.7
        ),
        "rescale_32bit_intermediate": gen.make_dicom(
            gen.ramp(300, 300, bits=16), bits_stored=16, RescaleSlope=3.3, RescaleIntercept=-0.5
        ),
        "modality_lut": gen.to_bytes(with_lut),
        "bits8": gen.make_dicom(gen.ramp(bits=8).astype(np.uint8), bits_stored=8),
        "rgb": gen.make_dicom(rgb, photometric="RGB"),
        "multiframe": gen.make_dicom(
            np.stack([gen.ramp(bits=12, seed=s) for s in range(3)]), bits_stored=12, frames=3
        ),
    }


@pytest.fixture(scope="module")
def synthetic() -> dict[str, bytes]:
    return synthetic_cases()


def test_synthetic_mapping_matches_dcmj2pnm(synthetic: dict[str, bytes], tmp_path: Path) -> None:
    tool = require_tool("dcmj2pnm")
    for name, data in synthetic.items():
        ref = dcmj2pnm(tool, data, tmp_path, name)
        assert ref is not None, name
        ours = grey8(decode_dicom(data, ANY))
        assert np.array_equal(ours, ref), f"{name}: {np.count_nonzero(ours != ref)} pixels differ"


def test_mapping_closed_forms(synthetic: dict[str, bytes]) -> None:
    """Spec §10.2 written out, independent of DCMTK: full bit range, MONOCHROME1 onto [1, 255]."""
    v = gen.ramp(bits=12).astype(np.int64)
    assert np.array_equal(grey8(decode_dicom(synthetic["mono2_12"], ANY)), v * 256 // 4096)
    v10 = gen.ramp(bits=10).astype(np.float64)
    assert np.array_equal(grey8(decode_dicom(synthetic["mono1_10"], ANY)), np.trunc(255 - v10 * 254 / 1024))
    s = gen.ramp(bits=12, signed=True).astype(np.int64)
    assert np.array_equal(grey8(decode_dicom(synthetic["signed"], ANY)), (s + 2048) * 256 // 4096)
    assert np.array_equal(grey8(decode_dicom(synthetic["mono1_identity"], ANY)), v * 256 // 4096)
    multi = decode_dicom(synthetic["multiframe"], ANY)
    assert multi.meta["frames"] == 3 and np.array_equal(grey8(multi), v * 256 // 4096)  # frame 1 only


def test_every_transfer_syntax_gives_the_same_image() -> None:
    ds = gen.make_dataset(gen.ramp(128, 96, bits=12), bits_stored=12, photometric="MONOCHROME1")
    expected = grey8(decode_dicom(gen.to_bytes(ds), ANY))
    variants = {
        "implicit": gen.to_bytes(ds, ImplicitVRLittleEndian),
        "big_endian": gen.to_bytes(ds, ExplicitVRBigEndian),
        "deflated": gen.to_bytes(ds, DeflatedExplicitVRLittleEndian),
        "acr_nema": gen.to_bytes(ds, acr_nema=True),
        "rle": gen.compressed(ds, RLELossless),
        "j2k_lossless": gen.compressed(ds, JPEG2000Lossless),
    }
    for name, data in variants.items():
        image = decode_dicom(data, ANY)
        assert np.array_equal(grey8(image), expected), name
    assert looks_like_acr_nema(variants["acr_nema"]) and not looks_like_acr_nema(b"\x89PNG\r\n\x1a\n" + bytes(64))


def test_fast_jpeg_uses_dct_scaling() -> None:
    y, x = np.mgrid[0:2200, 0:2100]
    film = (128 + 100 * np.sin(x / 150.0) * np.cos(y / 170.0)).astype(np.uint8)
    data = gen.jpeg_baseline(film, modality="CR")
    exact = grey8(decode_dicom(data, DecodeOptions()))
    fast = grey8(decode_dicom(data, DecodeOptions(mode="fast")))
    assert exact.shape == (2200, 2100) and fast.shape == (1100, 1050)
    pooled = exact.reshape(1100, 2, 1050, 2).astype(float).mean(axis=(1, 3))
    assert np.abs(pooled - fast).max() < 4


@pytest.mark.parametrize(
    ("text", "years"),
    [("068Y", 68.0), ("68", 68.0), ("68Y ", 68.0), ("6M", 0.5), ("012W", 12 * 7 / 365.25), ("003D", 3 / 365.25),
     ("", None), ("abc", None), ("999Y", 999.0), (None, None)],  # 999Y: parsed; the QC nulls and flags it
)
def test_parse_patient_age(text, years) -> None:
    assert parse_patient_age(text) == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize("age", ["068Y", "68", "816M", "3548W", "024837D"])
def test_patient_age_forms_in_files(age: str) -> None:
    meta = decode_dicom(gen.make_dicom(gen.ramp(8, 8, bits=12), bits_stored=12, PatientAge=age), DecodeOptions()).meta
    assert meta["chronological_age"] == pytest.approx(68.0, abs=0.05)


def test_age_from_birth_and_study_dates_and_other_metadata() -> None:
    data = gen.make_dicom(
        gen.ramp(8, 8, bits=12), bits_stored=12, PatientBirthDate="19500301", StudyDate="20200301",
        ViewPosition="PA", BodyPartExamined="CHEST", PatientSex="F", ImageLaterality="L",
        PatientOrientation=["P", "F"], modality="RG",
    )
    meta = decode_dicom(data, DecodeOptions()).meta
    assert meta["chronological_age"] == pytest.approx(70.0, abs=0.01)
    assert meta["study_date"] == "2020-03-01" and meta["modality"] == "RG"
    assert (meta["view_position"], meta["body_part"], meta["patient_sex"]) == ("PA", "CHEST", "F")
    assert meta["image_laterality"] == "L" and meta["patient_orientation"] == "P\\F"
    no_age = decode_dicom(gen.make_dicom(gen.ramp(8, 8, bits=12), bits_stored=12), DecodeOptions()).meta
    assert no_age["chronological_age"] is None and no_age["study_date"] is None


def test_patient_identity_is_only_ever_a_salted_hash() -> None:
    data = gen.make_dicom(gen.ramp(8, 8, bits=12), bits_stored=12, PatientID="MRN-12345", PatientName="Doe^Jane")
    plain = decode_dicom(data, DecodeOptions()).meta
    salted = decode_dicom(data, DecodeOptions(patient_id_salt="pepper")).meta
    assert "patient_id_hash" not in plain
    assert salted["patient_id_hash"] == hashlib.sha256(b"pepperMRN-12345").hexdigest()
    for meta in (plain, salted):
        assert not any("12345" in str(v) or "Doe" in str(v) for k, v in meta.items() if k != "patient_id_hash")


def test_refusals() -> None:
    ct = gen.make_dicom(gen.ramp(8, 8, bits=12, signed=True), bits_stored=12, modality="CT")
    with pytest.raises(UnsupportedModalityError, match="'CT'"):
        decode_dicom(ct, DecodeOptions())
    assert grey8(decode_dicom(ct, ANY)).shape == (8, 8)
    with pytest.raises(DecompressionBombError, match="exceeds"):
        decode_dicom(gen.bomb_header(60000, 60000), DecodeOptions())
    with pytest.raises(DecompressionBombError):
        decode_dicom(gen.make_dicom(gen.ramp(64, 64, bits=12), bits_stored=12), DecodeOptions(max_pixels=4000))
    with pytest.raises(DecodeError, match="no PixelData"):
        decode_dicom(gen.without_pixel_data(), DecodeOptions())
    with pytest.raises(DecodeError, match="not a DICOM"):
        decode_dicom(b"GIF89a" + bytes(300), DecodeOptions())
    native = gen.make_dicom(gen.ramp(64, 64, bits=12), bits_stored=12)
    with pytest.raises(DecodeError, match="truncated"):
        decode_dicom(native[:-100], DecodeOptions())
    garbage = bytes(128) + b"DICM" + np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError):
        decode_dicom(garbage, DecodeOptions())
