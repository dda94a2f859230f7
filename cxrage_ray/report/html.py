"""The cohort report page: the numbers of `cxrage_ray.report.analysis.analyze` + the cohort -> one self-contained HTML.

In:  the analysis dict, the scored rows (for error examples) and the cohort frame of `report.cohort`.
Out: an HTML string. Plots are matplotlib PNGs embedded as data URIs; a Content-Security-Policy forbids
     loading anything else, so the file can be mailed or opened offline. Every value from the data is
     HTML-escaped (file names and DICOM fields are user-controlled).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.errors import error_kind

#: Above this many points a hexbin reads better (and renders faster) than a scatter.
SCATTER_MAX_POINTS = 20_000
MAX_BINS = 60
#: Error messages shown per kind (they carry file names; analysis.json has counts only).
ERROR_EXAMPLES = 3

# ---------------------------------------------------------------------------------------------- plots


def _png_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    # Figure objects directly (not pyplot): no global figure registry, no GUI backend needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_distribution(c: pd.DataFrame) -> str | None:
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
    r = stats["pearson_r"]
    ax.set_title(f"n = {stats['n']}, MAE = {_fmt(stats['mae'])}, r = {_fmt(r, 3)}, "
                 f"mean gap = {_fmt(stats['mean_gap'])}", fontsize=10)
    ax.legend(loc="upper left")
    return _png_data_uri(fig)


def plot_gap_boxes(c: pd.DataFrame) -> str | None:
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


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
.demo-banner{background:#b00020;color:#fff;padding:.8em 1em;font-size:1.15em;border-radius:4px;margin-bottom:1em}
.demo-banner code{color:#fff}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f5f8}td.l,th.l{text-align:left}code{font-size:.9em;word-break:break-all}
img{max-width:100%;display:block;margin:.6em 0}.muted{color:#777}.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:9em}.card b{display:block;font-size:1.4em}
"""

# Proves in a headless browser that the page scripted and every plot decoded (tests read data-status).
_STATUS_SCRIPT = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (im) {
    return !im.complete || im.naturalWidth === 0; });
  var el = document.getElementById("render-status");
  el.setAttribute("data-status", broken.length ? "broken-images:" + broken.length : "ok");
  el.setAttribute("data-images", String(document.images.length));
  if (broken.length) { console.error("report: " + broken.length + " plot(s) failed to decode"); }
});
"""

# Nothing outside this file may load: keeps the report self-contained and safe to open from anywhere.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) < 1e-3 and value != 0:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _fmt_p(p: float | None) -> str | None:
    """A p-value cell: 3 decimals, scientific below 0.001, '< 1e-300' where it underflowed to 0."""
    if p is None:
        return None
    return "< 1e-300" if p == 0 else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def _table(header: list[str], rows: list[list[Any]], align: str = "l") -> str:
    """An HTML table; `align[i]` is 'l' or 'r' for column i (columns past its end: 'r'). Cells are escaped."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if align[i:i + 1] == "l" else ""
        return f"<{tag}{cls}>{v if tag == 'th' else _fmt(v)}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">' if uri else ""


def _gap_table(groups: dict[str, dict[str, Any]] | None, key: str) -> str:
    if not groups:
        return f'<p class="muted">No rows with both a chronological age and a {key}.</p>'
    return _table([key, "n", "mean gap", "SD gap", "median gap", "MAE", "mean CXR-Age", "mean age"],
                  [[k, g["n"], g["mean_gap"], g["sd_gap"], g["median_gap"], g["mae"], g["mean_cxr_age"],
                    g["mean_chronological_age"]] for k, g in groups.items()])


