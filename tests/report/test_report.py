"""`cxrage report`: every number in analysis.json recomputed directly (pandas / numpy / scipy / lifelines) from
the same Parquet, and the page rendered in headless Chromium (screenshot, no console errors)."""

from __future__ import annotations

import importlib.resources
import json
import math
import re
import subprocess
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import jinja2
import pytest
from lifelines import CoxPHFitter
from markupsafe import escape
from scipy import stats

from conftest import require_tool
from cxrage_ray.errors import InputError
from cxrage_ray.report.analysis import write_report
from cxrage_ray.report.page import TEMPLATE_FOLDER, TEMPLATE_NAME, template_environment
from outputs import EVENT_COL, SCHEMA, TIME_COL, Cohort, simulate, write_scored_output

TRUE_HR = 1.6
REPO = Path(__file__).resolve().parents[2]
CSP_META = ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">')


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, dict]:
    """One realistic scored folder (600 rows, 3 parts, decoys) and its report with the outcome analysis."""
    root = tmp_path_factory.mktemp("scored")
    write_scored_output(root, Cohort(hr_per_5y=TRUE_HR))
    analysis = write_report(root, time_col=TIME_COL, event_col=EVENT_COL)
    return root, analysis


def direct_rows(root: Path) -> pd.DataFrame:
    """The committed rows as a plain reader sees them: OUTPUT/parts/*.parquet (the decoys live elsewhere)."""
    return pd.concat([pd.read_parquet(p) for p in sorted((root / "parts").glob("*.parquet"))], ignore_index=True)


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[(rows["status"] == "ok") & rows["cxr_age"].notna()]


def hr5(fitter: CoxPHFitter) -> tuple[float, float, float, float]:
    s = fitter.summary.loc["cxr_age"]
    return (math.exp(5 * s["coef"]), math.exp(5 * s["coef lower 95%"]), math.exp(5 * s["coef upper 95%"]),
            float(s["p"]))


def test_counts_errors_and_qc_match_the_parquet(scored):
    root, a = scored
    rows = direct_rows(root)
    assert a["n_rows"] == len(rows) == 600  # decoys under _tmp/ and .staging/ were not read
    assert a["n_ok"] == int((rows["status"] == "ok").sum())
    assert a["n_error"] == int((rows["status"] == "error").sum()) > 0
    kinds = rows.loc[rows["status"] == "error", "error"].str.split(":").str[0].value_counts()
    assert a["errors_by_kind"] == {k: int(v) for k, v in kinds.items()}
    assert set(a["errors_by_kind"]) == {"DecodeError", "ReadError", "EmptyFileError", "UnsupportedModalityError"}
    flags = rows["qc"].dropna().map(lambda f: sorted(set(f))).explode().dropna().value_counts()
    assert a["qc_counts"] == {k: int(v) for k, v in flags.items()} and a["qc_counts"]
    on_disk = json.loads((root / "_cxrage" / "analysis.json").read_text())
    assert on_disk == a


def test_age_statistics_match_numpy_and_scipy(scored):
    root, a = scored
    ok = ok_rows(direct_rows(root))
    cxr, age = ok["cxr_age"].to_numpy(), ok["chronological_age"].to_numpy()
    assert a["cxr_age"]["n"] == len(ok)
    assert a["cxr_age"]["mean"] == pytest.approx(cxr.mean(), rel=1e-12)
    assert a["cxr_age"]["sd"] == pytest.approx(cxr.std(ddof=1), rel=1e-12)
    assert a["cxr_age"]["median"] == pytest.approx(np.median(cxr), rel=1e-12)
    assert (a["cxr_age"]["min"], a["cxr_age"]["max"]) == (cxr.min(), cxr.max())
    vs = a["vs_chronological"]
    assert vs["n"] == len(ok)
    assert vs["mae"] == pytest.approx(np.mean(np.abs(cxr - age)), rel=1e-12)
    assert vs["pearson_r"] == pytest.approx(stats.pearsonr(cxr, age).statistic, rel=1e-10)
    assert vs["mean_gap"] == pytest.approx(np.mean(cxr - age), rel=1e-12)
    assert vs["mean_gap"] == pytest.approx(ok["cxr_age_gap"].mean(), rel=1e-12)  # the pipeline's own gap column


