"""The report's plots: the cohort frame -> PNG data URIs to embed in report.html.

In:  the cohort frame of `cxrage_ray.report.cohort.cohort` (and, for the scatter, the `vs_chronological`
     numbers of analysis.json; for Kaplan–Meier, the label of the follow-up time).
Out: `data:image/png;base64,...` strings, or None where the cohort has nothing to plot. matplotlib Figure
     objects are used directly (no pyplot): no global figure registry, no GUI backend.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.report.formatting import format_value

#: Above this many points a hexbin reads better (and renders faster) than a scatter.
SCATTER_MAX_POINTS = 20_000
MAX_BINS = 60


def _png_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    # Figure objects directly (not pyplot): no global figure registry, no GUI backend needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_distribution(c: pd.DataFrame) -> str | None:
    """Histogram of CXR-Age, with chronological age outlined on the same bins."""
    if c.empty:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ages = c["chronological_age"].dropna()
    values = np.concatenate([c["cxr_age"].to_numpy(), ages.to_numpy()])
    bins = np.histogram_bin_edges(values, bins="auto")
    if len(bins) > MAX_BINS + 1:  # "auto" gives thousands of bins on huge cohorts
        bins = np.linspace(values.min(), values.max(), MAX_BINS + 1)
    ax.hist(c["cxr_age"], bins=bins, color="#3a6ea5", alpha=0.85, label="CXR-Age")
    if len(ages):
        ax.hist(ages, bins=bins, histtype="step", color="#c0392b", linewidth=1.5, label="chronological age")
        ax.legend()
    ax.set_xlabel("years")
    ax.set_ylabel("radiographs")
    ax.set_title(f"CXR-Age distribution (n = {len(c)})")
    return _png_data_uri(fig)


def plot_scatter(c: pd.DataFrame, stats: dict[str, Any] | None) -> str | None:
    """CXR-Age against chronological age with the identity line; `stats` (vs_chronological) titles it."""
    both = c.dropna(subset=["chronological_age"])
    if both.empty or not stats:
        return None
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    x, y = both["chronological_age"].to_numpy(), both["cxr_age"].to_numpy()
    if len(both) > SCATTER_MAX_POINTS:
        hb = ax.hexbin(x, y, gridsize=60, mincnt=1, cmap="viridis")
        fig.colorbar(hb, ax=ax, label="radiographs")
    else:
        ax.scatter(x, y, s=8, alpha=0.5, color="#3a6ea5", edgecolors="none")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="#c0392b", linewidth=1, label="identity")
    ax.set_xlabel("chronological age (years)")
    ax.set_ylabel("CXR-Age (years)")
    ax.set_title(f"n = {stats['n']}, MAE = {format_value(stats['mae'])}, "
                 f"r = {format_value(stats['pearson_r'], 3)}, mean gap = {format_value(stats['mean_gap'])}",
                 fontsize=10)
    ax.legend(loc="upper left")
    return _png_data_uri(fig)


def plot_gap_boxes(c: pd.DataFrame) -> str | None:
    """Box plots of the age gap per sex and per view (a panel for each that has values)."""
    panels = [(key, c.dropna(subset=["chronological_age", key])) for key in ("sex", "view")]
    panels = [(key, rows) for key, rows in panels if not rows.empty]
    if not panels:
        return None
    fig = _figure(4.0 * len(panels), 4.0)
    for i, (key, rows) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        groups = sorted(rows.groupby(key), key=lambda kv: str(kv[0]))
        ax.boxplot([g["gap"].to_numpy() for _, g in groups], showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), [f"{k}\n(n={len(g)})" for k, g in groups])
        ax.axhline(0, color="#888", linewidth=0.8)
        ax.set_ylabel("CXR-Age − chronological age (years)")
        ax.set_title(f"gap by {key}")
    return _png_data_uri(fig)


def plot_km(c: pd.DataFrame, time_label: str) -> str | None:
    """Kaplan–Meier curves by CXR-Age tertile, as in the paper's figures."""
    if "time" not in c.columns:
        return None
    rows = c.dropna(subset=["time", "event"])
    if len(rows) < 6 or rows["event"].sum() == 0:
        return None
    from lifelines import KaplanMeierFitter

    try:
        groups = pd.qcut(rows["cxr_age"], 3, labels=["lowest third", "middle third", "highest third"])
    except ValueError:  # too few distinct CXR-Ages to cut
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label in groups.cat.categories:
        g = rows[groups == label]
        lo, hi = g["cxr_age"].min(), g["cxr_age"].max()
        km = KaplanMeierFitter().fit(g["time"], g["event"], label=f"CXR-Age {label} ({lo:.0f}–{hi:.0f} y)")
        km.plot_survival_function(ax=ax)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival")
    ax.set_title("Kaplan–Meier by CXR-Age tertile")
    return _png_data_uri(fig)
