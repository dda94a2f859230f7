"""Chaos, issue 11: whatever a manifest row holds, a real `cxrage score` run gives it one row with an error
kind that means something, and retries that hid storage faults are counted in summary.json.

- A manifest with an empty uri, a duplicated image_id, a `gopher://` uri, a missing file and a folder
  symlink; a folder input holding a folder symlink (not an input) and a file symlink (an input).
- A fault-injecting proxy (`fault_proxy.FaultProxy`) in front of the loopback S3 server: 503 SlowDown,
  connection resets mid-body and slow bodies, each injected a planned number of times.

Everything is loopback and generated here; each run is a few dozen tiny films with `--tta none`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from chaos.fault_proxy import FaultProxy
from cxrage_ray.cli import EXIT_ROW_ERRORS, main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

#: Flags every run here shares: the quickest scoring that still goes through every stage.
QUICK = ["--no-progress", "--tta", "none", "--rotation", "off"]


def _film_png(seed: int, shape: tuple[int, int] = (96, 80)) -> bytes:
    """A tiny smooth radiograph-like 8-bit PNG (distinct per seed)."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    film = 120 + 70 * np.sin(x / (9 + seed % 7)) * np.cos(y / 11) + np.random.default_rng(seed).normal(0, 5, shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(film, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "chaos.pth"
    save_fastai_checkpoint(path, random_state_dict(seed=7), legacy=True, with_opt=True)
    return path


def _rows(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "parts").to_pandas().sort_values("row_id").reset_index(drop=True)


def _summary(out: Path) -> dict:
    return json.loads((out / "_cxrage" / "summary.json").read_text())


def _assert_no_local_path_beyond_uri(rows: pd.DataFrame, local_root: Path) -> None:
    """An error message may repeat its row's own uri, and say nothing else of the local disk."""
    for uri, error in zip(rows["uri"], rows["error"]):
        if error is None:
            continue
        rest = error.replace(uri, "<uri>") if isinstance(uri, str) and uri else error
        assert str(local_root) not in rest, error


