"""One rule for finishing a row, in both itineraries: the film's age, its QC flags, its metadata, its orientation.

In:  a manifest row, the decoder's metadata (or none), and the orientation stage's verdict.
Out: the prepared row's `chronological_age`, `qc`, `META_COLUMNS`, `orientation` and `rotation_source`
     (see `cxrage_ray.contract`), set the same way whether the CPU prepared the picture or the scoring actor did.

The CPU itinerary calls these in its prepare task, the device itinerary in its prepare task (age, metadata) and
in the scoring actor (orientation): two itineraries, one function for each rule, so they cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

from cxrage_ray.contract import META_COLUMNS, QC_AGE_IMPLAUSIBLE, plausible_age
from cxrage_ray.errors import FlaggedSkipped


def recorded_age(meta: Mapping[str, Any], row: Mapping[str, Any], age_column: str | None) -> float | None:
    """The age the film's records give, plausible or not: the DICOM header's, else the manifest's `age_column`."""
    age = meta.get("chronological_age")
    if age is None and age_column and row.get(age_column) is not None:
        try:
            age = float(row[age_column])
        except (TypeError, ValueError):
            age = None
    return None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age)


def finish_row(out: MutableMapping[str, Any], meta: Mapping[str, Any], row: Mapping[str, Any],
               age_column: str | None) -> None:
    """Set a prepared row's age and metadata: an implausible age (outside `PLAUSIBLE_AGE`) becomes null and
    flags `age_implausible`, so it never reaches `cxr_age_gap`, the report's MAE or the `paediatric` flag."""
    age, implausible = plausible_age(recorded_age(meta, row, age_column))
    out["chronological_age"] = age
    qc = [flag for flag in out.get("qc") or [] if flag != QC_AGE_IMPLAUSIBLE]
    out["qc"] = [*qc, QC_AGE_IMPLAUSIBLE] if implausible else qc
    for key in META_COLUMNS:
        out[key] = meta.get(key)


def apply_orientation(out: MutableMapping[str, Any], result: Any) -> None:
    """Record the orientation stage's verdict (`OrientResult`) in a prepared row: its flags come first, the row's
    own (`age_implausible`) after them. Raises `FlaggedSkipped` when `--skip-flagged` keeps the film unscored."""
    out["orientation"] = result.orientation
    out["rotation_source"] = result.rotation_source
    out["qc"] = [*result.qc, *(flag for flag in out.get("qc") or [] if flag not in result.qc)]
    if result.skip:
        raise FlaggedSkipped(f"not scored because of --skip-flagged (qc: {', '.join(result.qc)})")
