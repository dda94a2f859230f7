"""Orientation stage: seed-chain picture -> upright picture, how it was rotated, and quality flags.

In:  the seed chain's uint8 picture (H, W, C), C in {1, 3}, short side 512 (spec §9), plus the row's
     image_id / uri, the decoder's metadata (`patient_orientation`, `view_position`, `body_part`, ...) and the
     chronological age when known; the job's `OrientConfig`.
Out: `OrientResult`: the corrected picture (exact, lossless `np.rot90`/`np.fliplr` of the input), the
     detected clockwise rotation of the input (`orientation`, degrees), where that came from
     (`rotation_source`: list | dicom | model | none) and `qc` flags (non_chest, non_chest_suspected, lateral,
     blank, paediatric, orientation_uncertain).

The correction runs on the seed chain's output, exactly where the original ran `mogrify -rotate 90` on its
PNGs (spec §9); `mogrify -rotate 90` is clockwise and lossless, i.e. `np.rot90(img, k=-1)`.

Sources, in the order `mode="auto"` tries them:
1. the rotation list (`--rotation-list`, `cxrage_ray.orient.rotation_list`): degrees are the clockwise rotation to
   APPLY (mogrify's meaning), so a film listed with 90 was lying 270° clockwise (= 90° counter-clockwise):
   `orientation` reports 270.
2. DICOM Patient Orientation (0020,0020) (`cxrage_ray.orient.dicom_hints.dicom_orientation`).
3. our orientation classifier (`cxrage_ray.orient.classifier.OrientationClassifier`), which also gives the
   `lateral` flag with `use_view_model`. `needs_classifier` says which pictures it sees.

The classifier's turn is applied only when it is confident, the film is no lateral, and the turned picture looks
more like an upright chest film than the picture as it lies (`cxrage_ray.orient.qc.upright_likeness`, a second,
independent opinion); otherwise the row gets `orientation_uncertain` and the film is left as it lies (issue 25:
on films as they come, a wrong turn of an upright film costs more than an unturned turned one, which is flagged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cxrage_ray.config import OrientConfig, RotationSource
from cxrage_ray.orient.classifier import (
    OrientationClassifier,
    OrientationPrediction,
    default_classifier,
)
from cxrage_ray.orient.dicom_hints import (
    DicomOrientation,
    dicom_is_lateral,
    dicom_non_chest,
    dicom_orientation,
)
from cxrage_ray.orient.qc import (
    QC_BLANK,
    QC_LATERAL,
    QC_NON_CHEST,
    QC_NON_CHEST_SUSPECTED,
    QC_ORIENTATION_UNCERTAIN,
    QC_PAEDIATRIC,
    chest_templates,
    excludes,
    is_blank,
    is_paediatric,
    picture_chest_verdict,
    template_thumbnail,
    upright_likeness,
)
from cxrage_ray.orient.thumbnails import Thumbnails

#: A model turn is applied only when the turned picture's `upright_likeness` beats the picture's as it lies by
#: more than this (Pearson correlation with the mean chest film; benchmarks/qc.py).
TURN_LIKENESS_MARGIN = 0.0
#: A model turn of a film whose lateral probability is above this (but not above `lateral_threshold`, which flags
#: it `lateral`) is not applied either: it may be a lateral, and a lateral is never turned into a "frontal".
#: The sample's frontal adult films measure <= 0.07, its laterals >= 0.85 (benchmarks/qc.py).
LATERAL_UNSURE = 0.2


@dataclass(frozen=True)
class OrientResult:
    """The orientation stage's output for one picture.

    Args:
        image: the corrected (upright) picture, same dtype and channels as the input.
        orientation: detected clockwise rotation of the INPUT, degrees (0/90/180/270).
        rotation_source: "list", "dicom", "model" or "none".
        qc: flags, in a fixed order: non_chest, non_chest_suspected, lateral, blank, paediatric,
            orientation_uncertain.
        mirrored: a left-right flip was undone too (DICOM Patient Orientation only).
        skip: the config says flagged rows are not scored and this row has a flag.
        applied: the clockwise rotation actually undone (0 when an uncertain model verdict was not applied).
    """

    image: np.ndarray
    orientation: int
    rotation_source: RotationSource
    qc: list[str] = field(default_factory=list)
    mirrored: bool = False
    skip: bool = False
    applied: int = 0

    @property
    def corrects(self) -> bool:
        """True when the picture was turned or flipped."""
        return bool(self.applied) or self.mirrored


@dataclass(frozen=True)
class KnownRotation:
    """What a row says about its rotation before its picture is looked at.

    Args:
        listed: clockwise degrees to apply, from the rotation list (modes auto and list), or None.
        hint: DICOM Patient Orientation (mode auto only), or None.
    """

    listed: int | None
    hint: DicomOrientation | None


@dataclass(frozen=True)
class _Rotation:
    """The verdict on how the input lies: `rotation` clockwise degrees, from `source`."""

    rotation: int
    source: RotationSource
    mirrored: bool = False
    uncertain: bool = False


def known_rotation(config: OrientConfig, image_id: str | None, uri: str | None,
                   meta: Mapping[str, Any]) -> KnownRotation:
    """The rotation list's entry and the DICOM hint for one row, as far as `config.mode` consults them."""
    listed = None
    if config.mode in ("auto", "list") and config.rotation_list:
        listed = config.rotation_list.lookup(image_id, uri)
    hint = dicom_orientation(meta) if config.mode == "auto" else None
    return KnownRotation(listed=listed, hint=hint)


