"""One bad film, one error row, on the device itinerary too (issue 37): a 128-film device batch on the CPU with
films failing at each per-film step of the actor (payload parse, upload, mapping, chain, orientation, re-chain,
`--skip-flagged`) gives exactly one row per film, the right error kinds, and the other films the very ages they
get without the bad films beside them (fixed-shape passes make that bitwise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cxrage_ray.orient.stage as orient_stage
import cxrage_ray.preprocess.tensor_dicom as tensor_dicom
from checkpoints import random_state_dict
from cxrage_ray.config import OrientConfig, PrepareSettings, StorageConfig
from cxrage_ray.contract import PAYLOAD_COLUMNS
from cxrage_ray.errors import error_kind
from cxrage_ray.pipeline.device_pictures import DevicePictures
from cxrage_ray.pipeline.payloads import prepare_encoded_batch
from cxrage_ray.predict.predictor import PredictorConfig
from cxrage_ray.predict.scoring import ScoreActor, mark_error
from dicomgen import compressed, jpeg_baseline, make_dataset, ramp
from imagegen import pillow_bytes, radiograph

LABELS = {"weights_sha256": "0" * 64, "preprocess": "seed", "tta": "none", "decode": "exact"}
CONFIG = PredictorConfig(device="cpu", tta="none", batch_size=16)
FILMS = 128


def _small_chest(source: Path, side: int) -> np.ndarray:
    """A real frontal film shrunk to `side` px (QC judges it a chest film; the chain stays cheap on a CPU)."""
    return np.asarray(Image.open(source).convert("L").resize((side, side - 8), Image.BILINEAR))


def _films(folder: Path, cxr_sample: Path) -> pd.DataFrame:
    """128 small real films: PNGs, J2K and JPEG DICOMs, and a child's film (flagged: `--skip-flagged`)."""
    meta = pd.read_csv(cxr_sample / "metadata.csv")
    frontal = [cxr_sample / "images" / Path(f).name for f in meta.loc[meta["view"] == "PA", "file"]
               if Path(f).name.startswith("nih_")]
    uris = []
    for k in range(FILMS - 7):
        path = folder / f"film{k:03d}.png"
        path.write_bytes(pillow_bytes(_small_chest(frontal[k % len(frontal)], 96 + k % 5), "PNG"))
        uris.append(path)
    for k in range(3):
        path = folder / f"j2k{k}.dcm"
        stored = _small_chest(frontal[k + 1], 90 + k).astype(np.uint16) * 16
        path.write_bytes(compressed(make_dataset(stored, bits_stored=12), "1.2.840.10008.1.2.4.90"))
        uris.append(path)
    for k in range(3):
        path = folder / f"jpeg{k}.dcm"
        path.write_bytes(jpeg_baseline(_small_chest(frontal[k + 4], 92 + k)))
        uris.append(path)
    (folder / "sliver.png").write_bytes(pillow_bytes(_small_chest(frontal[7], 88), "PNG"))
    uris.append(folder / "sliver.png")
    ages = [60.0] * len(uris)
    ages[3] = 9.0  # film003.png: a child's age, flagged paediatric
    return pd.DataFrame({"row_id": range(len(uris)), "image_id": [p.name for p in uris],
                         "uri": [str(p) for p in uris], "age": ages})


def _damaged(encoded: pd.DataFrame) -> dict[str, str]:
    """Break payloads the way a damaged transfer or a hostile file would; returns {image_id: expected kind}."""
    rows = encoded.set_index("image_id", drop=False)
    where = {name: encoded.index[encoded["image_id"] == name][0] for name in encoded["image_id"]}
    col = encoded.columns.get_loc

    def put(name: str, column: str, value) -> None:
        encoded.iat[where[name], col(column)] = value

    put("j2k0.dcm", "payload", rows.loc["j2k0.dcm", "payload"][:40])  # a corrupt codestream
    put("j2k1.dcm", "payload_header", "{not json")  # a frame header that does not parse
    header = json.loads(rows.loc["j2k2.dcm", "payload_header"])
    put("j2k2.dcm", "payload_header", json.dumps({**header, "rows": 90000, "columns": 90000}))  # an absurd size
    put("film001.png", "payload_header", json.dumps({"shape": [70000, 70000, 1]}))  # an absurd picture size
    put("film002.png", "payload_header", json.dumps({"shape": [5, 5, 1]}))  # bytes that do not fill the shape
    put("film007.png", "payload_header", "")  # a picture header that does not parse
    params = dict(json.loads(rows.loc["jpeg2.dcm", "payload_header"]))
    params["params"] = {**params["params"], "bits_stored": "twelve"}  # a header field of the wrong type
    put("jpeg2.dcm", "payload_header", json.dumps(params))
    sliver = (np.arange(2 * 400) % 251).astype(np.uint8)  # a picture the chain refuses (the prepare task would too)
    put("sliver.png", "payload", sliver.tobytes())
    put("sliver.png", "payload_header", json.dumps({"shape": [2, 400, 1]}))
    return {"j2k0.dcm": "DecodeError", "j2k1.dcm": "DecodeError", "j2k2.dcm": "DecompressionBombError",
            "jpeg2.dcm": "DecodeError", "jpeg1.dcm": "OverflowError", "film001.png": "DecompressionBombError", "film002.png": "DecodeError", "film007.png": "DecodeError",
            "sliver.png": "DecompressionBombError", "film003.png": "FlaggedSkipped",
            "film004.png": "RuntimeError", "film005.png": "ValueError"}


