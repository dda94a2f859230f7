"""The device itinerary's stages without Ray, on the CPU: bytes-only prepare, then decode + mapping + tensor seed
chain + orientation + model in the actor — scored like the CPU itinerary, film for film."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from checkpoints import random_state_dict
from cxrage_ray.pipeline.device_pictures import DevicePictures
from cxrage_ray.pipeline.payloads import prepare_encoded_batch
from cxrage_ray.config import OrientConfig
from cxrage_ray.predict.predictor import PredictorConfig
from cxrage_ray.config import PrepareSettings
from cxrage_ray.predict.scoring import ScoreActor
from cxrage_ray.pipeline.prepare import prepare_batch
from cxrage_ray.config import StorageConfig
from imagegen import pillow_bytes, radiograph

LABELS = {"weights_sha256": "0" * 64, "preprocess": "seed", "tta": "seed", "decode": "exact"}
DICOMS = ["cxr/WG04_RG1_J2KI.dcm", "cxr/WG04_RG1_JLSN.dcm", "cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm",
          "cxr/barre_CR-MONO1-10-chest_acrnema", "derived/RG1_reencoded_RLELossless.dcm"]


def manifest(uris: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"row_id": range(len(uris)), "image_id": [Path(u).name for u in uris], "uri": uris})


@pytest.fixture(scope="module")
def films(cxr_sample: Path, dicom_sample: Path, tmp_path_factory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("films")
    upright = np.asarray(Image.open(cxr_sample / "images" / "nih_00030654_000.png").convert("L"))
    Image.fromarray(np.rot90(upright, k=-1)).save(tmp / "turned.png")  # lying 90 degrees clockwise
    (tmp / "sixteen.png").write_bytes(pillow_bytes(radiograph(700, 560, seed=2, border=9, dtype=np.uint16), "PNG"))
    (tmp / "broken.dcm").write_bytes((dicom_sample / DICOMS[0]).read_bytes()[:5000])
    images = sorted((cxr_sample / "images").iterdir())
    alpha = [p for p in images if p.name in ("nih_00002578_000.png", "ieee_000001-3.png")]
    uris = [str(p) for p in images[:3] + alpha] + [str(dicom_sample / d) for d in DICOMS]
    uris += [str(tmp / "sixteen.png"), str(tmp / "turned.png"), str(tmp / "broken.dcm"), str(tmp / "missing.png")]
    return manifest(uris)


def plain(column: pd.Series) -> list:
    """Values without the dtype (object vs float columns): nulls as None, whole floats as ints."""
    return [None if pd.isna(v) else int(v) if isinstance(v, float) and v.is_integer() else v for v in column]


def score_both(rows: pd.DataFrame, orient: OrientConfig | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    settings = PrepareSettings(storage=StorageConfig(), orient=orient)
    state = [random_state_dict(seed=5)]
    config = PredictorConfig(device="cpu", batch_size=20)
    cpu = ScoreActor(state, config, {**LABELS, "decode_device": "cpu", "preprocess_engine": "exact"})(
        prepare_batch(rows, settings))
    encoded = prepare_encoded_batch(rows, settings)
    assert "pixels" not in encoded
    device = ScoreActor(state, config, {**LABELS, "preprocess_engine": "tensor"},
                        source=DevicePictures(orient=orient))(encoded)
    return cpu.set_index("image_id"), device.set_index("image_id")


def test_device_itinerary_scores_every_film_like_the_cpu_itinerary(films: pd.DataFrame) -> None:
    assert set(prepare_encoded_batch(films, PrepareSettings(storage=StorageConfig()))["payload_kind"]) >= {
        "codestream", "grey8", "q16"}
    cpu, device = score_both(films, OrientConfig(mode="auto", rotation_list={"turned.png": 270}))
    assert len(device) == len(films) and list(device.index) == list(cpu.index)
    assert (device["status"] == cpu["status"]).all()
    ok = device["status"] == "ok"
    assert ok.sum() == len(films) - 2
    np.testing.assert_array_equal(device.loc[ok, "cxr_age"].to_numpy(), cpu.loc[ok, "cxr_age"].to_numpy())
    np.testing.assert_array_equal(device.loc[ok, "raw_sd"].to_numpy(), cpu.loc[ok, "raw_sd"].to_numpy())
    for column in ("orientation", "rotation_source", "modality", "chronological_age"):
        assert plain(device[column]) == plain(cpu[column]), column
    assert [list(q) for q in device["qc"]] == [list(q) for q in cpu["qc"]]
    assert device.loc["turned.png", "orientation"] == 90
    assert device.loc["broken.dcm", "error"].startswith("DecodeError")
    assert device.loc["missing.png", "error"].startswith("ReadError")
    # no GPU here: every frame, the J2K and JPEG codestreams included, took the CPU fallback — and says so
    assert set(device.loc[ok, "decode_device"]) == {"cpu"}
    assert set(device["preprocess_engine"]) == {"tensor"} and set(cpu["preprocess_engine"]) == {"exact"}
    assert not {"payload", "payload_kind", "alpha", "meta_json"} & set(device.columns)


def test_device_itinerary_keeps_manifest_error_rows(tmp_path: Path) -> None:
    """A row the manifest marked goes through the GPU actor untouched: one row out, its ManifestError kept, and
    the per-row retry counts still there for the driver to sum."""
    (tmp_path / "film.png").write_bytes(pillow_bytes(radiograph(300, 260, seed=3, border=5), "PNG"))
    rows = manifest([str(tmp_path / "film.png"), "", str(tmp_path / "film.png")])
    rows["manifest_problem"] = pd.array([None, "row 1: empty uri", "row 2: duplicate image_id 'film.png' (also row 0)"],
                                        dtype="string")
    settings = PrepareSettings(storage=StorageConfig(), orient=OrientConfig(mode="off"))
    encoded = prepare_encoded_batch(rows, settings)
    scored = ScoreActor([random_state_dict(seed=5)], PredictorConfig(device="cpu", tta="none"), LABELS,
                        source=DevicePictures(orient=None))(encoded)
    assert scored["row_id"].tolist() == [0, 1, 2]
    assert scored["status"].tolist() == ["ok", "error", "error"]
    assert scored["error"].tolist()[1:] == ["ManifestError: row 1: empty uri",
                                            "ManifestError: row 2: duplicate image_id 'film.png' (also row 0)"]
    assert scored["read_retries"].tolist() == ["{}"] * 3


@pytest.mark.parametrize("orient", [OrientConfig(mode="off"), None], ids=["orient", "no-orient"])
def test_an_implausible_age_gives_the_same_row_on_both_itineraries(tmp_path: Path, orient) -> None:
    """The row rule is one function (`pipeline.rows.finish_row`): an age of 150 or -3 is nulled and flagged
    `age_implausible` on both itineraries, so it reaches neither `cxr_age_gap` nor the `paediatric` flag."""
    (tmp_path / "film.png").write_bytes(pillow_bytes(radiograph(300, 260, seed=3, border=5), "PNG"))
    (tmp_path / "child.png").write_bytes(pillow_bytes(radiograph(280, 250, seed=4, border=5), "PNG"))
    rows = manifest([str(tmp_path / "film.png")] * 3 + [str(tmp_path / "child.png")])
    rows["image_id"] = ["old.png", "negative.png", "adult.png", "child.png"]
    rows["age"] = [150.0, -3.0, 45.0, 9.0]
    cpu, device = score_both(rows, orient)
    contract = ["status", "error", "chronological_age", "orientation", "rotation_source", "modality", "device",
                "weights_sha256", "tta", "decode"]
    for column in contract:
        assert plain(device[column]) == plain(cpu[column]), column
    assert [list(q) for q in device["qc"]] == [list(q) for q in cpu["qc"]]
    np.testing.assert_array_equal(device["cxr_age_gap"].to_numpy(), cpu["cxr_age_gap"].to_numpy())
    for frame in (cpu, device):
        assert frame.loc[["old.png", "negative.png"], "chronological_age"].isna().all()
        assert frame.loc[["old.png", "negative.png"], "cxr_age_gap"].isna().all()
        assert all("age_implausible" in qc and "paediatric" not in qc for qc in frame.loc[["old.png", "negative.png"], "qc"])
        assert frame.loc["adult.png", "chronological_age"] == 45.0 and "age_implausible" not in frame.loc["adult.png", "qc"]
        assert np.isfinite(frame.loc["adult.png", "cxr_age_gap"])
        assert ("paediatric" in frame.loc["child.png", "qc"]) == (orient is not None)


def test_decode_in_overlapping_chunks_gives_the_same_pictures_and_rows(films: pd.DataFrame) -> None:
    """Codestreams decode a chunk at a time, the next on a thread while the chain runs: one frame per chunk (the
    most interleaving) gives the same pictures, decode devices and error rows as one chunk for the whole batch."""
    encoded = prepare_encoded_batch(films, PrepareSettings(storage=StorageConfig()))
    results = []
    for chunk in (1, 1000):
        source = DevicePictures().start(None)
        source.decode_chunk = chunk
        batch = encoded.copy()
        pictures = source.pictures(batch)
        results.append((batch, {i: p.numpy() for i, p in pictures.items()}))
    (one, one_pictures), (whole, whole_pictures) = results
    assert sorted(one_pictures) == sorted(whole_pictures) and len(one_pictures) >= len(films) - 3
    for i, picture in whole_pictures.items():
        np.testing.assert_array_equal(one_pictures[i], picture)
    assert plain(one["decode_device"]) == plain(whole["decode_device"])
    assert plain(one["status"]) == plain(whole["status"]) and plain(one["error"]) == plain(whole["error"])
    assert (encoded["payload_kind"] == "codestream").sum() >= 2  # several chunks really ran