def test_every_manifest_row_yields_a_row_with_a_kind(ray_local, weights, tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    for i in range(6):
        (films / f"f{i}.png").write_bytes(_film_png(i))
    (tmp_path / "elsewhere").mkdir()
    (films / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    manifest = pd.DataFrame({
        "image_id": ["f0", "f1", "f2", "empty-uri", "f0", "gopher", "missing", "folder-link", "f3", "f4", "f5"],
        "uri": ["films/f0.png", "films/f1.png", "films/f2.png", "", "films/f3.png", "gopher://archive.example/x.png",
                "films/gone.png", "films/linked-folder", "films/f3.png", "films/f4.png", "films/f5.png"],
        "site": [f"s{i}" for i in range(11)],
    })
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"

    code = main(["score", str(tmp_path / "m.csv"), str(out), "--weights", str(weights), *QUICK])

    assert code == EXIT_ROW_ERRORS  # finished, with error rows: never a refused job
    rows = _rows(out)
    assert rows["row_id"].tolist() == list(range(len(manifest)))  # exactly one row per manifest row
    assert rows["site"].tolist() == manifest["site"].tolist()
    errors = dict(zip(rows["row_id"], rows["error"]))
    assert errors[3] == "ManifestError: row 3: empty uri"
    assert errors[4] == "ManifestError: row 4: duplicate image_id 'f0' (also row 0)"
    assert errors[5] == "ReadError: cannot read gopher://archive.example/x.png: unsupported scheme 'gopher'"
    assert errors[6] == f"ReadError: not found: {films / 'gone.png'}"
    assert errors[7] == f"ReadError: is a folder, not a file: {films / 'linked-folder'}"
    ok = rows.loc[rows["status"] == "ok", "row_id"].tolist()
    assert ok == [0, 1, 2, 8, 9, 10] and rows.loc[rows["status"] == "ok", "cxr_age"].notna().all()
    assert "manifest_problem" not in rows.columns and "read_retries" not in rows.columns  # not output columns
    _assert_no_local_path_beyond_uri(rows, tmp_path)
    summary = _summary(out)
    assert summary["errors_by_kind"] == {"ManifestError": 2, "ReadError": 3}
    assert summary["complete"] and summary["rows_written"] == len(manifest)
    assert summary["retries"] == {}  # the local disk never needed one

    # a rerun resumes: every row, error rows included, is already there
    assert main(["score", str(tmp_path / "m.csv"), str(out), "--weights", str(weights), *QUICK]) == EXIT_ROW_ERRORS
    assert _summary(out)["rows_scored_this_run"] == 0 and len(_rows(out)) == len(manifest)


def test_folder_symlinks_are_not_inputs(ray_local, weights, tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "a" / "one.png").write_bytes(_film_png(1))
    (tmp_path / "elsewhere" / "two.png").write_bytes(_film_png(2))
    (root / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "linked.png").symlink_to(tmp_path / "elsewhere" / "two.png")
    out = tmp_path / "out"

    assert main(["score", str(root), str(out), "--weights", str(weights), *QUICK]) == 0  # every row ok

    rows = _rows(out)
    assert rows["image_id"].tolist() == ["a/one.png", "linked.png"]
    assert (rows["status"] == "ok").all()


# ---------------------------------------------------------------- storage faults behind a proxy

#: Films in the bucket, and the faults their GETs meet (in order). Every injected fault is absorbed by a
#: retry except on `EXHAUSTED`, which meets more SlowDowns than the 5 retries a job allows.
FILMS = 24
EXHAUSTED = "f18"
PLAN: dict[str, list[str]] = {
    **{f"f{i:02d}": ["slowdown"] for i in range(0, 6)},
    **{f"f{i:02d}": ["slowdown", "slowdown"] for i in range(6, 9)},
    **{f"f{i:02d}": ["reset"] for i in range(9, 14)},
    **{f"f{i:02d}": ["slow"] for i in range(14, 18)},
    EXHAUSTED: ["slowdown"] * 8,
}


@pytest.mark.slow
def test_s3_faults_are_retried_and_counted(ray_local, s3_env, weights, tmp_path):
    bucket = s3_env.make_bucket("chaos-faults")
    names = [f"f{i:02d}" for i in range(FILMS)]
    for i, name in enumerate(names):
        s3_env.put(f"s3://{bucket}/films/{name}.png", _film_png(i))
    pd.DataFrame({"image_id": names, "uri": [f"s3://{bucket}/films/{n}.png" for n in names]}).to_csv(
        tmp_path / "m.csv", index=False)
    plan = {f"/{bucket}/films/{name}.png": faults for name, faults in PLAN.items()}
    out = tmp_path / "out"

    with FaultProxy(s3_env.endpoint, plan, slow_s=1.0) as proxy:
        # credentials as options: the shared Ray's workers may predate this test's AWS_* environment
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
        code = main(["score", str(tmp_path / "m.csv"), str(out), "--weights", str(weights), *QUICK,
                     "--storage-option", "key=testing", "--storage-option", "secret=testing",
                     "--storage-option", "client_kwargs.region_name=us-east-1"], env=env)
        injected = dict(proxy.injected)

    assert code == EXIT_ROW_ERRORS
    rows = _rows(out).set_index("image_id")
    assert sorted(rows.index) == names and rows["row_id"].is_unique  # exactly one row per manifest row
    assert (rows.drop(index=EXHAUSTED)["status"] == "ok").all(), rows.loc[rows["status"] != "ok", "error"]
    assert rows.loc[EXHAUSTED, "error"] == (
        f"ReadError: could not read s3://{bucket}/films/{EXHAUSTED}.png after 6 attempts (throttled or "
        f"unreachable): throttled by s3 endpoint {proxy.endpoint.removeprefix('http://')} (SlowDown)")
    # the plan was served as written: 6 + 3*2 + 6 SlowDowns (the exhausted film stops asking after 6)
    assert injected == {"slowdown": 18, "reset": 5, "slow": 4}
    summary = _summary(out)
    # every fault but the exhausted film's last one was hidden by a retry, and each such retry is counted
    assert summary["retries"] == {"SlowDown": 17, "ConnectionReset": 5}
    assert summary["errors_by_kind"] == {"ReadError": 1}
    assert "testing" not in json.dumps(summary)
