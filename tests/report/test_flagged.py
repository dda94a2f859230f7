"""The report's statistics are on the films the model is for: flagged films are left out by default, counted per
flag on the page, in analysis.json and on the console; `--include-flagged` keeps them (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrage_ray.cli import main
from cxrage_ray.report.analysis import write_report
from cxrage_ray.report.cohort import STATS_EXCLUDED_FLAGS, excluded_rows, statistics_excluded_flags
from outputs import SCHEMA, Cohort, simulate

#: What every excluding flag is, in the issue's words; a flag that only warns must not exclude.
EXPECTED_EXCLUDING = {"non_chest", "lateral", "paediatric", "blank", "orientation_uncertain", "age_implausible"}
WARNING_ONLY = "non_chest_suspected"


@pytest.fixture(scope="module")
def flagged(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A scored folder of 200 rows where rows 0-29 carry each excluding flag in turn (row 0 two of them), some
    carry a warning-only flag, and the flagged rows' CXR-Age is off by +40 years (so leaving them in shows)."""
    root = tmp_path_factory.mktemp("flagged")
    frame = simulate(Cohort(n=200, seed=3, error_fraction=0.05))
    flags = sorted(EXPECTED_EXCLUDING)
    qc = [[] for _ in range(len(frame))]
    for i in range(30):
        qc[i] = [flags[i % len(flags)]]
    qc[0] = ["lateral", "orientation_uncertain"]
    for i in range(30, 40):
        qc[i] = [WARNING_ONLY]
    frame["qc"] = qc
    frame.loc[frame.index < 30, "cxr_age"] += 40.0
    frame.loc[frame["status"] == "error", "qc"] = None
    frame["cxr_age_gap"] = frame["cxr_age"] - frame["chronological_age"]
    (root / "parts").mkdir()
    pq.write_table(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), root / "parts" / "part-0.parquet")
    return root, frame


def _expected_counts(frame: pd.DataFrame) -> dict[str, int]:
    ok = frame[frame["status"] == "ok"]
    counts = {flag: int(ok["qc"].map(lambda f: flag in list(f)).sum()) for flag in STATS_EXCLUDED_FLAGS}
    return {flag: n for flag, n in counts.items() if n}


def test_the_exclusion_list_is_the_issues_and_a_warning_flag_does_not_exclude():
    assert set(STATS_EXCLUDED_FLAGS) == EXPECTED_EXCLUDING
    assert statistics_excluded_flags() == STATS_EXCLUDED_FLAGS and statistics_excluded_flags(True) == ()
    rows = pd.DataFrame({"qc": [[WARNING_ONLY], ["lateral"], [], None, ["paediatric", WARNING_ONLY]]})
    assert excluded_rows(rows).tolist() == [False, True, False, False, True]


def test_flagged_films_are_left_out_by_default_and_counted_per_flag(flagged):
    root, frame = flagged
    a = write_report(root)
    ok = frame[frame["status"] == "ok"]
    keep = ok[~ok["qc"].map(lambda f: bool(EXPECTED_EXCLUDING & set(f)))]
    assert a["cxr_age"]["n"] == len(keep) < len(ok)
    assert a["cxr_age"]["mean"] == pytest.approx(keep["cxr_age"].mean(), rel=1e-12)
    assert a["vs_chronological"]["mae"] == pytest.approx((keep["cxr_age"] - keep["chronological_age"]).abs().mean())
    assert a["excluded_from_statistics"] == _expected_counts(frame)
    assert set(a["excluded_from_statistics"]) == EXPECTED_EXCLUDING
    assert a["n_excluded_from_statistics"] == len(ok) - len(keep)  # row 0's two flags count once here
    assert sum(a["excluded_from_statistics"].values()) == a["n_excluded_from_statistics"] + 1
    assert a["include_flagged"] is False and set(a["statistics_exclude_flags"]) == EXPECTED_EXCLUDING
    assert json.loads((root / "_cxrage" / "analysis.json").read_text()) == a
    page = (root / "_cxrage" / "report.html").read_text()
    excluded_line = page.split('id="excluded-rows"', 1)[1].split("</p>", 1)[0]
    for flag, n in a["excluded_from_statistics"].items():
        assert f"{n} flagged <code>{flag}</code>" in excluded_line
    assert f"{a['n_excluded_from_statistics']} scored films" in excluded_line and "--include-flagged" in excluded_line
    assert WARNING_ONLY not in excluded_line


def test_include_flagged_keeps_them(flagged):
    root, frame = flagged
    a = write_report(root, include_flagged=True)
    ok = frame[frame["status"] == "ok"]
    assert a["cxr_age"]["n"] == len(ok)
    assert a["cxr_age"]["mean"] == pytest.approx(ok["cxr_age"].mean(), rel=1e-12)
    assert a["excluded_from_statistics"] == {} and a["n_excluded_from_statistics"] == 0
    assert a["include_flagged"] is True and a["statistics_exclude_flags"] == []
    assert a["flagged_in_statistics"] == _expected_counts(frame)
    page = (root / "_cxrage" / "report.html").read_text()
    assert 'id="excluded-rows"' not in page and 'id="flagged-included"' in page


def test_report_command_says_what_it_left_out_and_names_failed_films(flagged, capsys):
    root, frame = flagged
    assert main(["report", str(root)]) == 0
    err = capsys.readouterr().err
    a = json.loads((root / "_cxrage" / "analysis.json").read_text())
    left_out = next(line for line in err.splitlines() if "flagged film" in line)
    assert f"leave out {a['n_excluded_from_statistics']} flagged films" in left_out
    for flag, n in a["excluded_from_statistics"].items():
        assert f"{n} {flag}" in left_out
    assert "--include-flagged" in left_out
    errors = frame[frame["status"] == "error"]
    assert f"leave out {len(errors)} error rows" in err
    first = errors.iloc[0]
    name = Path(first["uri"]).name
    assert f"cxrage: failed: {name}: {first['error'].replace(first['uri'], name)}" in err
    assert "status == 'error'" in err
    assert "/archive/cxr/" not in err  # the films' folders are not printed

    assert main(["report", str(root), "--include-flagged"]) == 0
    again = capsys.readouterr().err
    assert "flagged film" not in again
    assert json.loads((root / "_cxrage" / "analysis.json").read_text())["include_flagged"] is True


def test_include_flagged_help_lists_every_excluding_flag():
    from cxrage_ray.cli import build_parser

    report = next(a for a in build_parser()._subparsers._group_actions[0].choices["report"]._actions
                  if "--include-flagged" in a.option_strings)
    assert all(flag in report.help for flag in STATS_EXCLUDED_FLAGS)


def test_a_frame_without_qc_column_excludes_nothing():
    rows = pd.DataFrame({"status": ["ok", "ok"], "cxr_age": [60.0, np.nan]})
    assert excluded_rows(rows).tolist() == [False, False]
