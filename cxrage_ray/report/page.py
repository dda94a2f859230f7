"""The cohort report page: analysis.json's numbers + the cohort -> one self-contained HTML string.

In:  the analysis dict of `cxrage_ray.report.analysis.analyze`, the scored rows (for error examples) and the
     cohort frame of `cxrage_ray.report.cohort.cohort` (for the plots).
Out: report.html as a string, rendered from the packaged Jinja2 template `templates/report.html.j2` with
     autoescape on: every value from the data (file names, error texts, DICOM fields, manifest column names and
     values) is HTML-escaped by the template, never by hand here. Plots are matplotlib PNGs embedded as data
     URIs; the template's Content-Security-Policy forbids loading anything else, so the file can be mailed or
     opened offline.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import jinja2
import pandas as pd

from cxrage_ray.errors import error_kind
from cxrage_ray.report.formatting import format_p_value, format_value
from cxrage_ray.report.plots import plot_distribution, plot_gap_boxes, plot_km, plot_scatter

TEMPLATE_PACKAGE = "cxrage_ray.report"
TEMPLATE_FOLDER = "templates"
TEMPLATE_NAME = "report.html.j2"
#: Error messages shown per kind (they carry file names; analysis.json has counts only).
ERROR_EXAMPLES = 3
#: The red banner of a page whose ages come from the demo weights (style and markup): the report includes it,
#: and `cxrage serve`'s page shows the same (`demo_banner_html`).
DEMO_BANNER_TEMPLATE = "demo_banner.html"


@dataclass(frozen=True)
class Table:
    """A table for the template's `table` macro: raw cell values (the template formats and escapes them).

    `align[i]` is 'l' (left) or anything else (right) for column i; columns past its end are right-aligned.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    align: str = "l"

    def left_aligned(self, column: int) -> bool:
        return self.align[column:column + 1] == "l"


@functools.lru_cache(maxsize=1)
def template_environment() -> jinja2.Environment:
    """The Jinja2 environment of the report templates (built once: parsing the template is the slow part)."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, TEMPLATE_FOLDER),
        autoescape=True,  # every template here is HTML; escaping is never left to the caller
        undefined=jinja2.StrictUndefined,  # a misspelt or missing value fails the render, not shows blank
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["fmt"] = format_value
    return environment


def demo_banner_html() -> str:
    """The demo-weights banner as HTML (a `<style>` and a `div#demo-weights-banner`), exactly as the report shows
    it."""
    return template_environment().get_template(DEMO_BANNER_TEMPLATE).render()


def error_examples(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Up to ERROR_EXAMPLES "<uri>: <error>" texts per error kind."""
    errors = frame[frame["status"] == "error"]
    if "error" not in errors.columns or errors.empty:
        return {}
    where = errors["uri"] if "uri" in errors.columns else errors.get("image_id", pd.Series("?", index=errors.index))
    text = where.astype(str) + ": " + errors["error"].astype(str)
    kinds = errors["error"].map(error_kind)
    return {str(k): list(t.head(ERROR_EXAMPLES)) for k, t in text.groupby(kinds, sort=True)}


def _gap_table(groups: dict[str, dict[str, Any]] | None, key: str) -> Table | None:
    if not groups:
        return None
    return Table([key, "n", "mean gap", "SD gap", "median gap", "MAE", "mean CXR-Age", "mean age"],
                 [[k, g["n"], g["mean_gap"], g["sd_gap"], g["median_gap"], g["mae"], g["mean_cxr_age"],
                   g["mean_chronological_age"]] for k, g in groups.items()])


def _cox_view(cox: dict[str, Any] | None, columns: dict[str, Any]) -> dict[str, Any] | None:
    """The outcome section's table and the names it cites; None when no outcome analysis was requested."""
    if cox is None:
        return None
    rows = []
    for name, model in (("CXR-Age alone", cox["unadjusted"]), ("adjusted", cox["adjusted"])):
        label = name if name != "adjusted" else "adjusted for " + ", ".join(model["covariates"][1:])
        notes = "; ".join(filter(None, [model.get("error"), model.get("note"), *model.get("warnings", [])]))
        rows.append([label, model["hr_per_5y"], model["ci_low"], model["ci_high"], format_p_value(model["p"]),
                     model["n"], model["events"], notes])
    coding = cox["adjusted"].get("sex_coding")
    return {"table": Table(["model", "HR per 5 y CXR-Age", "95% CI low", "95% CI high", "p", "n", "events",
                            "note"], rows, align="lrrrrrrl"),
            "time_col": str(columns["time"]), "event_col": str(columns["event"]),
            "sex_coding": json.dumps(coding) if coding else None}


