"""QC on real films as a user meets them (issue 25): small JPEG copies, laterals, turned copies, and a classifier
verdict the picture contradicts. The figures over every film and copy: benchmarks/qc.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from cxrage_ray.config import OrientConfig
from cxrage_ray.orient.classifier import OrientationClassifier, OrientationPrediction
from cxrage_ray.orient.qc import (
    NON_CHEST_SUSPECTED_LIKENESS,
    QC_LATERAL,
    QC_NON_CHEST,
    QC_NON_CHEST_SUSPECTED,
    QC_ORIENTATION_UNCERTAIN,
    picture_chest_verdict,
)
from cxrage_ray.orient.stage import orient

#: Films of the committed orientation weights' validation split (never trained on).
FRONTAL = "images/nih_00002578_000.png"
LATERAL = "images/ieee_cavitating-pneumonia-4-day0-L.jpg"
#: A real adult lateral film the first release flagged `non_chest` from its picture (chest likeness 0.39).
LOW_LIKENESS_LATERAL = "images/ieee_16664_2_1.jpg"

AUTO = OrientConfig(mode="auto")


@pytest.fixture(scope="module")
def classifier() -> OrientationClassifier:
    return OrientationClassifier.load()


def _file_as_picture(data: bytes, name: str) -> np.ndarray:
    """A file's bytes -> the seed-chain picture the prepare stage hands to `orient`."""
    from cxrage_ray.config import PrepareSettings, StorageConfig
    from cxrage_ray.pipeline.prepare import picture_from_bytes

    return picture_from_bytes(data, name, PrepareSettings(storage=StorageConfig()))[0]


def _small_jpeg(cxr_sample: Path, name: str, short_side: int, clockwise: int = 0, quality: int = 70) -> np.ndarray:
    """The film downscaled to `short_side` px, turned `clockwise` degrees, saved as a JPEG, then prepared."""
    from PIL import Image

    with Image.open(cxr_sample / name) as im:
        grey = im.convert("L")
        scale = short_side / min(grey.size)
        small = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.LANCZOS)
    small = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(small), k=-(clockwise // 90))))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return _file_as_picture(buf.getvalue(), "copy.jpg")


def _orient(picture: np.ndarray, classifier, **kw):
    return orient(picture, image_id="f", uri="f.jpg", meta={}, chronological_age=50.0, config=AUTO,
                  classifiers=classifier, **kw)


def test_small_upright_frontal_is_neither_excluded_nor_turned(cxr_sample, classifier) -> None:
    for side in (256, 330, 400):
        result = _orient(_small_jpeg(cxr_sample, FRONTAL, side), classifier)
        assert result.applied == 0 and result.qc == [], (side, result.qc, result.orientation)


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_small_turned_frontal_copy_is_turned_back(cxr_sample, classifier, clockwise: int) -> None:
    result = _orient(_small_jpeg(cxr_sample, FRONTAL, 330, clockwise), classifier)
    assert (result.applied, result.rotation_source, result.qc) == (clockwise, "model", [])


@pytest.mark.parametrize("clockwise", [0, 90, 270])
def test_a_lateral_is_flagged_and_never_turned(cxr_sample, classifier, clockwise: int) -> None:
    """The first release turned a lying lateral as if it were a frontal film; now it stays as it lies, flagged
    lateral, and a turn the model proposes is reported as uncertain."""
    result = _orient(_small_jpeg(cxr_sample, LATERAL, 330, clockwise), classifier)
    assert QC_LATERAL in result.qc and result.applied == 0, (clockwise, result.qc, result.orientation)
    assert (QC_ORIENTATION_UNCERTAIN in result.qc) == (result.orientation != 0)


def test_a_confident_turn_the_picture_contradicts_is_not_applied(cxr_sample, classifier) -> None:
    """An upright film the classifier (here: a given verdict) calls lying 90° with confidence: turning it would
    make it look less like an upright chest film, so it stays as it lies, flagged uncertain."""
    from cxrage_ray.decode.image import decode_image
    from cxrage_ray.preprocess.seed_chain import seed_chain

    film = seed_chain(decode_image((cxr_sample / FRONTAL).read_bytes(), FRONTAL))
    wrong = OrientationPrediction(rotation_probs=(0.01, 0.97, 0.01, 0.01), lateral_prob=0.02)
    result = _orient(film, classifier, prediction=wrong)
    assert (result.orientation, result.applied) == (90, 0) and np.array_equal(result.image, film)
    assert QC_ORIENTATION_UNCERTAIN in result.qc
    turned = np.ascontiguousarray(np.rot90(film, k=-1))  # the same verdict on a film that does lie at 90°
    assert _orient(turned, classifier, prediction=wrong).applied == 90


def test_a_real_film_unlike_the_mean_chest_is_only_suspected(cxr_sample, classifier) -> None:
    for copy in (_file_as_picture((cxr_sample / LOW_LIKENESS_LATERAL).read_bytes(), LOW_LIKENESS_LATERAL),
                 _small_jpeg(cxr_sample, LOW_LIKENESS_LATERAL, 300)):
        result = _orient(copy, classifier)
        assert QC_NON_CHEST not in result.qc and QC_LATERAL in result.qc and result.applied == 0, result.qc


def test_picture_verdict_needs_strong_evidence_to_exclude() -> None:
    strong = OrientConfig().non_chest_likeness
    assert strong is not None and strong < NON_CHEST_SUSPECTED_LIKENESS
    assert picture_chest_verdict(strong - 0.01, strong) == QC_NON_CHEST
    assert picture_chest_verdict(strong + 0.01, strong) == QC_NON_CHEST_SUSPECTED
    assert picture_chest_verdict(NON_CHEST_SUSPECTED_LIKENESS, strong) is None


def test_skip_flagged_leaves_out_exclusions_not_warnings() -> None:
    from cxrage_ray.orient.qc import QC_LATERAL, QC_NON_CHEST_SUSPECTED, excludes

    assert not excludes([]) and not excludes([QC_NON_CHEST_SUSPECTED])
    assert excludes([QC_LATERAL]) and excludes([QC_NON_CHEST_SUSPECTED, "orientation_uncertain"])