def test_gap_by_sex_and_view_match_groupby(scored):
    root, a = scored
    ok = ok_rows(direct_rows(root)).assign(gap=lambda d: d["cxr_age"] - d["chronological_age"])
    for key, column in (("gap_by_sex", "patient_sex"), ("gap_by_view", "view_position")):
        groups = ok.groupby(column)["gap"]
        expected = groups.agg(["count", "mean", "std", "median"])
        assert set(a[key]) == set(expected.index) and len(expected) >= 2
        for label, row in expected.iterrows():
            got = a[key][label]
            assert got["n"] == row["count"]
            assert got["mean_gap"] == pytest.approx(row["mean"], rel=1e-12)
            assert got["sd_gap"] == pytest.approx(row["std"], rel=1e-12)
            assert got["median_gap"] == pytest.approx(row["median"], rel=1e-12)
    # the simulated effect (+2 years for men) shows up
    assert a["gap_by_sex"]["M"]["mean_gap"] > a["gap_by_sex"]["F"]["mean_gap"]


def test_cox_models_match_lifelines_directly(scored):
    root, a = scored
    ok = ok_rows(direct_rows(root)).dropna(subset=[TIME_COL, EVENT_COL])

    alone = CoxPHFitter().fit(ok[["cxr_age", TIME_COL, EVENT_COL]], TIME_COL, EVENT_COL)
    adjusted_data = ok.assign(sex=(ok["patient_sex"] == "M").astype(float))[
        ["cxr_age", "chronological_age", "sex", TIME_COL, EVENT_COL]]
    adjusted = CoxPHFitter().fit(adjusted_data, TIME_COL, EVENT_COL)

    for got, fitter in ((a["cox"]["unadjusted"], alone), (a["cox"]["adjusted"], adjusted)):
        hr, lo, hi, p = hr5(fitter)
        assert got["hr_per_5y"] == pytest.approx(hr, rel=1e-6)
        assert got["ci_low"] == pytest.approx(lo, rel=1e-6)
        assert got["ci_high"] == pytest.approx(hi, rel=1e-6)
        assert got["p"] == pytest.approx(p, rel=1e-4)
        assert got["n"] == len(ok) and got["events"] == int(ok[EVENT_COL].sum()) > 50
        # the CI is exp(5·(coef ± 1.96·se)), as the paper reports it
        coef, se = fitter.summary.loc["cxr_age", ["coef", "se(coef)"]]
        assert got["ci_low"] == pytest.approx(math.exp(5 * (coef - 1.96 * se)), rel=1e-4)
        assert got["ci_high"] == pytest.approx(math.exp(5 * (coef + 1.96 * se)), rel=1e-4)
        # CXR-Age truly carries hazard here: HR > 1, significant, and its CI covers the simulated HR
        assert got["hr_per_5y"] > 1 and got["p"] < 1e-3
        assert got["ci_low"] < TRUE_HR < got["ci_high"]
    assert a["cox"]["unadjusted"]["covariates"] == ["cxr_age"]
    assert a["cox"]["adjusted"]["covariates"] == ["cxr_age", "chronological_age", "sex"]
    assert a["cox"]["adjusted"]["sex_coding"] == {"F": 0, "M": 1}


def test_manifest_age_and_sex_columns_are_used_when_the_pipeline_has_none(tmp_path):
    write_scored_output(tmp_path, Cohort(n=300, seed=3, age_in="age", sex_in="sex", parts=2), summary=False)
    a = write_report(tmp_path, time_col=TIME_COL, event_col=EVENT_COL)
    ok = ok_rows(direct_rows(tmp_path))
    assert ok["chronological_age"].isna().all()  # only the manifest's `age` has ages
    gap = ok["cxr_age"] - ok["age"]
    assert a["vs_chronological"]["n"] == len(ok)
    assert a["vs_chronological"]["mae"] == pytest.approx(gap.abs().mean(), rel=1e-12)
    assert a["gap_by_sex"]["F"]["mean_gap"] == pytest.approx(gap[ok["sex"] == "F"].mean(), rel=1e-12)
    assert a["cox"]["adjusted"]["covariates"] == ["cxr_age", "chronological_age", "sex"]
    assert a["throughput"] is None and a["provenance"]["versions"] is None  # no summary.json
    assert "No summary.json" in (tmp_path / "_cxrage" / "report.html").read_text()


