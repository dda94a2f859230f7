"""A new user's first run, end to end on a real local Ray and the real DICOM sample: non-chest films and
implausible ages flagged, demo weights marked in every output, an OUTPUT that pandas, pyarrow.dataset and
DuckDB read directly, files under the umask, the report leaving non-chest rows out, and resume of an output
written in the older layout (job.json/summary.json at the top)."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pyarrow.dataset as ds
import pytest

from cxrage_ray.cli import EXIT_OK, main

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

CHEST = ["cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm", "cxr/gdcm-CR-MONO1-10-chest.dcm"]
NON_CHEST = [
    "other/WG04_RG3_RLE.dcm",  # EXTREMITY
    "other/WG04_RG3_JPLL.dcm",  # EXTREMITY
    "other/pylibjpeg-data_RG2_JPLY_fixed.dcm",  # HIP
    "other/pylibjpeg-data_NM_Kakadu44_SOTmarkerincons.dcm",  # HAND; birth and study dates give 111 years
    "other/fo-dicom_CR-ModalitySequenceLUT.dcm",  # TEETH; 119 years
]
IMPLAUSIBLE = NON_CHEST[3:]


@pytest.fixture(scope="module")
def first_run(ray_local, dicom_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    archive = root / "archive"
    for name in CHEST + NON_CHEST:
        (archive / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dicom_sample / name, archive / name)
    out = root / "out"
    old = os.umask(0o022)
    try:
        code = main(["score", str(archive), str(out), "--weights", "demo", "--no-progress", "--tta", "none",
                     "--csv", str(root / "original.csv")], env={**os.environ, "CXRAGE_HOME": str(root / "home")})
        assert main(["report", str(out)]) == EXIT_OK
    finally:
        os.umask(old)
    assert code == EXIT_OK
    return root, archive, out


def test_non_chest_and_implausible_ages_are_flagged(first_run):
    _, _, out = first_run
    df = pd.read_parquet(out).set_index("image_id")  # pandas reads OUTPUT itself
    assert sorted(df.index) == sorted(CHEST + NON_CHEST)
    assert (df["status"] == "ok").all()  # flagged rows keep their score
    for name in NON_CHEST:
        assert "non_chest" in list(df.loc[name, "qc"]), name
    for name in CHEST:
        assert "non_chest" not in list(df.loc[name, "qc"]), name
    for name in IMPLAUSIBLE:
        assert "age_implausible" in list(df.loc[name, "qc"]) and pd.isna(df.loc[name, "chronological_age"])
    assert df.loc[CHEST[0], "chronological_age"] == 68.0


def test_demo_weights_are_marked_everywhere(first_run):
    root, _, out = first_run
    df = pd.read_parquet(out)
    assert (df["weights_name"] == "demo").all()
    summary = json.loads((out / "_cxrage" / "summary.json").read_text())
    job = json.loads((out / "_cxrage" / "job.json").read_text())
    analysis = json.loads((out / "_cxrage" / "analysis.json").read_text())
    assert summary["weights_name"] == job["weights_name"] == "demo"
    assert analysis["demo_weights"] is True
    assert set(pd.read_csv(root / "original.csv")["Weights"]) == {"demo"}
    assert 'id="demo-weights-banner"' in (out / "_cxrage" / "report.html").read_text()


def test_report_leaves_non_chest_rows_out_and_says_how_many(first_run):
    _, _, out = first_run
    analysis = json.loads((out / "_cxrage" / "analysis.json").read_text())
    excluded = analysis["excluded_from_statistics"]  # a film with two excluding flags counts under both
    assert excluded["non_chest"] == len(NON_CHEST) and excluded["age_implausible"] == len(IMPLAUSIBLE)
    assert analysis["n_excluded_from_statistics"] == len(NON_CHEST)  # ...and is left out once; the chest films stay
    assert analysis["cxr_age"]["n"] == len(CHEST)
    assert analysis["n_ok"] == len(CHEST) + len(NON_CHEST)
    assert f"{len(NON_CHEST)} flagged <code>non_chest</code>" in (out / "_cxrage" / "report.html").read_text()


def test_output_is_read_directly_by_pyarrow_and_duckdb(first_run):
    duckdb = pytest.importorskip("duckdb")
    _, _, out = first_run
    assert ds.dataset(out, format="parquet").count_rows() == len(CHEST) + len(NON_CHEST)
    count, demo = duckdb.sql(
        f"SELECT count(*), bool_and(weights_name = 'demo') FROM read_parquet('{out}/**/*.parquet')").fetchall()[0]
    assert (count, demo) == (len(CHEST) + len(NON_CHEST), True)


def test_files_and_folders_follow_the_umask(first_run):
    _, _, out = first_run
    for path in out.rglob("*"):
        expected = 0o755 if path.is_dir() else 0o644
        assert oct(path.stat().st_mode & 0o777) == oct(expected), path


def test_skip_flagged_skips_non_chest_films(first_run, tmp_path):
    root, archive, _ = first_run
    out = tmp_path / "skip"
    main(["score", str(archive / "other"), str(out), "--weights", "demo", "--no-progress", "--tta", "none",
          "--skip-flagged"], env={**os.environ, "CXRAGE_HOME": str(root / "home")})
    df = pd.read_parquet(out)
    assert len(df) == len(NON_CHEST)
    assert df["error"].str.startswith("FlaggedSkipped").all() and df["cxr_age"].isna().all()


def test_an_output_in_the_older_layout_resumes(first_run, tmp_path):
    """job.json/summary.json at OUTPUT's top, without weights_name: the rerun scores nothing and tidies up."""
    root, archive, out = first_run
    old = tmp_path / "old"
    shutil.copytree(out / "parts", old / "parts")
    job = json.loads((out / "_cxrage" / "job.json").read_text())
    del job["weights_name"]
    (old / "job.json").write_text(json.dumps(job))
    (old / "summary.json").write_text((out / "_cxrage" / "summary.json").read_text())
    code = main(["score", str(archive), str(old), "--weights", "demo", "--no-progress", "--tta", "none"],
                env={**os.environ, "CXRAGE_HOME": str(root / "home")})
    assert code == EXIT_OK
    summary = json.loads((old / "_cxrage" / "summary.json").read_text())
    assert summary["rows_scored_this_run"] == 0 and summary["complete"]
    assert sorted(p.name for p in old.iterdir()) == ["_cxrage", "parts"]
    assert len(pd.read_parquet(old)) == len(CHEST) + len(NON_CHEST)


