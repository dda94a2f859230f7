"""The cohort the statistics are computed on: scored rows -> one tidy frame of analysis columns.

In:  the scored rows of `cxrage_ray.report.read.read_scored` (output-contract columns plus carried manifest
     columns), and optionally the names of the follow-up time and event columns.
Out: `cohort(...)`: the ok rows with a finite CXR-Age that are films the model is for (not flagged with one of
     `statistics_excluded_flags`), as `cxr_age`, `chronological_age`, `gap`, `sex`, `view` (and `time`/`event`);
     `excluded_rows(...)`: which rows no statistic includes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cxrage_ray.contract import QC_AGE_IMPLAUSIBLE
from cxrage_ray.errors import InputError
from cxrage_ray.orient.qc import QC_BLANK, QC_LATERAL, QC_NON_CHEST, QC_ORIENTATION_UNCERTAIN, QC_PAEDIATRIC

#: Cohort variables may come from the pipeline (DICOM header) or the manifest; per row, the first non-null wins.
AGE_COLUMNS = ("chronological_age", "age")
SEX_COLUMNS = ("patient_sex", "sex")
VIEW_COLUMNS = ("view_position", "view")
#: QC flags whose rows the statistics leave out by default. CXR-Age is a model of frontal chest films of adults:
#: a film that is no chest film, a lateral, a child's, a blank one or one whose orientation is uncertain says
#: nothing about it, and an implausible age is a data error. Flags that only warn (e.g. `non_chest_suspected`)
#: are not here. Their rows keep their scores in the Parquet; `cxrage report --include-flagged` keeps them in.
STATS_EXCLUDED_FLAGS = (QC_NON_CHEST, QC_LATERAL, QC_PAEDIATRIC, QC_BLANK, QC_ORIENTATION_UNCERTAIN,
                        QC_AGE_IMPLAUSIBLE)


def statistics_excluded_flags(include_flagged: bool = False) -> tuple[str, ...]:
    """The flags whose rows no statistic includes: `STATS_EXCLUDED_FLAGS`, or none with `--include-flagged`.
    The one rule the numbers (analysis.json), the page and the console follow."""
    return () if include_flagged else STATS_EXCLUDED_FLAGS


def _flag_lists(frame: pd.DataFrame) -> pd.Series:
    """Each row's QC flags as a list of text (empty for a null)."""
    if "qc" not in frame.columns:
        return pd.Series([[]] * len(frame), index=frame.index, dtype=object)
    return frame["qc"].map(lambda flags: [] if flags is None or isinstance(flags, float)
                           else [str(f) for f in flags if f is not None])


def excluded_rows(frame: pd.DataFrame, flags: tuple[str, ...] = STATS_EXCLUDED_FLAGS) -> pd.Series:
    """True for rows carrying one of `flags` (default `STATS_EXCLUDED_FLAGS`)."""
    wanted = set(flags)
    return _flag_lists(frame).map(lambda row_flags: bool(wanted.intersection(row_flags))).astype(bool)


def excluded_counts(frame: pd.DataFrame, flags: tuple[str, ...] = STATS_EXCLUDED_FLAGS) -> dict[str, int]:
    """Scored (ok) rows left out of the statistics, per excluding flag in `flags`' order (a row with two such
    flags counts for both; `excluded_rows(...).sum()` counts it once)."""
    per_row = _flag_lists(frame[frame["status"] == "ok"]).map(set)
    counts = {flag: int(per_row.map(lambda row_flags: flag in row_flags).sum()) for flag in flags}
    return {flag: n for flag, n in counts.items() if n}


def _coalesce(frame: pd.DataFrame, names: Iterable[str]) -> pd.Series:
    """Per row, the first non-null value among the columns `names` that exist (all-null when none)."""
    out = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    for name in reversed(list(names)):
        if name in frame.columns:
            col = frame[name].astype(object)
            out = col.where(col.notna(), out)
    return out


def _sex_label(value: Any) -> str | None:
    """'M'/'F' for the usual spellings (DICOM M/F/O, male/female); other values as trimmed text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        text = str(int(value))
    upper = text.upper()
    if upper in ("M", "MALE"):
        return "M"
    if upper in ("F", "FEMALE"):
        return "F"
    return text or None


def _text_label(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _event_values(series: pd.Series, name: str) -> pd.Series:
    """An event column as float 0/1 (NaN where missing). Accepts bool, 0/1 numbers, and true/false text."""
    mapped = series.astype(object).map(
        lambda v: {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}.get(v.strip().lower(), v)
        if isinstance(v, str) else v
    )
    numeric = pd.to_numeric(mapped.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v),
                            errors="coerce")
    bad = numeric.notna() & ~numeric.isin([0.0, 1.0])
    if (series.notna() & numeric.isna()).any() or bad.any():
        example = series[(series.notna() & numeric.isna()) | bad].iloc[0]
        raise InputError(f"event column {name!r} must hold 0/1 or true/false; found {example!r}")
    return numeric.astype(float)


def _time_values(series: pd.Series, name: str) -> pd.Series:
    numeric = pd.to_numeric(series, errors="coerce")
    if (series.notna() & numeric.isna()).any():
        example = series[series.notna() & numeric.isna()].iloc[0]
        raise InputError(f"time column {name!r} must be numeric (follow-up time); found {example!r}")
    if (numeric < 0).any():
        raise InputError(f"time column {name!r} has negative follow-up times")
    return numeric.astype(float)


def cohort(frame: pd.DataFrame, time_col: str | None = None, event_col: str | None = None,
           excluded_flags: tuple[str, ...] = STATS_EXCLUDED_FLAGS) -> pd.DataFrame:
    """The ok rows with a finite CXR-Age and none of `excluded_flags`, as the analysis columns.

    Returns:
        Columns `cxr_age`, `chronological_age`, `gap` (= cxr_age - chronological_age), `sex` ('M'/'F'/other
        text), `view`, and `time`/`event` when their columns are named. Ages are float years (NaN if unknown).

    Raises:
        InputError: the time or event column holds values that are not follow-up times / 0-1 events.
    """
    ok = frame[(frame["status"] == "ok") & ~excluded_rows(frame, excluded_flags)]
    cxr = pd.to_numeric(ok["cxr_age"], errors="coerce").astype(float) if "cxr_age" in ok.columns else \
        pd.Series(np.nan, index=ok.index)
    ok, cxr = ok[np.isfinite(cxr)], cxr[np.isfinite(cxr)]
    out = pd.DataFrame(index=ok.index)
    out["cxr_age"] = cxr
    out["chronological_age"] = pd.to_numeric(_coalesce(ok, AGE_COLUMNS), errors="coerce").astype(float)
    out["gap"] = out["cxr_age"] - out["chronological_age"]
    out["sex"] = _coalesce(ok, SEX_COLUMNS).map(_sex_label).astype(object)
    out["view"] = _coalesce(ok, VIEW_COLUMNS).map(_text_label).astype(object)
    if time_col:
        out["time"] = _time_values(ok[time_col], time_col)
    if event_col:
        out["event"] = _event_values(ok[event_col], event_col)
    return out.reset_index(drop=True)
