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
