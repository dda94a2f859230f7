"""Cohort report: a scored OUTPUT folder (local or fsspec URL) -> OUTPUT/_cxrage/analysis.json + report.html.

In:  the Parquet files `cxrage score` wrote anywhere under OUTPUT (the output contract: `status`, `error`,
     `cxr_age`, optional `chronological_age`/`age`, `patient_sex`/`sex`, `view_position`/`view`, `qc`, and
     carried manifest columns such as follow-up time and event), plus OUTPUT/_cxrage/summary.json when present.
     Rows flagged `non_chest` keep their score in the Parquet but are left out of every statistic here
     (`excluded_from_statistics` says how many); rows scored with demo weights make the page open with a
     banner and analysis.json carry `demo_weights: true`.
Out: `analysis.json` — counts, error kinds, QC flags, the CXR-Age distribution, agreement with chronological
     age, the age gap by sex and view, throughput and provenance, and, given time/event columns, the paper's
     outcome analysis: Cox proportional-hazards models of CXR-Age alone and adjusted for chronological age
     (and sex), as hazard ratios per 5 years of CXR-Age. `report.html` shows the same in one self-contained
     page (plots are PNG data URIs; a Content-Security-Policy forbids loading anything else).

The numbers come from `analyze` (pure: a DataFrame in, a dict out); `render_html` only presents them.
matplotlib and lifelines are imported where used: they are the `report` extra, not needed for scoring.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import cxrage_ray
from cxrage_ray.errors import CxrAgeError, InputError, error_kind
from cxrage_ray.write.parts import read_json, record_uri
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import is_local, list_files, read_bytes, write_bytes

#: The paper reports hazard ratios per 5 years of CXR-Age.
HR_UNIT_YEARS = 5.0
#: Cohort variables may come from the pipeline (DICOM header) or the manifest; per row, the first non-null wins.
AGE_COLUMNS = ("chronological_age", "age")
SEX_COLUMNS = ("patient_sex", "sex")
VIEW_COLUMNS = ("view_position", "view")
#: Columns the report reads besides the cohort variables and time/event (reading only these keeps a
#: million-row output at a few hundred MB of memory).
BASE_COLUMNS = ("image_id", "uri", "status", "error", "cxr_age", "qc", "weights_sha256", "weights_name",
                "preprocess", "tta")
#: QC flags whose rows are not chest radiographs: their CXR-Age means nothing, so no statistic includes them.
STATS_EXCLUDED_FLAGS = ("non_chest",)
DEMO_WEIGHTS_NAME = "demo"


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` writes (local paths or URLs); both default to files inside OUTPUT."""

    html: str
    json: str


# ---------------------------------------------------------------------------------------------- reading


def find_parquet(output: str | Path, storage: StorageConfig | None = None) -> list[str]:
    """Every `*.parquet` file under `output` (local folder or URL), skipping hidden and `_`-prefixed
    folders/files (temp parts).

    Raises:
        InputError: `output` is not a folder or holds no Parquet.
    """
    def scratch(relative_parts: Iterable[str]) -> bool:  # temp parts live in `_tmp/`, `.staging/`, ...
        return any(part.startswith(("_", ".")) for part in relative_parts)

    output = str(output)
    if is_local(output):
        root = Path(output.removeprefix("file://"))
        if not root.is_dir():
            raise InputError(f"{output} is not a folder: pass the OUTPUT folder that `cxrage score` wrote")
        files = [str(p) for p in sorted(root.rglob("*.parquet"))
                 if p.is_file() and not scratch(p.relative_to(root).parts)]
    else:
        prefix = output.rstrip("/") + "/"
        files = [uri for uri in list_files(output, storage or StorageConfig())
                 if uri.endswith(".parquet") and not scratch(uri.removeprefix(prefix).split("/"))]
    if not files:
        raise InputError(f"no Parquet files under {output}: run `cxrage score INPUT {output}` first")
    return files


