"""The row contract every itinerary keeps: what a prepared row holds, and what an output row holds.

In:  nothing; a leaf both itineraries, the writer, the manifest and the server read.
Out: the output columns (`CONTRACT_FIELDS`, `output_schema`), the columns a prepared row carries between the CPU
     stage and the scoring actor (`PIXEL_COLUMNS` for CPU-prepared pictures, `PAYLOAD_COLUMNS` for files the
     scoring actor decodes itself, `META_COLUMNS` for both), and the rules for a row's chronological age.

Every prepared row has every key of `empty_prepared_row()`, with one type per column, so Ray never falls back to
pickled objects, and both itineraries fill it with the same function (`cxrage_ray.pipeline.rows`).
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

#: The output contract (issue 2 + DICOM metadata); other tools read these names.
CONTRACT_FIELDS: list[pa.Field] = [
    pa.field("row_id", pa.int64()),
    pa.field("image_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("cxr_age", pa.float64()),
    pa.field("raw", pa.float64()),
    pa.field("raw_sd", pa.float64()),
    pa.field("chronological_age", pa.float64()),
    pa.field("cxr_age_gap", pa.float64()),
    pa.field("weights_sha256", pa.string()),
    pa.field("weights_name", pa.string()),
    pa.field("preprocess", pa.string()),
    pa.field("tta", pa.string()),
    pa.field("decode", pa.string()),
    pa.field("device", pa.string()),
    pa.field("decode_device", pa.string()),  # "cpu" or "gpu": where the file's pixels were decoded
    pa.field("preprocess_engine", pa.string()),  # "exact" (CPU seed chain) or "tensor" (on the inference device)
    pa.field("orientation", pa.int64()),
    pa.field("rotation_source", pa.string()),
    pa.field("qc", pa.list_(pa.string())),
    pa.field("modality", pa.string()),
    pa.field("view_position", pa.string()),
    pa.field("body_part", pa.string()),
    pa.field("patient_sex", pa.string()),
    pa.field("study_date", pa.string()),
    pa.field("frames", pa.int64()),
    pa.field("patient_id_hash", pa.string()),
    pa.field("saliency_uri", pa.string()),
]
CONTRACT_NAMES = [f.name for f in CONTRACT_FIELDS]

#: A manifest row's problem (blank uri, duplicate image_id), set by the manifest and read by the prepare stage:
#: such a row is not fetched and becomes a `ManifestError` row. Not an output column.
PROBLEM_COLUMN = "manifest_problem"
#: A CPU-prepared picture: uint8 (height, width, channels) as bytes.
PIXEL_COLUMNS = ["pixels", "height", "width", "channels"]
#: A file the scoring actor decodes itself (the device itinerary): `payload` (bytes), `payload_kind`
#: ("codestream" | "grey8" | "q16"), `payload_header` (JSON), `alpha` (uint16 bytes or empty), `meta_json`.
PAYLOAD_COLUMNS = ["payload", "payload_kind", "payload_header", "alpha", "meta_json"]
#: Decoder metadata carried into the output (never raw patient identifiers).
META_COLUMNS = ["modality", "view_position", "body_part", "patient_sex", "study_date", "frames", "patient_id_hash"]
#: Per prepared row: the storage retries its read took, as JSON ``{"SlowDown": 2}`` (``{}`` for none). Summed
#: into summary.json by the driver; not an output column.
RETRIES_COLUMN = "read_retries"
#: Per scored row, with mixed precision: cxr_age minus the same film's fp32 cxr_age (years) for the films the
#: precision audit sampled (`cxrage_ray.predict.precision_audit`), NaN for the others. Summarised into
#: summary.json's `precision_audit` by the driver; not an output column.
PRECISION_DELTA_COLUMN = "precision_delta_years"
#: The columns the scoring actor adds.
SCORE_COLUMNS = ["cxr_age", "raw", "raw_sd", "cxr_age_gap"]

#: Chronological ages outside this range (years) are taken for data errors: nulled and flagged.
PLAUSIBLE_AGE = (0.0, 110.0)
QC_AGE_IMPLAUSIBLE = "age_implausible"


def output_schema(carried: pa.Schema) -> pa.Schema:
    """The contract columns, then the manifest's own columns carried through unchanged."""
    extra = [f for f in carried if f.name not in CONTRACT_NAMES]
    return pa.schema(CONTRACT_FIELDS + extra)


def empty_prepared_row() -> dict[str, Any]:
    """A prepared row with every column and no picture yet (see the module docstring)."""
    return {"status": "ok", "error": None, "pixels": b"", "height": 0, "width": 0, "channels": 0,
            "orientation": None, "rotation_source": None, "qc": [], "chronological_age": None,
            **dict.fromkeys(META_COLUMNS)}


def plausible_age(age: float | None) -> tuple[float | None, bool]:
    """(age, False) for an age within `PLAUSIBLE_AGE` or unknown; (None, True) for an implausible one."""
    if age is None or not math.isfinite(age):
        return None, False
    low, high = PLAUSIBLE_AGE
    return (float(age), False) if low <= age <= high else (None, True)


def png_name(image_id: str) -> str:
    """A per-film PNG's name (saliency maps, `cxrage preprocess`): `a/b/film.dcm` -> `a/b/film.png` (sub-folders
    kept so equal stems in different folders don't collide)."""
    return str(PurePosixPath(image_id).with_suffix(".png"))