def needs_classifier(config: OrientConfig, known: KnownRotation) -> bool:
    """Whether the classifier must see this picture: for its rotation (mode auto, and neither the list nor the
    header says how it lies) or for the `lateral` flag (`use_view_model`). `orient` and `orient_batch` both ask."""
    rotation_unknown = config.mode == "auto" and known.listed is None and known.hint is None
    return rotation_unknown or config.use_view_model


def correct_orientation(array: np.ndarray, applied: int, mirrored: bool) -> np.ndarray:
    """Undo a clockwise rotation (and a mirror) of an (H, W[, C]) array: the same operation `orient` applies.

    Used on the decoded film too, so the correction happens before the seed chain and a corrected film is
    pixel-identical to its upright original.
    """
    corrected = np.rot90(array, k=applied // 90)  # counter-clockwise by the detected clockwise rotation
    if mirrored:
        corrected = np.fliplr(corrected)
    return np.ascontiguousarray(corrected)


def orient(
    image_u8: np.ndarray,
    *,
    image_id: str | None,
    uri: str | None,
    meta: Mapping[str, Any] | None,
    chronological_age: float | None,
    config: OrientConfig,
    classifiers: OrientationClassifier | None = None,
    prediction: OrientationPrediction | None = None,
) -> OrientResult:
    """Correct one seed-chain picture's orientation and flag it (see the module docstring).

    Args:
        image_u8: uint8 (H, W, C) picture from the seed chain.
        image_id, uri: the row's identifiers, matched against the rotation list.
        meta: decoder metadata (`patient_orientation`, `view_position`, ...); None or {} for raster files.
        chronological_age: years, or None when unknown.
        config: the job's `OrientConfig`.
        classifiers: the loaded `OrientationClassifier`; None loads the committed one once per process when needed.
        prediction: the classifier's verdict computed beforehand; without one the classifier runs when
            `needs_classifier` says so.
    """
    meta = meta or {}
    image = np.asarray(image_u8)
    known = known_rotation(config, image_id, uri, meta)
    thumbs = Thumbnails(image)  # one grey copy for the classifier, the blank grid and the chest templates
    if prediction is None and needs_classifier(config, known):
        prediction = (classifiers or default_classifier()).predict([thumbs])[0]
    return _result(image, thumbs, known, prediction, meta, chronological_age, config)


def orient_batch(
    images: Sequence[np.ndarray],
    *,
    image_ids: Sequence[str | None],
    uris: Sequence[str | None],
    metas: Sequence[Mapping[str, Any] | None],
    chronological_ages: Sequence[float | None],
    config: OrientConfig,
    classifiers: OrientationClassifier | None = None,
) -> list[OrientResult]:
    """`orient` for a batch, picture by picture the same results; the classifier runs once, on the pictures
    `needs_classifier` picks (and is not loaded when there are none)."""
    if len({len(images), len(image_ids), len(uris), len(metas), len(chronological_ages)}) != 1:
        raise ValueError("orient_batch needs one image_id, uri, meta and age per picture")
    pictures = [np.asarray(image) for image in images]
    metas_given = [meta or {} for meta in metas]
    knowns = [known_rotation(config, image_id, uri, meta) for image_id, uri, meta in zip(image_ids, uris, metas_given)]
    thumbs = [Thumbnails(picture) for picture in pictures]
    predictions = _predict_where_needed(thumbs, [needs_classifier(config, known) for known in knowns], classifiers)
    return [
        _result(picture, thumb, known, prediction, meta, age, config)
        for picture, thumb, known, prediction, meta, age in zip(
            pictures, thumbs, knowns, predictions, metas_given, chronological_ages
        )
    ]


def _predict_where_needed(thumbs: Sequence[Thumbnails], needed: Sequence[bool],
                          classifiers: OrientationClassifier | None) -> list[OrientationPrediction | None]:
    """One batched classifier call over the pictures that need it; None for the others."""
    chosen = [i for i, need in enumerate(needed) if need]
    predictions: list[OrientationPrediction | None] = [None] * len(thumbs)
    if chosen:
        found = (classifiers or default_classifier()).predict([thumbs[i] for i in chosen])
        for i, prediction in zip(chosen, found, strict=True):
            predictions[i] = prediction
    return predictions


def _result(image: np.ndarray, thumbs: Thumbnails, known: KnownRotation, prediction: OrientationPrediction | None,
            meta: Mapping[str, Any], chronological_age: float | None, config: OrientConfig) -> OrientResult:
    """The verdict for one picture once everything about it is known."""
    upright = upright_likeness(template_thumbnail(thumbs), chest_templates())
    lateral = dicom_is_lateral(meta) or (prediction is not None and prediction.lateral_prob > config.lateral_threshold)
    verdict = _checked_model_turn(_rotation(known, prediction, config), prediction, lateral, upright)
    # an uncertain model verdict is reported (orientation + qc flag) but not applied: turning an upright
    # film on a guess would corrupt its score, leaving a rotated one as it is only flags it
    applied = 0 if verdict.uncertain else verdict.rotation
    qc = _flags(thumbs, meta, chronological_age, verdict, lateral, max(upright), config)
    return OrientResult(
        image=correct_orientation(image, applied, verdict.mirrored),
        orientation=int(verdict.rotation),
        rotation_source=verdict.source,
        qc=qc,
        mirrored=verdict.mirrored,
        skip=config.skip_flagged and excludes(qc),  # a warning (non_chest_suspected) alone does not skip
        applied=applied,
    )


def _checked_model_turn(verdict: _Rotation, prediction: OrientationPrediction | None, lateral: bool,
                        upright: Sequence[float]) -> _Rotation:
    """A confident model turn, kept only when the film is no (possible) lateral and the turn makes the picture
    look more like an upright chest film than it did; else the verdict becomes uncertain (not applied)."""
    if verdict.source != "model" or verdict.uncertain or verdict.rotation == 0 or prediction is None:
        return verdict
    maybe_lateral = lateral or prediction.lateral_prob > LATERAL_UNSURE
    looks_better = upright[verdict.rotation // 90] > upright[0] + TURN_LIKENESS_MARGIN
    return verdict if looks_better and not maybe_lateral else replace(verdict, uncertain=True)


def _rotation(known: KnownRotation, prediction: OrientationPrediction | None, config: OrientConfig) -> _Rotation:
    """The first source that says how the picture lies: the list, the DICOM header, then the classifier."""
    if known.listed is not None:
        return _Rotation((-known.listed) % 360, "list")  # the list gives the rotation to apply, not how it lies
    if known.hint is not None:
        return _Rotation(known.hint.rotation, "dicom", mirrored=known.hint.mirrored)
    if config.mode == "auto" and prediction is not None:
        return _Rotation(prediction.rotation, "model", uncertain=prediction.confidence < config.uncertain_threshold)
    return _Rotation(0, "none")


def _flags(thumbs: Thumbnails, meta: Mapping[str, Any], chronological_age: float | None, verdict: _Rotation,
           lateral: bool, chest_likeness: float, config: OrientConfig) -> list[str]:
    """The qc flags, in `OrientResult.qc`'s order."""
    blank = is_blank(thumbs)
    picture_verdict = None
    if meta:  # DICOM: the header says what the film shows
        non_chest = dicom_non_chest(meta)
    else:  # a raster file says nothing: judge the picture (a blank one is flagged `blank`, which says more)
        if config.non_chest_likeness is not None and not blank:
            picture_verdict = picture_chest_verdict(chest_likeness, config.non_chest_likeness)
        non_chest = picture_verdict == QC_NON_CHEST
    raised = [
        (QC_NON_CHEST, non_chest),
        (QC_NON_CHEST_SUSPECTED, picture_verdict == QC_NON_CHEST_SUSPECTED),
        (QC_LATERAL, lateral),
        (QC_BLANK, blank),
        (QC_PAEDIATRIC, is_paediatric(chronological_age)),
        (QC_ORIENTATION_UNCERTAIN, verdict.uncertain),
    ]
    return [flag for flag, up in raised if up]