def _error_examples(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Up to ERROR_EXAMPLES "<uri>: <error>" texts per error kind."""
    errors = frame[frame["status"] == "error"]
    if "error" not in errors.columns or errors.empty:
        return {}
    where = errors["uri"] if "uri" in errors.columns else errors.get("image_id", pd.Series("?", index=errors.index))
    text = where.astype(str) + ": " + errors["error"].astype(str)
    kinds = errors["error"].map(error_kind)
    return {str(k): list(t.head(ERROR_EXAMPLES)) for k, t in text.groupby(kinds, sort=True)}


def _cox_section(cox: dict[str, Any] | None, columns: dict[str, Any]) -> str:
    if cox is None:
        return ('<p class="muted">Not requested: run <code>cxrage report OUTPUT --time-col T --event-col E</code> '
                "with follow-up columns carried from the manifest.</p>")
    rows = []
    for name, model in (("CXR-Age alone", cox["unadjusted"]), ("adjusted", cox["adjusted"])):
        label = name if name != "adjusted" else "adjusted for " + ", ".join(model["covariates"][1:])
        notes = "; ".join(filter(None, [model.get("error"), model.get("note"), *model.get("warnings", [])]))
        rows.append([label, model["hr_per_5y"], model["ci_low"], model["ci_high"], _fmt_p(model["p"]),
                     model["n"], model["events"], notes])
    text = _table(["model", "HR per 5 y CXR-Age", "95% CI low", "95% CI high", "p", "n", "events", "note"],
                  rows, align="lrrrrrrl")
    coding = cox["adjusted"].get("sex_coding")
    note = f" Sex coded {html.escape(json.dumps(coding))}." if coding else ""
    return (text + f'<p class="muted">Cox proportional hazards (lifelines) on ok rows with '
            f"<code>{html.escape(str(columns['time']))}</code> / <code>{html.escape(str(columns['event']))}</code>; "
            f"HR = exp(5·coef), CI = exp(5·(coef ± 1.96·SE)).{note}</p>")


def _demo_banner() -> str:
    return ('<div class="demo-banner" role="alert" id="demo-weights-banner"><b>DEMO WEIGHTS</b> &mdash; these '
            "rows were scored with seeded random weights (<code>--weights demo</code>), not the published CXR-Age "
            "model: every age on this page is meaningless.</div>")


def _excluded_note(excluded: dict[str, int]) -> str:
    if not excluded:
        return ""
    what = ", ".join(f"{n} flagged <code>{html.escape(flag)}</code>" for flag, n in excluded.items())
    return (f'<p class="muted" id="excluded-rows">Left out of every statistic below: {what} (their scores stay '
            "in the Parquet).</p>")


def render_html(analysis: dict[str, Any], frame: pd.DataFrame, c: pd.DataFrame) -> str:
    """The report page for `analysis` (from `analyze`), with plots drawn from the cohort `c`."""
    a = analysis
    stats = a["cxr_age"]
    vs = a["vs_chronological"]
    prov = a["provenance"]
    cards = [("rows", a["n_rows"]), ("ok", a["n_ok"]), ("error", a["n_error"]),
             ("mean CXR-Age", stats["mean"]), ("MAE vs age", vs["mae"] if vs else None),
             ("Pearson r", vs["pearson_r"] if vs else None)]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        "<title>CXR-Age cohort report</title>",
        f"<style>{_CSS}</style></head><body>",
        _demo_banner() if a.get("demo_weights") else "",
        "<h1>CXR-Age cohort report</h1>",
        _excluded_note(a.get("excluded_from_statistics") or {}),
        '<div class="cards">' + "".join(f"<div class='card'>{html.escape(k)}<b>{_fmt(v)}</b></div>"
                                        for k, v in cards) + "</div>",
        "<h2>CXR-Age distribution</h2>",
        _table(["n", "mean", "SD", "median", "min", "max"],
               [[stats["n"], stats["mean"], stats["sd"], stats["median"], stats["min"], stats["max"]]], align=""),
        _img(plot_distribution(c), "CXR-Age histogram"),
        "<h2>CXR-Age vs chronological age</h2>",
    ]
    if vs:
        parts += [_table(["n", "MAE", "Pearson r", "mean gap", "SD gap", "median gap"],
                         [[vs["n"], vs["mae"], vs["pearson_r"], vs["mean_gap"], vs["sd_gap"], vs["median_gap"]]],
                         align=""),
                  _img(plot_scatter(c, vs), "CXR-Age vs chronological age")]
    else:
        parts.append('<p class="muted">No chronological ages (neither <code>chronological_age</code> nor a '
                     "manifest <code>age</code> column has values).</p>")
    parts += ["<h2>Age gap by sex and view</h2>", _gap_table(a["gap_by_sex"], "sex"),
              _gap_table(a["gap_by_view"], "view"), _img(plot_gap_boxes(c), "age gap by sex and view"),
              "<h2>Outcome analysis</h2>", _cox_section(a["cox"], a["columns"]),
              _img(plot_km(c, str(a["columns"]["time"])), "Kaplan-Meier curves by CXR-Age tertile")]
    examples = _error_examples(frame)
    parts += ["<h2>Errors and QC flags</h2>",
              _table(["error kind", "rows", "examples"],
                     [[k, n, " | ".join(examples.get(k, []))] for k, n in a["errors_by_kind"].items()],
                     align="lrl")
              if a["errors_by_kind"] else "<p>No error rows.</p>",
              _table(["QC flag", "rows"], [[k, n] for k, n in a["qc_counts"].items()])
              if a["qc_counts"] else "<p>No QC flags.</p>"]
    tp = a["throughput"]
    parts += ["<h2>Throughput and provenance</h2>",
              _table(["", "value"], [[k, v] for k, v in tp.items()]) if tp else
              '<p class="muted">No summary.json in OUTPUT.</p>',
              _table(["", "value"], [
                  ["weights sha256 (rows)", ", ".join(prov["weights_sha256"]) or None],
                  ["weights sha256 (summary)", prov["summary_weights_sha256"]],
                  ["preprocess", ", ".join(prov["preprocess"]) or None],
                  ["tta", ", ".join(prov["tta"]) or None],
                  *[[f"settings: {k}", v] for k, v in (prov["settings"] or {}).items()],
                  *[[f"version: {k}", v] for k, v in (prov["versions"] or {}).items()],
                  *[[f"report: {k}", v] for k, v in prov["report_versions"].items()],
              ]),
              '<p id="render-status" data-status="pending" hidden></p>',
              f"<script>{_STATUS_SCRIPT}</script></body></html>"]
    return "\n".join(p for p in parts if p)
