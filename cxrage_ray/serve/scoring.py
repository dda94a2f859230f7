"""One uploaded file -> one result object, through the same stage functions as `cxrage score`. No Ray.

In:  `Upload`s (file name, bytes, optional typed chronological age) and the job settings of `cxrage score`
     (`PrepareSettings`: exact decode, radiograph modalities only, seed chain, orientation `auto`).
Out: per file a JSON-ready dict: `filename`, the output-contract fields (cxrage_ray.contract.CONTRACT_NAMES),
     and on request the film as scored (`picture`) and its saliency map (`saliency`) as PNG data URIs.

The path is the batch scorer's, function for function: `prepare_row` (decode -> seed chain -> orientation)
for each file, then `score_prepared` (fastai views, TTA, model, calibration) for a batch of prepared rows,
then `SaliencyMaker` on the same pictures. A served score therefore equals `cxrage score`'s for the same
file and weights.

Privacy: the served object carries age and sex from a DICOM header, never an identifier: no patient ID
(hash or raw), no study date, no URI (uploads have none: they live in memory for the request only).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cxrage_ray.config import SALIENCY_METHODS, PrepareSettings, SaliencyMethod
from cxrage_ray.contract import CONTRACT_NAMES, PIXEL_COLUMNS, empty_prepared_row
from cxrage_ray.decode.dicom_parse import looks_like_acr_nema
from cxrage_ray.decode.image import is_dicom
from cxrage_ray.decode.raster import sniff_format
from cxrage_ray.errors import CxrAgeError, DecodeError, EmptyFileError, error_kind, error_text
from cxrage_ray.pipeline.prepare import prepare_row
from cxrage_ray.predict.scoring import score_prepared, unpack_picture

#: Contract fields a served result never fills: identifiers, dates and storage locations.
WITHHELD_FIELDS = ("uri", "patient_id_hash", "study_date", "saliency_uri")
#: Error kinds answered 415 for a one-file request (the bytes are no image at all).
NOT_AN_IMAGE_KINDS = ("NotAnImageError", "EmptyFileError")


class NotAnImageError(DecodeError):
    """The upload is not a PNG, JPEG, TIFF or DICOM file (judged from its bytes, never its name)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file, held in memory only.

    Args:
        filename: the client's file name (reported back; its extension is only a DICOM hint, as in `score`).
        data: the file's bytes.
        age: chronological age typed by the user (years), used when the file itself carries none.
    """

    filename: str = field(repr=False)  # may itself identify a patient: kept out of reprs, logs and tracebacks
    data: bytes = field(repr=False)
    age: float | None = None


@dataclass(frozen=True, slots=True)
class ScoreOptions:
    """What a request asks for besides the score: a saliency map and/or the film as scored (PNG data URIs)."""

    saliency: SaliencyMethod | None = None
    picture: bool = False


def check_is_image(upload: Upload) -> None:
    """Raise `EmptyFileError` / `NotAnImageError` unless the bytes start like a file `cxrage score` decodes."""
    data = upload.data
    if not data:
        raise EmptyFileError("file is empty (0 bytes)")
    if sniff_format(data) or is_dicom(data, upload.filename) or looks_like_acr_nema(data):
        return
    raise NotAnImageError("not a PNG, JPEG, TIFF or DICOM file (judged from its first bytes)")


def prepare_upload(upload: Upload, settings: PrepareSettings, position: int = 0) -> dict[str, Any]:
    """An upload -> the prepared row `cxrage score`'s CPU stage makes of the same file (never raises).

    The row is what `prepare_row` returns for a manifest row whose uri/image_id is the file name and whose
    `age` column holds the typed age, so DICOM PatientAge wins over a typed age exactly as in `score`.
    """
    row = pd.Series({"row_id": position, "image_id": upload.filename, "uri": upload.filename,
                     "age": upload.age})
    try:
        check_is_image(upload)
    except CxrAgeError as exc:
        return {**empty_prepared_row(), "status": "error", "error": error_text(exc)}
    prepared = prepare_row(row, settings, fetched=upload.data)
    return {**prepared, "row_id": position, "image_id": upload.filename}


def score_films(prepared: Sequence[dict[str, Any]], predictor, labels: dict[str, str],
                saliency_makers: dict[str, Any] | None = None,
                options: Sequence[ScoreOptions] | None = None) -> list[dict[str, Any]]:
    """Score a batch of prepared rows on one model pass: `score_prepared`, then saliency per requested method.

    Args:
        prepared: rows from `prepare_upload` (ok and error rows mixed; error rows pass through unscored).
        predictor: the `AgePredictor` (as held by `cxrage_ray.predict.scoring.ScoreActor`).
        labels: constant columns (weights_sha256, preprocess, tta, decode, device).
        saliency_makers: {"grad": SaliencyMaker, "gradcam": SaliencyMaker} on the predictor's model.
        options: per row, what to add to the result (aligned with `prepared`; default nothing).

    Returns:
        One `result_object` per row, in order.
    """
    options = list(options or [ScoreOptions()] * len(prepared))
    batch = pd.DataFrame(list(prepared))
    scored = score_prepared(batch, predictor, labels)
    extras: list[dict[str, Any]] = [{} for _ in range(len(scored))]
    ok = [i for i in range(len(scored)) if scored.iloc[i]["status"] == "ok"]
    for method in SALIENCY_METHODS:
        wanted = [i for i in ok if options[i].saliency == method]
        if wanted and saliency_makers:
            pngs = saliency_makers[method]([unpack_picture(scored.iloc[i]) for i in wanted])
            for i, png in zip(wanted, pngs):
                extras[i].update(saliency=png_data_uri(png), saliency_method=method)
    for i in ok:
        if options[i].picture:
            extras[i]["picture"] = png_data_uri(picture_png(unpack_picture(scored.iloc[i])))
    rows = scored.drop(columns=PIXEL_COLUMNS).to_dict(orient="records")
    return [{**result_object(row), **extra} for row, extra in zip(rows, extras)]


def result_object(row: dict[str, Any]) -> dict[str, Any]:
    """A scored (or error) row -> the served JSON object: `filename`, every contract field, JSON-safe values."""
    out: dict[str, Any] = {"filename": row.get("image_id")}
    for name in CONTRACT_NAMES:
        out[name] = None if name in WITHHELD_FIELDS else _json_value(row.get(name))
    if out["qc"] is None:
        out["qc"] = []
    return out


def error_object(filename: str, position: int, exc_text: str) -> dict[str, Any]:
    """The served object of a file refused before scoring ("<Kind>: message" as in the output's error column)."""
    return result_object({"image_id": filename, "row_id": position, "status": "error", "error": exc_text})


def is_not_an_image(result: dict[str, Any]) -> bool:
    """True for a result refused because its bytes are no image at all (answered 415 when alone)."""
    return result.get("status") == "error" and error_kind(result.get("error")) in NOT_AN_IMAGE_KINDS


def _json_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def picture_png(picture: np.ndarray) -> bytes:
    """The seed-chain picture the model scored (after orientation correction) as PNG bytes."""
    from PIL import Image

    image = picture[:, :, 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
