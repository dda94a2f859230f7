"""Where the scored rows came from: rows and summary.json -> weights, settings, versions and throughput.

In:  the scored rows (`weights_sha256`, `weights_name`, `preprocess`, `tta`) and OUTPUT's summary.json (or None).
Out: the `provenance`, `throughput` and `demo_weights` entries of analysis.json, as plain dicts/bools.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

import cxrage_ray
from cxrage_ray.model.registry import DEMO_WEIGHTS_NAME  # their ages mean nothing

#: summary.json entries the report shows as the run's throughput.
THROUGHPUT_KEYS = ("rows_total", "rows_ok", "rows_error", "rows_scored_this_run", "elapsed_s", "images_per_s",
                   "complete")


def distinct(frame: pd.DataFrame, name: str) -> list[str]:
    """The sorted distinct non-null values of column `name` as text ([] when the column is absent)."""
    if name not in frame.columns:
        return []
    return sorted(str(v) for v in frame[name].dropna().unique())


def uses_demo_weights(frame: pd.DataFrame, summary: dict[str, Any] | None) -> bool:
    """True when any row (or the run's summary) was scored with the random demo weights."""
    return DEMO_WEIGHTS_NAME in distinct(frame, "weights_name") or (summary or {}).get("weights_name") == \
        DEMO_WEIGHTS_NAME


def report_versions() -> dict[str, str]:
    """Versions of what computed the report (not of what scored the rows: that is summary.json's)."""
    import lifelines
    import matplotlib

    return {"cxrage_ray": cxrage_ray.__version__, "pandas": pd.__version__, "numpy": np.__version__,
            "lifelines": lifelines.__version__, "matplotlib": matplotlib.__version__}


def provenance(frame: pd.DataFrame, summary: dict[str, Any] | None) -> dict[str, Any]:
    """Which weights/settings produced the rows (from the rows themselves) and the run's versions."""
    summary = summary or {}
    return {
        "weights_sha256": distinct(frame, "weights_sha256"),
        "weights_name": distinct(frame, "weights_name"),
        "preprocess": distinct(frame, "preprocess"),
        "tta": distinct(frame, "tta"),
        "summary_weights_sha256": summary.get("weights_sha256"),
        "versions": summary.get("versions"),
        "settings": summary.get("settings"),
        "report_versions": report_versions(),
    }


def throughput(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's counts and speed from summary.json; None without one."""
    if not summary:
        return None
    return {k: summary.get(k) for k in THROUGHPUT_KEYS}
