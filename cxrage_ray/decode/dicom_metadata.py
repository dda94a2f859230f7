"""A DICOM dataset's output columns: modality, view, sex, dates, the chronological age.

In:  a parsed pydicom dataset and `DecodeOptions` (only its `patient_id_salt`).
Out: `dicom_meta`'s dict (modality, view_position, body_part, patient_sex, study_date, chronological_age, frames,
     photometric, transfer_syntax, image_laterality, patient_orientation, the descriptions the non-chest QC flag
     reads[, patient_id_hash]); and the age parsers behind `chronological_age`.

Patient name and ID never leave this module (only a salted hash, when asked).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom_values import date_value, int_value, text_value


def parse_patient_age(text: Any) -> float | None:
    """PatientAge in years from every real-world form: `068Y`, `68`, `6M`, `012W`, `003D`, `68 Y`.

    Returns None for empty or unparsable values. Implausible ages are returned as they are: the QC step
    (`cxrage_ray.contract.plausible_age`) nulls them and flags the row `age_implausible`, so they are seen.
    """
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YMWDymwd]?)\s*", str(text))
    if not match:
        return None
    value = float(match.group(1))
    unit = match.group(2).upper() or "Y"
    years = {"Y": value, "M": value / 12.0, "W": value * 7.0 / 365.25, "D": value / 365.25}[unit]
    return years


def chronological_age(ds: Any) -> float | None:
    """Age at the study in years: PatientAge when parsable, else (StudyDate - PatientBirthDate).

    When StudyDate is absent the acquisition, series or content date stands in for it.
    """
    age = parse_patient_age(ds.get("PatientAge"))
    if age is not None:
        return age
    birth = date_value(ds.get("PatientBirthDate"))
    if birth is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate", "SeriesDate", "ContentDate"):
        when = date_value(ds.get(keyword))
        if when is not None:
            return (when - birth).days / 365.25  # implausible values are flagged later, not dropped here
    return None


def _anatomic_region(ds: Any) -> str | None:
    """AnatomicRegionSequence's first item as "CODE MEANING" (upper case), or None."""
    try:
        items = ds.get("AnatomicRegionSequence") or []
        if not items:
            return None
        item = items[0]
        text = " ".join(str(v) for v in (item.get("CodeValue"), item.get("CodeMeaning")) if v)
        return text.upper() or None
    except Exception:  # a malformed sequence must not cost the film its score
        return None


def dicom_meta(ds: Any, options: DecodeOptions) -> dict[str, Any]:
    """Output-column metadata of a dataset; never the raw patient name or ID."""
    study_date = date_value(ds.get("StudyDate"))
    meta: dict[str, Any] = {
        "modality": text_value(ds.get("Modality"), upper=True),
        "view_position": text_value(ds.get("ViewPosition"), upper=True),
        "body_part": text_value(ds.get("BodyPartExamined"), upper=True),
        "patient_sex": text_value(ds.get("PatientSex"), upper=True),
        "study_date": study_date.isoformat() if study_date else None,
        "chronological_age": chronological_age(ds),
        "frames": int_value(ds.get("NumberOfFrames"), 1) or 1,
        "photometric": text_value(ds.get("PhotometricInterpretation"), upper=True),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "image_laterality": text_value(ds.get("ImageLaterality") or ds.get("Laterality"), upper=True),
        "patient_orientation": text_value(ds.get("PatientOrientation"), upper=True),
        # what the film shows, for the non_chest QC flag (cxrage_ray.orient.stage.dicom_non_chest)
        "study_description": text_value(ds.get("StudyDescription"), upper=True),
        "series_description": text_value(ds.get("SeriesDescription"), upper=True),
        "protocol_name": text_value(ds.get("ProtocolName"), upper=True),
        "anatomic_region": _anatomic_region(ds),
    }
    if options.patient_id_salt is not None:
        patient_id = str(ds.get("PatientID", "") or "")
        meta["patient_id_hash"] = (
            hashlib.sha256((options.patient_id_salt + patient_id).encode("utf-8")).hexdigest() if patient_id else None
        )
    return meta