def _parquet_source(uri: str, storage: StorageConfig | None):
    """What pyarrow reads: the path itself for local files (read lazily), the object's bytes otherwise."""
    return uri if is_local(uri) else io.BytesIO(read_bytes(uri, storage or StorageConfig()))


def read_scored(output: str | Path, extra_columns: Iterable[str] = (),
                storage: StorageConfig | None = None) -> pd.DataFrame:
    """The scored rows of an OUTPUT folder: the columns the report uses plus `extra_columns`.

    Args:
        output: OUTPUT folder, local or fsspec URL (`s3://bucket/job`).
        extra_columns: further columns to read (time/event); a name absent from every file is an InputError.
        storage: credentials/endpoint for a remote OUTPUT.

    Returns:
        One row per scored input; absent optional columns are simply not in the frame.
    """
    files = find_parquet(output, storage)
    extra = [c for c in extra_columns if c]
    wanted = list(dict.fromkeys([*BASE_COLUMNS, *AGE_COLUMNS, *SEX_COLUMNS, *VIEW_COLUMNS, *extra]))
    tables, available = [], set()
    for uri in files:
        source = _parquet_source(uri, storage)
        names = pq.read_schema(source).names
        available.update(names)
        tables.append(pq.read_table(source, columns=[c for c in wanted if c in names]))
    missing = [c for c in extra if c not in available]
    if missing:
        raise InputError(
            f"column(s) {missing} not in the output under {output}; available: {sorted(available)}. "
            "Name manifest columns that `cxrage score` carried through (--time-col/--event-col)"
        )
    if "status" not in available:
        raise InputError(f"the Parquet under {output} has no `status` column: is it a `cxrage score` output?")
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def read_summary(output: str | Path, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """OUTPUT/_cxrage/summary.json (or an older output's OUTPUT/summary.json) as a dict, or None when absent
    or unreadable (the report does not need it)."""
    try:
        return read_json(str(output), "summary.json", storage or StorageConfig())
    except (OSError, ValueError, CxrAgeError):  # absent (ReadError), unreadable or not JSON
        return None


# ---------------------------------------------------------------------------------------------- cohort


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


def cohort(frame: pd.DataFrame, time_col: str | None = None, event_col: str | None = None) -> pd.DataFrame:
    """The ok rows with a finite CXR-Age, as the analysis columns.

    Returns:
        Columns `cxr_age`, `chronological_age`, `gap` (= cxr_age - chronological_age), `sex` ('M'/'F'/other
        text), `view`, and `time`/`event` when their columns are named. Ages are float years (NaN if unknown).
    """
    ok = frame[(frame["status"] == "ok") & ~excluded_rows(frame)]
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


# ---------------------------------------------------------------------------------------------- numbers


def _num(x: Any) -> float | None:
    """A float for JSON: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def describe(values: pd.Series) -> dict[str, Any]:
    """n, mean, sd (sample, ddof=1), median, min, max of the finite values."""
    v = values.astype(float).to_numpy()
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "mean": None, "sd": None, "median": None, "min": None, "max": None}
    return {"n": int(len(v)), "mean": _num(v.mean()), "sd": _num(v.std(ddof=1)) if len(v) > 1 else None,
            "median": _num(np.median(v)), "min": _num(v.min()), "max": _num(v.max())}


def pearson_r(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, None when undefined (fewer than 2 points or a constant variable)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return _num(np.corrcoef(x, y)[0, 1])


def vs_chronological(c: pd.DataFrame) -> dict[str, Any] | None:
    """Agreement of CXR-Age with chronological age on rows where both are known; None when none are."""
    both = c.dropna(subset=["chronological_age"])
    if both.empty:
        return None
    gap = both["gap"].to_numpy()
    return {"n": int(len(both)), "mae": _num(np.abs(gap).mean()),
            "pearson_r": pearson_r(both["cxr_age"].to_numpy(), both["chronological_age"].to_numpy()),
            "mean_gap": _num(gap.mean()), "sd_gap": _num(gap.std(ddof=1)) if len(gap) > 1 else None,
            "median_gap": _num(np.median(gap))}


def gap_by(c: pd.DataFrame, key: str) -> dict[str, dict[str, Any]] | None:
    """Age gap summary per value of `key` ('sex' or 'view'); None when no row has both a gap and a `key`."""
    rows = c.dropna(subset=["chronological_age", key])
    if rows.empty:
        return None
    out = {}
    for label, g in rows.groupby(key, sort=True):
        gap = g["gap"].to_numpy()
        out[str(label)] = {"n": int(len(g)), "mean_gap": _num(gap.mean()),
                           "sd_gap": _num(gap.std(ddof=1)) if len(gap) > 1 else None,
                           "median_gap": _num(np.median(gap)), "mae": _num(np.abs(gap).mean()),
                           "mean_cxr_age": _num(g["cxr_age"].mean()),
                           "mean_chronological_age": _num(g["chronological_age"].mean())}
    return out


def errors_by_kind(frame: pd.DataFrame) -> dict[str, int]:
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


def excluded_rows(frame: pd.DataFrame) -> pd.Series:
    """True for rows carrying a flag in `STATS_EXCLUDED_FLAGS` (non-chest films)."""
    if "qc" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["qc"].map(lambda flags: flags is not None and not isinstance(flags, float)
                           and any(str(f) in STATS_EXCLUDED_FLAGS for f in flags)).astype(bool)


def excluded_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Scored rows left out of the statistics, per excluding flag."""
    counts = qc_counts(frame[frame["status"] == "ok"])
    return {flag: counts[flag] for flag in STATS_EXCLUDED_FLAGS if counts.get(flag)}


def uses_demo_weights(frame: pd.DataFrame, summary: dict[str, Any] | None) -> bool:
    """True when any row (or the run's summary) was scored with the random demo weights."""
    return DEMO_WEIGHTS_NAME in _distinct(frame, "weights_name") or (summary or {}).get("weights_name") == \
        DEMO_WEIGHTS_NAME


def _distinct(frame: pd.DataFrame, name: str) -> list[str]:
    if name not in frame.columns:
        return []
    return sorted(str(v) for v in frame[name].dropna().unique())


def provenance(frame: pd.DataFrame, summary: dict[str, Any] | None) -> dict[str, Any]:
    """Which weights/settings produced the rows (from the rows themselves) and the run's versions."""
    summary = summary or {}
    return {
        "weights_sha256": _distinct(frame, "weights_sha256"),
        "weights_name": _distinct(frame, "weights_name"),
        "preprocess": _distinct(frame, "preprocess"),
        "tta": _distinct(frame, "tta"),
        "summary_weights_sha256": summary.get("weights_sha256"),
        "versions": summary.get("versions"),
        "settings": summary.get("settings"),
        "report_versions": _report_versions(),
    }


def _report_versions() -> dict[str, str]:
    import lifelines
    import matplotlib

    return {"cxrage_ray": cxrage_ray.__version__, "pandas": pd.__version__, "numpy": np.__version__,
            "lifelines": lifelines.__version__, "matplotlib": matplotlib.__version__}


def throughput(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    keys = ("rows_total", "rows_ok", "rows_error", "rows_scored_this_run", "elapsed_s", "images_per_s", "complete")
    return {k: summary.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------- Cox


def _sex_coding(labels: Iterable[str]) -> tuple[dict[str, int] | None, str | None]:
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
        hr_per_5y=_num(math.exp(HR_UNIT_YEARS * row["coef"])),
        ci_low=_num(math.exp(HR_UNIT_YEARS * row["coef lower 95%"])),
        ci_high=_num(math.exp(HR_UNIT_YEARS * row["coef upper 95%"])),
        p=_num(row["p"]),
        terms={name: {"coef": _num(r["coef"]), "se": _num(r["se(coef)"]), "hr": _num(r["exp(coef)"]),
                      "p": _num(r["p"])} for name, r in summary.iterrows()},
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
    coding, note = _sex_coding(adjusted_rows["sex"].dropna())
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


# ---------------------------------------------------------------------------------------------- analysis


def analyze(frame: pd.DataFrame, summary: dict[str, Any] | None = None, *,
            time_col: str | None = None, event_col: str | None = None) -> dict[str, Any]:
    """All the report's numbers from scored rows (see module docstring); JSON-ready (NaN -> None).

    Raises:
        InputError: only one of `time_col`/`event_col` given, or their values are not usable.
    """
    if bool(time_col) != bool(event_col):
        raise InputError("the outcome analysis needs both --time-col and --event-col")
    c = cohort(frame, time_col, event_col)
    analysis = {
        "n_rows": int(len(frame)),
        "n_ok": int((frame["status"] == "ok").sum()),
        "n_error": int((frame["status"] == "error").sum()),
        "errors_by_kind": errors_by_kind(frame),
        "qc_counts": qc_counts(frame),
        "excluded_from_statistics": excluded_counts(frame),
        "demo_weights": uses_demo_weights(frame, summary),
        "cxr_age": describe(c["cxr_age"]),
        "vs_chronological": vs_chronological(c),
        "gap_by_sex": gap_by(c, "sex"),
        "gap_by_view": gap_by(c, "view"),
        "provenance": provenance(frame, summary),
        "throughput": throughput(summary),
        "columns": {"age": [n for n in AGE_COLUMNS if n in frame.columns],
                    "sex": [n for n in SEX_COLUMNS if n in frame.columns],
                    "view": [n for n in VIEW_COLUMNS if n in frame.columns],
                    "time": time_col, "event": event_col},
        "cox": cox_models(c) if time_col else None,
    }
    return to_json_ready(analysis)


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
        return _num(value)
    return value


# ---------------------------------------------------------------------------------------------- entry point


def write_report(output: str | Path, *, time_col: str | None = None, event_col: str | None = None,
                 out_html: str | None = None, out_json: str | None = None,
                 storage: StorageConfig | None = None) -> dict[str, Any]:
    """Analyse a scored OUTPUT folder and write `report.html` and `analysis.json` (into OUTPUT/_cxrage/ by default).

    Args:
        output: OUTPUT folder of `cxrage score`, local or fsspec URL.
        time_col: manifest column with follow-up time (any unit; shown as given) for the Cox models.
        event_col: manifest column with the event indicator (0/1 or true/false).
        out_html: where to write the page (default OUTPUT/_cxrage/report.html; local or URL).
        out_json: where to write the numbers (default OUTPUT/_cxrage/analysis.json; local or URL).
        storage: credentials/endpoint for remote locations.

    Returns:
        The analysis dict written to analysis.json.

    Raises:
        InputError: no Parquet under OUTPUT, a named time/event column is missing or unusable.
    """
    storage = storage or StorageConfig()
    base = str(output).rstrip("/")
    paths = ReportPaths(html=str(out_html or record_uri(base, "report.html")),
                        json=str(out_json or record_uri(base, "analysis.json")))
    if bool(time_col) != bool(event_col):
        raise InputError("the outcome analysis needs both --time-col and --event-col")
    frame = read_scored(output, [c for c in (time_col, event_col) if c], storage)
    summary = read_summary(output, storage)
    analysis = analyze(frame, summary, time_col=time_col, event_col=event_col)
    from cxrage_ray.report.html import render_html  # matplotlib is only needed for the page

    page = render_html(analysis, frame, cohort(frame, time_col, event_col))
    write_bytes(paths.json, (json.dumps(analysis, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), storage)
    write_bytes(paths.html, page.encode("utf-8"), storage)
    return analysis