def test_incomplete_follow_up_other_sex_and_boolean_events(tmp_path):
    """Rows without follow-up leave both models; rows of sex 'O' leave the adjusted model only (noted)."""
    rows = simulate(Cohort(n=400, seed=11))
    ok_index = rows.index[rows["status"] == "ok"]
    rows.loc[ok_index[:7], TIME_COL] = np.nan
    rows.loc[ok_index[10:22], "patient_sex"] = "O"
    rows[EVENT_COL] = rows[EVENT_COL].astype(bool)
    schema = SCHEMA.set(SCHEMA.get_field_index(EVENT_COL), pa.field(EVENT_COL, pa.bool_()))
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False), tmp_path / "parts" / "a.parquet")
    a = write_report(tmp_path, time_col=TIME_COL, event_col=EVENT_COL)

    ok = ok_rows(direct_rows(tmp_path)).dropna(subset=[TIME_COL]).assign(died=lambda d: d[EVENT_COL].astype(int))
    alone = CoxPHFitter().fit(ok[["cxr_age", TIME_COL, EVENT_COL]], TIME_COL, EVENT_COL)
    mf = ok[ok["patient_sex"].isin(["M", "F"])].assign(sex=lambda d: (d["patient_sex"] == "M").astype(float))
    adjusted = CoxPHFitter().fit(mf[["cxr_age", "chronological_age", "sex", TIME_COL, EVENT_COL]],
                                 TIME_COL, EVENT_COL)
    un, adj = a["cox"]["unadjusted"], a["cox"]["adjusted"]
    assert (un["n"], un["events"]) == (len(ok), int(ok[EVENT_COL].sum()))
    assert (adj["n"], adj["events"]) == (len(mf), int(mf[EVENT_COL].sum())) and len(mf) == len(ok) - 12
    assert un["hr_per_5y"] == pytest.approx(hr5(alone)[0], rel=1e-6)
    assert adj["hr_per_5y"] == pytest.approx(hr5(adjusted)[0], rel=1e-6)
    assert adj["note"] == "12 row(s) with sex other than M/F left out"
    assert a["gap_by_sex"]["O"]["n"] == 12


def test_cohort_without_ages_gives_nulls_and_strict_json(tmp_path):
    rows = simulate(Cohort(n=40, seed=5)).assign(chronological_age=np.nan, age=np.nan, cxr_age_gap=np.nan)
    rows.loc[rows.index[1:], "status"] = "error"  # a single ok row: its SD is undefined
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False),
                   tmp_path / "nested" / "deeper" / "scores.parquet")
    a = write_report(tmp_path, time_col=None, event_col=None)
    assert a["n_ok"] == 1 and a["cxr_age"]["n"] == 1 and a["cxr_age"]["sd"] is None
    assert a["vs_chronological"] is None and a["gap_by_sex"] is None and a["cox"] is None

    def refuse(name):
        raise AssertionError(f"{name} in analysis.json")

    assert json.loads((tmp_path / "_cxrage" / "analysis.json").read_text(), parse_constant=refuse) == a


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="no Parquet"):
        write_report(tmp_path, time_col=None, event_col=None)
    write_scored_output(tmp_path, Cohort(n=50, parts=1))
    with pytest.raises(InputError, match="'survival_days'.*available"):
        write_report(tmp_path, time_col="survival_days", event_col=EVENT_COL)
    with pytest.raises(InputError, match="both --time-col and --event-col"):
        write_report(tmp_path, time_col=TIME_COL, event_col=None)
    with pytest.raises(InputError, match="0/1"):
        write_report(tmp_path, time_col=TIME_COL, event_col="view_position")
    assert not (tmp_path / "_cxrage" / "analysis.json").exists()


