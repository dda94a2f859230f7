"""Cohort report: a scored OUTPUT folder (local or fsspec URL) -> OUTPUT/_cxrage/analysis.json + report.html.

In:  the Parquet files `cxrage score` wrote anywhere under OUTPUT (the output contract: `status`, `error`,
     `cxr_age`, optional `chronological_age`/`age`, `patient_sex`/`sex`, `view_position`/`view`, `qc`, and
     carried manifest columns such as follow-up time and event), plus OUTPUT/_cxrage/summary.json when present.
     Rows flagged with one of `report.cohort.STATS_EXCLUDED_FLAGS` (non_chest, lateral, paediatric, blank,
     orientation_uncertain, age_implausible: films the frontal-adult model is not for) keep their score in the
     Parquet but are left out of every statistic here (`excluded_from_statistics` says how many per flag,
     `n_excluded_from_statistics` how many rows) unless `include_flagged` (then `flagged_in_statistics`); rows
     scored with demo weights make the page open with a banner and analysis.json carry `demo_weights: true`.
Out: `analysis.json` — counts, error kinds, QC flags, the CXR-Age distribution, agreement with chronological
     age, the age gap by sex and view, throughput and provenance, and, given time/event columns, the paper's
     outcome analysis: Cox proportional-hazards models of CXR-Age alone and adjusted for chronological age
     (and sex), as hazard ratios per 5 years of CXR-Age. `report.html` shows the same in one self-contained
     page (plots are PNG data URIs; a Content-Security-Policy forbids loading anything else).

This module only assembles: `analyze` (pure: a DataFrame in, a dict out) gathers the numbers of `report.cohort`,
`report.statistics`, `report.provenance` and `report.cox`; `write_report` reads (`report.read`), analyses,
renders (`report.page`, which only presents the numbers) and writes. matplotlib and lifelines are imported
where used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import InputError
from cxrage_ray.report.cohort import (AGE_COLUMNS, SEX_COLUMNS, VIEW_COLUMNS, cohort, excluded_counts, excluded_rows,
                                      statistics_excluded_flags)
from cxrage_ray.report.cox import cox_models
from cxrage_ray.report.provenance import provenance, throughput, uses_demo_weights
from cxrage_ray.report.read import read_scored, read_summary
from cxrage_ray.report.statistics import describe, errors_by_kind, gap_by, qc_counts, to_json_ready, vs_chronological
from cxrage_ray.runtime.console import ERRORS_NAMED, failed_film_lines, named_errors
from cxrage_ray.storage.files import write_bytes
from cxrage_ray.write.parts import record_uri


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` writes (local paths or URLs); both default to files inside OUTPUT."""

    html: str
    json: str


def _require_time_and_event(time_col: str | None, event_col: str | None) -> None:
    if bool(time_col) != bool(event_col):
        raise InputError("the outcome analysis needs both --time-col and --event-col")


def analyze(frame: pd.DataFrame, summary: dict[str, Any] | None = None, *,
            time_col: str | None = None, event_col: str | None = None,
            include_flagged: bool = False) -> dict[str, Any]:
    """All the report's numbers from scored rows (see module docstring); JSON-ready (NaN -> None).

    `include_flagged`: keep rows with an excluding QC flag in the statistics (`--include-flagged`).

    Raises:
        InputError: only one of `time_col`/`event_col` given, or their values are not usable.
    """
    _require_time_and_event(time_col, event_col)
    flags = statistics_excluded_flags(include_flagged)
    c = cohort(frame, time_col, event_col, flags)
    ok = frame[frame["status"] == "ok"]
    analysis = {
        "n_rows": int(len(frame)),
        "n_ok": int((frame["status"] == "ok").sum()),
        "n_error": int((frame["status"] == "error").sum()),
        "errors_by_kind": errors_by_kind(frame),
        "qc_counts": qc_counts(frame),
        "excluded_from_statistics": excluded_counts(frame, flags),
        "n_excluded_from_statistics": int(excluded_rows(ok, flags).sum()),
        "include_flagged": include_flagged,
        "statistics_exclude_flags": list(flags),
        # with --include-flagged: the rows the default would have left out, per flag, now counted in
        "flagged_in_statistics": excluded_counts(frame, statistics_excluded_flags()) if include_flagged else {},
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


def write_report(output: str | Path, *, time_col: str | None = None, event_col: str | None = None,
                 out_html: str | None = None, out_json: str | None = None,
                 storage: StorageConfig | None = None, include_flagged: bool = False,
                 tell: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Analyse a scored OUTPUT folder and write `report.html` and `analysis.json` (into OUTPUT/_cxrage/ by default).

    Args:
        output: OUTPUT folder of `cxrage score`, local or fsspec URL.
        time_col: manifest column with follow-up time (any unit; shown as given) for the Cox models.
        event_col: manifest column with the event indicator (0/1 or true/false).
        out_html: where to write the page (default OUTPUT/_cxrage/report.html; local or URL).
        out_json: where to write the numbers (default OUTPUT/_cxrage/analysis.json; local or URL).
        storage: credentials/endpoint for remote locations.
        include_flagged: keep rows with an excluding QC flag (`STATS_EXCLUDED_FLAGS`) in the statistics.
        tell: called with each console line saying which rows the statistics leave out (`left_out_lines`).

    Returns:
        The analysis dict written to analysis.json.

    Raises:
        InputError: no Parquet under OUTPUT, a named time/event column is missing or unusable.
    """
    storage = storage or StorageConfig()
    base = str(output).rstrip("/")
    paths = ReportPaths(html=str(out_html or record_uri(base, "report.html")),
                        json=str(out_json or record_uri(base, "analysis.json")))
    _require_time_and_event(time_col, event_col)  # before reading: a million rows is slow to refuse
    frame = read_scored(output, [c for c in (time_col, event_col) if c], storage)
    summary = read_summary(output, storage)
    analysis = analyze(frame, summary, time_col=time_col, event_col=event_col, include_flagged=include_flagged)
    from cxrage_ray.report.page import render_html  # matplotlib and jinja2 are only needed for the page

    statistics_rows = cohort(frame, time_col, event_col, statistics_excluded_flags(include_flagged))
    page = render_html(analysis, frame, statistics_rows)
    write_bytes(paths.json, (json.dumps(analysis, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), storage)
    write_bytes(paths.html, page.encode("utf-8"), storage)
    for line in left_out_lines(analysis, frame, base) if tell else ():
        tell(line)
    return analysis


def left_out_lines(analysis: dict[str, Any], frame: pd.DataFrame, output: str) -> list[str]:
    """Console lines for the rows no statistic includes: flagged films per flag, then the first error rows by
    film name and where the rest are (as `cxrage score` names them)."""
    lines = []
    excluded = analysis["excluded_from_statistics"]
    if excluded:
        n = analysis["n_excluded_from_statistics"]
        why = ", ".join(f"{count} {flag}" for flag, count in excluded.items())
        lines.append(f"cxrage: the statistics leave out {n} flagged film{'s' if n != 1 else ''} ({why}); "
                     "--include-flagged keeps them")
    if analysis["n_error"]:
        lines.append(f"cxrage: the statistics leave out {analysis['n_error']} error row"
                     f"{'s' if analysis['n_error'] != 1 else ''}")
        errors = frame[frame["status"] == "error"].head(ERRORS_NAMED)
        lines += failed_film_lines(named_errors(errors.to_dict(orient="records")), analysis["n_error"], output)
    return lines
