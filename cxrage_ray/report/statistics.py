"""The report's numbers: scored rows and their cohort -> JSON-ready counts and summaries.

In:  the scored rows (`status`, `error`, `qc`, ...) and the cohort frame of `cxrage_ray.report.cohort.cohort`.
Out: plain dicts of Python numbers (NaN/inf as None): counts per error kind and QC flag, the CXR-Age
     distribution, its agreement with chronological age, and the gap per group.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.errors import error_kind


def json_float(x: Any) -> float | None:
    """A float for JSON: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def to_json_ready(value: Any) -> Any:
    """Recursively turn numpy scalars into Python ones and NaN/inf into None."""
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return json_float(value)
    return value


def _sample_sd(values: np.ndarray) -> float | None:
    """The sample SD (ddof=1); undefined (None) for a single value."""
    return json_float(values.std(ddof=1)) if len(values) > 1 else None


def describe(values: pd.Series) -> dict[str, Any]:
    """n, mean, sd (sample, ddof=1), median, min, max of the finite values."""
    v = values.astype(float).to_numpy()
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "mean": None, "sd": None, "median": None, "min": None, "max": None}
    return {"n": int(len(v)), "mean": json_float(v.mean()), "sd": _sample_sd(v),
            "median": json_float(np.median(v)), "min": json_float(v.min()), "max": json_float(v.max())}


def pearson_r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, None when undefined (fewer than 2 points or a constant variable)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return json_float(np.corrcoef(x, y)[0, 1])


def vs_chronological(c: pd.DataFrame) -> dict[str, Any] | None:
    """Agreement of CXR-Age with chronological age on rows where both are known; None when none are."""
    both = c.dropna(subset=["chronological_age"])
    if both.empty:
        return None
    gap = both["gap"].to_numpy()
    return {"n": int(len(both)), "mae": json_float(np.abs(gap).mean()),
            "pearson_r": pearson_r(both["cxr_age"].to_numpy(), both["chronological_age"].to_numpy()),
            "mean_gap": json_float(gap.mean()), "sd_gap": _sample_sd(gap), "median_gap": json_float(np.median(gap))}


def gap_by(c: pd.DataFrame, key: str) -> dict[str, dict[str, Any]] | None:
    """Age gap summary per value of `key` ('sex' or 'view'); None when no row has both a gap and a `key`."""
    rows = c.dropna(subset=["chronological_age", key])
    if rows.empty:
        return None
    out = {}
    for label, g in rows.groupby(key, sort=True):
        gap = g["gap"].to_numpy()
        out[str(label)] = {"n": int(len(g)), "mean_gap": json_float(gap.mean()), "sd_gap": _sample_sd(gap),
                           "median_gap": json_float(np.median(gap)), "mae": json_float(np.abs(gap).mean()),
                           "mean_cxr_age": json_float(g["cxr_age"].mean()),
                           "mean_chronological_age": json_float(g["chronological_age"].mean())}
    return out


def errors_by_kind(frame: pd.DataFrame) -> dict[str, int]:
    """How many error rows per error kind (the exception name before the message), sorted by kind."""
    errors = frame.loc[frame["status"] == "error", "error"] if "error" in frame.columns else \
        pd.Series([None] * int((frame["status"] == "error").sum()), dtype=object)
    counts = errors.map(error_kind).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def qc_counts(frame: pd.DataFrame) -> dict[str, int]:
    """How many rows carry each QC flag (a flag counted once per row)."""
    if "qc" not in frame.columns:
        return {}
    counts: dict[str, int] = {}
    for flags in frame["qc"]:
        if flags is None or (isinstance(flags, float) and math.isnan(flags)):
            continue
        for flag in set(str(f) for f in flags if f is not None):
            counts[flag] = counts.get(flag, 0) + 1
    return dict(sorted(counts.items()))