def test_quick_start_manifest_with_uri_column_and_relative_paths(ray_local, cxr_sample, tmp_path):
    """README's first command on a slice of the real metadata.csv: `--uri-column file`, paths relative to the
    manifest's folder, the `age` column as chronological age, and text columns that are empty for a whole Ray
    block (the `nih_*` columns of the IEEE rows: they once crashed the writer), then `cxrage report`."""
    meta = pd.read_csv(cxr_sample / "metadata.csv")
    ieee = meta[meta["file"].str.startswith("images/ieee")].head(17)
    nih = meta[meta["file"].str.startswith("images/nih")].head(7)
    manifest = pd.concat([ieee, nih])  # the first 16-row block has no nih_* value at all
    manifest["file"] = [os.path.relpath(cxr_sample / f, tmp_path) for f in manifest["file"]]
    manifest.to_csv(tmp_path / "metadata.csv", index=False)
    out = tmp_path / "out"
    env = {**os.environ, "CXRAGE_HOME": str(tmp_path / "home")}
    assert main(["score", str(tmp_path / "metadata.csv"), str(out), "--uri-column", "file", "--weights", "demo",
                 "--no-progress", "--tta", "none"], env=env) == EXIT_OK
    df = pd.read_parquet(out)
    assert len(df) == len(manifest) and (df["status"] == "ok").all()
    assert df["nih_Image Index"].notna().sum() == len(nih)
    assert df["chronological_age"].notna().sum() >= len(manifest) - 2  # ages come from the manifest's `age`
    assert main(["report", str(out)]) == EXIT_OK
    analysis = json.loads((out / "_cxrage" / "analysis.json").read_text())
    assert analysis["vs_chronological"]["mae"] is not None  # the report shows CXR-Age vs age
