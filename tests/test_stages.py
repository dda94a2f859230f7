"""The Ray-free batch wrappers: one prepared row per input, error rows, and correction before the seed chain."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cxrage_ray.orient import OrientConfig
from cxrage_ray.stages import PrepareSettings, prepare_batch, unpack_picture
from cxrage_ray.storage import StorageConfig


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
    from cxrage_ray.device_stages import prepare_encoded_batch
    from cxrage_ray.manifest import build_manifest

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

    from cxrage_ray.stages import retry_counts

    table = pa.table({"row_id": [0, 1, 2], "read_retries": ['{"SlowDown": 2}', "{}", '{"SlowDown": 1, "Timeout": 1}']})
    assert retry_counts(table) == {"SlowDown": 3, "Timeout": 1}
    assert retry_counts(table.to_pandas()) == {"SlowDown": 3, "Timeout": 1}
    assert retry_counts(table.drop(["read_retries"])) == {}