def _joined(values: Sequence[str]) -> str | None:
    return ", ".join(values) or None


def _provenance_table(prov: dict[str, Any]) -> Table:
    return Table(["", "value"], [
        ["weights sha256 (rows)", _joined(prov["weights_sha256"])],
        ["weights sha256 (summary)", prov["summary_weights_sha256"]],
        ["preprocess", _joined(prov["preprocess"])],
        ["tta", _joined(prov["tta"])],
        *[[f"settings: {k}", v] for k, v in (prov["settings"] or {}).items()],
        *[[f"version: {k}", v] for k, v in (prov["versions"] or {}).items()],
        *[[f"report: {k}", v] for k, v in prov["report_versions"].items()],
    ])


def _error_table(counts: dict[str, int], examples: dict[str, list[str]]) -> Table | None:
    if not counts:
        return None
    return Table(["error kind", "rows", "examples"],
                 [[k, n, " | ".join(examples.get(k, []))] for k, n in counts.items()], align="lrl")


def _plots(a: dict[str, Any], c: pd.DataFrame) -> dict[str, str | None]:
    """Every plot's data URI (None: nothing to plot), keyed as the template names them."""
    return {"distribution": plot_distribution(c),
            "scatter": plot_scatter(c, a["vs_chronological"]) if a["vs_chronological"] else None,
            "gap_boxes": plot_gap_boxes(c),
            "km": plot_km(c, str(a["columns"]["time"]))}


def page_context(a: dict[str, Any], frame: pd.DataFrame, c: pd.DataFrame) -> dict[str, Any]:
    """What the template shows, as raw values and `Table`s (nothing here is HTML)."""
    stats, vs, tp = a["cxr_age"], a["vs_chronological"], a["throughput"]
    cards = [("rows", a["n_rows"]), ("ok", a["n_ok"]), ("error", a["n_error"]),
             ("mean CXR-Age", stats["mean"]), ("MAE vs age", vs["mae"] if vs else None),
             ("Pearson r", vs["pearson_r"] if vs else None)]
    return {
        "demo_weights": bool(a.get("demo_weights")),
        "excluded": a.get("excluded_from_statistics") or {},
        "n_excluded": a.get("n_excluded_from_statistics") or 0,
        "flagged_included": a.get("flagged_in_statistics") or {},
        "cards": cards,
        "distribution": Table(["n", "mean", "SD", "median", "min", "max"],
                              [[stats["n"], stats["mean"], stats["sd"], stats["median"], stats["min"],
                                stats["max"]]], align=""),
        "vs_chronological": Table(["n", "MAE", "Pearson r", "mean gap", "SD gap", "median gap"],
                                  [[vs["n"], vs["mae"], vs["pearson_r"], vs["mean_gap"], vs["sd_gap"],
                                    vs["median_gap"]]], align="") if vs else None,
        "gap_tables": [("sex", _gap_table(a["gap_by_sex"], "sex")), ("view", _gap_table(a["gap_by_view"], "view"))],
        "cox": _cox_view(a["cox"], a["columns"]),
        "errors": _error_table(a["errors_by_kind"], error_examples(frame)),
        "qc": Table(["QC flag", "rows"], [[k, n] for k, n in a["qc_counts"].items()]) if a["qc_counts"] else None,
        "throughput": Table(["", "value"], [[k, v] for k, v in tp.items()]) if tp else None,
        "provenance": _provenance_table(a["provenance"]),
        "plots": _plots(a, c),
    }


def render_html(analysis: dict[str, Any], frame: pd.DataFrame, c: pd.DataFrame) -> str:
    """The report page for `analysis` (from `analyze`), with plots drawn from the cohort `c`."""
    template = template_environment().get_template(TEMPLATE_NAME)
    return template.render(page_context(analysis, frame, c))
