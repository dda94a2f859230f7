"""The paper's outcome analysis: the cohort's follow-up -> Cox proportional-hazards models (lifelines).

In:  the cohort frame of `cxrage_ray.report.cohort.cohort` with `time` and `event` columns.
Out: `cox_models(...)`: {"unadjusted": CXR-Age alone, "adjusted": CXR-Age + chronological age (+ sex)}, each
     a JSON-ready dict with the hazard ratio per 5 years of CXR-Age, its 95% CI, p, n and events. A model that
     cannot be fitted carries an `error` text instead of numbers (it never raises).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cxrage_ray.report.statistics import json_float

#: The paper reports hazard ratios per 5 years of CXR-Age.
HR_UNIT_YEARS = 5.0


def sex_coding(labels: Iterable[str]) -> tuple[dict[str, int] | None, str | None]:
    """0/1 coding of sex for the adjusted model, and a note when rows or the variable are left out.

    M/F present: male = 1, rows of other values (e.g. DICOM 'O') left out of the adjusted model. Otherwise
    exactly two levels: the second in sort order = 1. Any other case: sex is not used.
    """
    counts = pd.Series(list(labels), dtype=object).value_counts()
    levels = sorted(counts.index)
    if {"F", "M"} <= set(levels):
        others = int(counts.drop(["F", "M"]).sum())
        note = f"{others} row(s) with sex other than M/F left out" if others else None
        return {"F": 0, "M": 1}, note
    if len(levels) == 2:
        return {levels[0]: 0, levels[1]: 1}, None
    return None, f"sex not used: levels {levels}" if levels else None


def _per_5_years(coef: float) -> float | None:
    return json_float(math.exp(HR_UNIT_YEARS * coef))


def fit_cox(data: pd.DataFrame, covariates: list[str]) -> dict[str, Any]:
    """A Cox PH fit of `time`/`event` on `covariates` (first is `cxr_age`), as the HR per 5 years of CXR-Age.

    Returns:
        hr_per_5y = exp(5·coef) with its 95% CI from lifelines' coefficient bounds scaled the same way, p, n,
        events, covariates, and `terms` (per-unit coef/se/HR/p of every covariate). A fit that cannot be made
        (no events, too few rows, no convergence) gives None numbers and an `error` text instead of raising.
    """
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    data = data.dropna(subset=[*covariates, "time", "event"])
    result: dict[str, Any] = {"hr_per_5y": None, "ci_low": None, "ci_high": None, "p": None,
                              "n": int(len(data)), "events": int(data["event"].sum()), "covariates": covariates}
    if result["events"] == 0 or len(data) < len(covariates) + 2:
        result["error"] = f"cannot fit: {len(data)} rows with {result['events']} events"
        return result
    fitter = CoxPHFitter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitter.fit(data[[*covariates, "time", "event"]], duration_col="time", event_col="event")
    except (ConvergenceError, ValueError, np.linalg.LinAlgError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    summary = fitter.summary
    row = summary.loc["cxr_age"]
    result.update(
        hr_per_5y=_per_5_years(row["coef"]),
        ci_low=_per_5_years(row["coef lower 95%"]),
        ci_high=_per_5_years(row["coef upper 95%"]),
        p=json_float(row["p"]),
        terms={name: {"coef": json_float(r["coef"]), "se": json_float(r["se(coef)"]),
                      "hr": json_float(r["exp(coef)"]), "p": json_float(r["p"])} for name, r in summary.iterrows()},
    )
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    if messages:
        result["warnings"] = messages
    return result


def cox_models(c: pd.DataFrame) -> dict[str, Any]:
    """The paper's two models on ok rows with time and event: CXR-Age alone; adjusted for age (and sex)."""
    rows = c.dropna(subset=["time", "event"])
    out = {"unadjusted": fit_cox(rows, ["cxr_age"])}
    adjusted_rows = rows.dropna(subset=["chronological_age"])
    covariates = ["cxr_age", "chronological_age"]
    coding, note = sex_coding(adjusted_rows["sex"].dropna())
    if coding is not None:
        # rows without a usable sex are left out rather than imputed: the paper adjusted on complete cases
        adjusted_rows = adjusted_rows[adjusted_rows["sex"].isin(list(coding))].assign(
            sex=lambda d: d["sex"].map(coding).astype(float))
        covariates.append("sex")
    adjusted = fit_cox(adjusted_rows, covariates)
    if coding is not None:
        adjusted["sex_coding"] = coding
    if note:
        adjusted["note"] = note
    if adjusted_rows.empty:
        adjusted["error"] = "no chronological age: cannot adjust (give the manifest an `age` column)"
    out["adjusted"] = adjusted
    return out