def test_html_is_self_contained_and_escaped(tmp_path):
    rows = simulate(Cohort(n=80, seed=7))
    rows.loc[rows["status"] == "error", "error"] = "DecodeError: <script>alert('x')</script> in name"
    rows.loc[rows.index[:5], "view_position"] = "<b>PA</b>"
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False), tmp_path / "parts" / "p.parquet")
    a = write_report(tmp_path, time_col=TIME_COL, event_col=EVENT_COL)
    page = (tmp_path / "_cxrage" / "report.html").read_text()
    cox = a["cox"]["unadjusted"]
    assert re.search(rf"<td>{cox['hr_per_5y']:.2f}</td><td>{cox['ci_low']:.2f}</td><td>{cox['ci_high']:.2f}</td>",
                     page)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(https?:)?//""", page, re.I)
    images = re.findall(r'<img src="([^"]*)"', page)
    assert len(images) == 4 and all(i.startswith("data:image/png;base64,") for i in images)
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    assert "<b>PA</b>" not in page and "&lt;b&gt;PA&lt;/b&gt;" in page
    assert CSP_META in page  # exactly as it always was: nothing but inline style/script and data: images


class TagCollector(HTMLParser):
    """Every start tag of a page with its attribute names, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, [name for name, _ in attrs]))


def start_tags(page: str) -> list[tuple[str, list[str]]]:
    collector = TagCollector()
    collector.feed(page)
    return collector.tags


def test_hostile_values_are_escaped_by_the_template(tmp_path):
    """Error texts, a manifest column name, group names and summary.json values that look like markup are
    shown as text: no tag or attribute of theirs reaches the page."""
    injected = '<script>alert(1)</script>"><img src=x onerror="alert(2)">'
    time_col = f'follow"up{injected}'
    rows = simulate(Cohort(n=120, seed=13)).rename(columns={TIME_COL: time_col})
    rows.loc[rows["status"] == "error", "error"] = f'DecodeError: "{injected}" in a file name'
    rows.loc[rows.index[:30], "view_position"] = injected
    schema = SCHEMA.set(SCHEMA.get_field_index(TIME_COL), pa.field(time_col, pa.float64()))
    (tmp_path / "parts").mkdir()
    pq.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False), tmp_path / "parts" / "p.parquet")
    (tmp_path / "summary.json").write_text(json.dumps({"rows_total": len(rows), "weights_sha256": injected,
                                                       "settings": {injected: injected}}))
    a = write_report(tmp_path, time_col=time_col, event_col=EVENT_COL)
    page = (tmp_path / "_cxrage" / "report.html").read_text()

    assert a["gap_by_view"][injected]["n"] > 0 and a["cox"]["unadjusted"]["hr_per_5y"]  # the values are shown
    for shown in (injected, time_col, f'DecodeError: "{injected}" in a file name', f"settings: {injected}"):
        assert str(escape(shown)) in page, shown  # as text, every quote and bracket escaped
    assert injected not in page and "<script>alert" not in page and 'onerror="' not in page
    tags = start_tags(page)
    assert [tag for tag, _ in tags if tag == "script"] == ["script"]  # the render-status script only
    assert all(not src.startswith("x") for src in re.findall(r'<img src="([^"]*)"', page))
    assert {name for _, names in tags for name in names} <= {
        "lang", "charset", "http-equiv", "content", "class", "role", "id", "src", "alt", "data-status", "hidden"}
    assert CSP_META in page


def test_the_page_template_ships_as_package_data():
    """The template is a resource of the installed package (declared in pyproject.toml), and it is the file the
    page is rendered from."""
    template = importlib.resources.files("cxrage_ray.report") / TEMPLATE_FOLDER / TEMPLATE_NAME
    assert template.is_file()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(f"{TEMPLATE_FOLDER}/{TEMPLATE_NAME}", glob) for glob in declared["cxrage_ray.report"])
    environment = template_environment()
    source, _, _ = environment.loader.get_source(environment, TEMPLATE_NAME)
    assert source == template.read_text(encoding="utf-8")
    assert CSP_META in source


def test_the_template_refuses_a_missing_value():
    """StrictUndefined: a value the page needs but was not given fails the render instead of showing blank."""
    with pytest.raises(jinja2.UndefinedError):
        template_environment().get_template(TEMPLATE_NAME).render({})


# ---------------------------------------------------------------------------------------------- Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]


def chromium(page: Path, work: Path, *mode: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on `page` with a fresh profile; its console messages go to stderr as CONSOLE."""
    exe = require_tool("chromium")
    profile = work / f"profile-{len(list(work.glob('profile-*')))}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def render(page: Path, work: Path) -> tuple[Path, list[str], str]:
    """Screenshot + DOM after load: (png, console lines of both runs, the report's render status)."""
    png = work / "shot.png"
    shot = chromium(page, work, f"--screenshot={png}", "--window-size=1200,3000")
    dom = chromium(page, work, "--dump-dom")
    status = re.search(r'id="render-status" data-status="([^"]*)"', dom.stdout)
    return png, console_lines(shot.stderr) + console_lines(dom.stderr), status.group(1) if status else "missing"


