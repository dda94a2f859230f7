"""The Ray-free batch wrappers: one prepared row per input, error rows, and correction before the seed chain."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cxrage_ray.config import OrientConfig
from cxrage_ray.config import PrepareSettings
from cxrage_ray.pipeline.prepare import prepare_batch
from cxrage_ray.predict.scoring import unpack_picture
from cxrage_ray.config import StorageConfig


def _film() -> np.ndarray:
    y, x = np.mgrid[0:300, 0:420]
    film = 110 + 70 * np.sin(x / 23.0) * np.cos(y / 17.0)
    film[:10] = 0  # a border the trim removes: trim is not rotation-symmetric (TL/TR/BL corners)
    return film.astype(np.uint8)


def test_turned_film_is_corrected_before_the_seed_chain(tmp_path):
    upright = _film()
    Image.fromarray(upright).save(tmp_path / "upright.png")
    Image.fromarray(np.rot90(upright, k=-1)).save(tmp_path / "turned.png")  # lying 90 degrees clockwise
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n...")
    rows = pd.DataFrame({"row_id": [0, 1, 2, 3], "image_id": ["upright.png", "turned.png", "broken.png", "gone.png"],
                         "uri": [str(tmp_path / n) for n in ("upright.png", "turned.png", "broken.png", "gone.png")]})
    settings = PrepareSettings(storage=StorageConfig(),
                               orient=OrientConfig(mode="list", rotation_list={"turned.png": 270}))  # rotate 270 cw to undo
    out = prepare_batch(rows, settings).set_index("image_id")
    assert len(out) == 4
    up, turned = out.loc["upright.png"], out.loc["turned.png"]
    assert (turned["orientation"], turned["rotation_source"]) == (90, "list")
    assert np.array_equal(unpack_picture(turned), unpack_picture(up))  # pixel-identical after correction
    assert out.loc["broken.png", "error"].startswith("DecodeError")
    assert out.loc["gone.png", "error"].startswith("ReadError")
    assert out.loc["gone.png", "pixels"] == b""


def test_manifest_problems_become_error_rows_without_a_read(tmp_path):
    """Both itineraries' CPU stages: a marked row is a ManifestError row (its uri is never opened), the
    others are read as usual, and each row says how many storage retries its read took."""
    from cxrage_ray.pipeline.payloads import prepare_encoded_batch
    from cxrage_ray.manifest.build import build_manifest

    Image.fromarray(_film()).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("uri,image_id\na.png,a\n,b\na.png,a\ngopher://h/x.png,g\n")
    manifest = build_manifest(str(tmp_path / "m.csv"), StorageConfig())
    for prepare in (prepare_batch, prepare_encoded_batch):
        out = prepare(manifest, PrepareSettings(storage=StorageConfig()))
        assert out["row_id"].tolist() == [0, 1, 2, 3]
        assert out["status"].tolist() == ["ok", "error", "error", "error"]
        assert out["error"].tolist()[1:] == [
            "ManifestError: row 1: empty uri",
            "ManifestError: row 2: duplicate image_id 'a' (also row 0)",
            "ReadError: cannot read gopher://h/x.png: unsupported scheme 'gopher'",
        ]
        assert out["read_retries"].tolist() == ["{}"] * 4


def test_retry_counts_sum_the_rows_of_a_batch():
    import pyarrow as pa

    from cxrage_ray.pipeline.prepare import retry_counts

    table = pa.table({"row_id": [0, 1, 2], "read_retries": ['{"SlowDown": 2}', "{}", '{"SlowDown": 1, "Timeout": 1}']})
    assert retry_counts(table) == {"SlowDown": 3, "Timeout": 1}
    assert retry_counts(table.to_pandas()) == {"SlowDown": 3, "Timeout": 1}
    assert retry_counts(table.drop(["read_retries"])) == {}


def test_ceiling_stand_in_rows_have_the_prepared_columns_and_constant_scores(tmp_path):
    """The benchmark-only stand-in keeps the real stage's columns (so the real writer takes its rows)."""
    from cxrage_ray.pipeline.stand_in import CeilingStandIn, read_bytes_batch
    from cxrage_ray.predict.scoring import ScoreActor

    Image.fromarray(_film()).save(tmp_path / "film.png")
    rows = pd.DataFrame({"row_id": [0, 1], "image_id": ["film.png", "gone.png"],
                         "uri": [str(tmp_path / "film.png"), str(tmp_path / "gone.png")]})
    settings = PrepareSettings(storage=StorageConfig(), preprocess="none", orient=OrientConfig(mode="off"))
    real, stand_in = prepare_batch(rows, settings), read_bytes_batch(rows, settings)
    assert list(stand_in.columns) == list(real.columns)
    assert stand_in["pixels"].iloc[0] == (tmp_path / "film.png").read_bytes()
    assert stand_in["status"].tolist() == ["ok", "error"] and stand_in["error"].iloc[1].startswith("ReadError")
    scored = ScoreActor([{}], None, {"tta": "none"}, stand_in=CeilingStandIn(score=1.5))(stand_in)
    assert scored["cxr_age"].iloc[0] == 1.5 and np.isnan(scored["cxr_age"].iloc[1])
    assert scored["device"].iloc[0] == "stand-in" and "pixels" not in scored.columns