@pytest.fixture(scope="module")
def actor_and_rows(tmp_path_factory, cxr_sample: Path) -> tuple[ScoreActor, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("films")
    orient = OrientConfig(mode="auto", skip_flagged=True, rotation_list={"film004.png": 90, "film006.png": 90})
    encoded = prepare_encoded_batch(_films(folder, cxr_sample), PrepareSettings(storage=StorageConfig(), orient=orient,
                                                                    age_column="age"))
    actor = ScoreActor([random_state_dict(seed=5)], CONFIG, LABELS, source=DevicePictures(orient=orient))
    return actor, encoded


def test_every_bad_film_is_its_own_error_row_and_the_others_keep_their_ages(actor_and_rows, monkeypatch) -> None:
    actor, encoded = actor_and_rows
    assert len(encoded) == FILMS and set(encoded["payload_kind"]) == {"codestream", "grey8"}
    assert (encoded["status"] == "ok").all()
    batch = encoded.copy()
    expected = _damaged(batch)
    bad = set(expected)
    good = batch[~batch["image_id"].isin(bad)]
    alone = actor(good.copy()).set_index("image_id")

    real_orient, real_turn = orient_stage.orient_batch, _turn_of(actor)

    def orient_batch(images, **kw):  # the orientation stage failing on one film (a library error, say)
        if "film005.png" in kw["image_ids"]:
            raise ValueError("the classifier could not read this picture")
        return real_orient(images, **kw)

    def turn(array, applied, mirrored):  # the re-chain of one turned film failing (a device error, say)
        if array.shape[0] == _q16_height(batch, "film004.png"):
            raise RuntimeError("device out of memory while re-chaining")
        return real_turn(array, applied, mirrored)

    def q16_table(values, params, lo, hi):  # the mapping failing on one frame
        if values.shape[1] == _frame_columns(batch, "jpeg1.dcm"):
            raise OverflowError("the mapping's table would not fit")
        return real_table(values, params, lo, hi)

    real_table = tensor_dicom._q16_table
    monkeypatch.setattr(tensor_dicom, "_q16_table", q16_table)
    monkeypatch.setattr(orient_stage, "orient_batch", orient_batch)
    monkeypatch.setattr("cxrage_ray.pipeline.device_pictures.turn", turn)
    scored = actor(batch).set_index("image_id")

    assert len(scored) == FILMS and list(scored.index) == list(batch["image_id"])
    assert {name: error_kind(scored.loc[name, "error"]) for name in expected} == expected
    assert "--skip-flagged" in scored.loc["film003.png", "error"] and "paediatric" in scored.loc["film003.png", "qc"]
    # the good films: the very rows they get without the bad films beside them
    kept = scored.loc[alone.index]
    assert kept["status"].tolist() == alone["status"].tolist() and plain(kept["error"]) == plain(alone["error"])
    assert (alone["status"] == "ok").sum() >= FILMS - len(expected) - 3  # a real film or two may be flagged
    ok = alone.index[alone["status"] == "ok"]
    np.testing.assert_array_equal(kept.loc[ok, "cxr_age"].to_numpy(), alone.loc[ok, "cxr_age"].to_numpy())
    assert scored.loc["film006.png", "orientation"] == 270  # the other turned film was re-chained and scored
    assert scored.loc["film006.png", "status"] == alone.loc["film006.png", "status"] == "ok"
    assert not set(PAYLOAD_COLUMNS) & set(scored.columns)


def plain(column: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in column]


def _turn_of(actor: ScoreActor):
    from cxrage_ray.pipeline import device_pictures

    return device_pictures.turn


def _frame_columns(batch: pd.DataFrame, name: str) -> int:
    return json.loads(batch.loc[batch["image_id"] == name, "payload_header"].iat[0])["columns"]


def _q16_height(batch: pd.DataFrame, name: str) -> int:
    return json.loads(batch.loc[batch["image_id"] == name, "payload_header"].iat[0])["shape"][0]


class PoisonedSource:
    """A picture source whose batch call fails whenever a poisoned film is in the batch (what no per-film step
    caught), and which marks one film an error row itself."""

    consumed = ("pixels",)

    def start(self, device):
        return self

    def pictures(self, batch: pd.DataFrame) -> dict[int, np.ndarray]:
        if (batch["image_id"] == "poison").any():
            raise MemoryError("the whole batch could not be staged")
        out = {}
        for i, name in enumerate(batch["image_id"]):
            if name == "refused":
                mark_error(batch, i, ValueError("refused"))
            else:
                out[i] = np.full((64, 60, 1), 40 + i % 7, dtype=np.uint8)
        return out


def test_a_batch_that_fails_as_a_whole_is_retried_film_by_film() -> None:
    names = ["a", "poison", "refused", "b", "c"]
    rows = pd.DataFrame({"row_id": range(5), "image_id": names, "status": "ok", "error": None,
                         "pixels": b"", "chronological_age": 50.0})
    rows.loc[4, ["status", "error"]] = ["error", "ReadError: gone"]
    scored = ScoreActor([random_state_dict(seed=5)], CONFIG, LABELS, source=PoisonedSource())(rows)
    assert scored["image_id"].tolist() == names and scored["row_id"].tolist() == list(range(5))
    assert scored["status"].tolist() == ["ok", "error", "error", "ok", "error"]
    assert [error_kind(e) for e in scored["error"][1:3]] + [scored["error"].iat[4]] == [
        "MemoryError", "ValueError", "ReadError: gone"]
    assert np.isfinite(scored.loc[[0, 3], "cxr_age"]).all() and scored.loc[[1, 2, 4], "cxr_age"].isna().all()