def test_report_renders_in_headless_chromium_without_console_errors(scored, tmp_path):
    root, _ = scored
    png, console, status = render(root / "_cxrage" / "report.html", tmp_path)
    assert console == []
    assert status == "ok"  # the inline script ran after load and every plot decoded
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.01  # plots and text, not just a few lines


def test_chromium_check_catches_external_loads_and_script_errors(scored, tmp_path):
    """Negative control: the same check flags a page that reaches outside itself or throws."""
    root, _ = scored
    page = tmp_path / "broken.html"
    html = (root / "_cxrage" / "report.html").read_text()
    page.write_text(html.replace("</body>", '<img src="https://example.invalid/x.png">'
                                            "<script>notDefined();</script></body>"))
    _, console, status = render(page, tmp_path)
    text = "\n".join(console)
    assert "Content Security Policy" in text or "Refused" in text
    assert "notDefined" in text
    assert status != "ok"


def test_report_reads_and_writes_object_storage(scored, s3_env):
    """`cxrage report s3://...`: the same analysis as from the local copy, written back next to the parts."""
    import os

    from cxrage_ray.cli import EXIT_OK, main

    root, local = scored
    bucket = s3_env.make_bucket("report-s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("report.html", "analysis.json")):
        s3_env.put(f"s3://{bucket}/job/{path.relative_to(root).as_posix()}", path.read_bytes())
    assert main(["report", f"s3://{bucket}/job", "--time-col", TIME_COL, "--event-col", EVENT_COL],
                env=dict(os.environ)) == EXIT_OK
    remote = json.loads(s3_env.get(f"s3://{bucket}/job/_cxrage/analysis.json"))
    assert remote["n_rows"] == 600  # the decoys under _tmp/ and .staging/ were skipped there too
    assert remote == json.loads(json.dumps(local))  # every number identical
    page = s3_env.get(f"s3://{bucket}/job/_cxrage/report.html").decode()
    assert "<html" in page.lower() and "Content-Security-Policy" in page


def test_demo_weights_banner_is_seen_in_headless_chromium(scored, tmp_path):
    """Rows scored with `--weights demo` make the rendered page open with a red banner that says so."""
    import pyarrow as pa

    root, _ = scored
    demo = tmp_path / "demo"
    (demo / "parts").mkdir(parents=True)
    for part in sorted((root / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        pq.write_table(table.append_column("weights_name", pa.array(["demo"] * len(table))), demo / "parts" / part.name)
    analysis = write_report(demo)
    assert analysis["demo_weights"] is True and analysis["provenance"]["weights_name"] == ["demo"]
    page = demo / "_cxrage" / "report.html"
    png, console, status = render(page, tmp_path)
    assert console == [] and status == "ok"
    dom = chromium(page, tmp_path, "--dump-dom").stdout
    assert 'id="demo-weights-banner"' in dom and "DEMO WEIGHTS" in dom
    assert dom.index("demo-weights-banner") < dom.index("<h1>")
    from PIL import Image

    top = np.asarray(Image.open(png).convert("RGB"), dtype=float)[:150]
    red = (top[..., 0] > 150) & (top[..., 1] < 60) & (top[..., 2] < 80)
    assert red.mean() > 0.1  # the banner is on screen, at the top


def test_report_without_demo_rows_has_no_banner(scored):
    root, analysis = scored
    assert analysis["demo_weights"] is False
    assert "demo-weights-banner" not in (root / "_cxrage" / "report.html").read_text()