def test_rows_per_task_auto_is_larger_for_pre_made_pictures():
    from cxrage_ray.config import LIGHT_ROWS_PER_TASK, SEED_ROWS_PER_TASK, RayConfig

    assert RayConfig().rows_per_task_for("seed") == SEED_ROWS_PER_TASK == 16  # heavy work: unchanged
    assert RayConfig().rows_per_task_for("none") == LIGHT_ROWS_PER_TASK > SEED_ROWS_PER_TASK
    assert RayConfig(rows_per_task=3).rows_per_task_for("none") == 3


def test_grey_pictures_ship_one_channel_and_score_as_fastais_rgb_copy(tmp_path):
    """`--preprocess none`: a grey PNG is shipped as one channel (a third of the bytes); the model's views
    replicate it, so its scores are bit-identical to those of fastai's `convert('RGB')` copy (issue 15)."""
    from checkpoints import random_state_dict

    from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
    from cxrage_ray.pipeline.prepare import picture_from_bytes

    films = [_film(), np.rot90(_film()).copy(), (255 - _film()).astype(np.uint8)]
    settings = PrepareSettings(storage=StorageConfig(), preprocess="none")
    grey, rgb = [], []
    for i, film in enumerate(films):
        path = tmp_path / f"f{i}.png"
        Image.fromarray(film).save(path)
        picture, _ = picture_from_bytes(path.read_bytes(), path.name, settings)
        assert picture.shape == film.shape and np.array_equal(picture, film)
        grey.append(picture)
        rgb.append(np.asarray(Image.open(path).convert("RGB")))  # fastai's open_image
    Image.fromarray(films[0]).convert("RGB").save(tmp_path / "rgb.png")
    assert picture_from_bytes((tmp_path / "rgb.png").read_bytes(), "rgb.png", settings)[0].shape[2] == 3

    rows = prepare_batch(pd.DataFrame({"row_id": [0], "image_id": ["f0"], "uri": [str(tmp_path / "f0.png")]}),
                         PrepareSettings(storage=StorageConfig(), preprocess="none", orient=OrientConfig(mode="off")))
    assert rows.loc[0, "channels"] == 1 and len(rows.loc[0, "pixels"]) == films[0].size

    state = random_state_dict(seed=3)
    for tta in ("none", "seed"):
        predictor = AgePredictor(state, PredictorConfig(device="cpu", tta=tta, batch_size=15))
        ours, fastai = predictor.predict(grey), predictor.predict(rgb)
        assert np.array_equal(ours.raw, fastai.raw) and np.array_equal(ours.raw_sd, fastai.raw_sd, equal_nan=True)
