"""`cxrage score` against a real S3-compatible server on loopback (moto): manifest, images, missing keys and
corrupt objects in a bucket, output Parquet and summary written back to the bucket, rerun resumes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(30, 230, (280, 300), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_score_manifest_on_s3_to_s3(s3_env, tmp_path):
    s3_env.make_bucket("archive")
    s3_env.make_bucket("results")
    s3_env.put("s3://archive/films/a.png", _png(1))
    s3_env.put("s3://archive/films/sub/b.png", _png(2))
    s3_env.put("s3://archive/films/corrupt.png", b"\x89PNG\r\n\x1a\nnot really")
    manifest = pd.DataFrame({"uri": ["films/a.png", "films/sub/b.png", "films/missing.png", "films/corrupt.png"],
                             "site": ["x", "y", "z", "w"]})
    s3_env.put("s3://archive/manifest.csv", manifest.to_csv(index=False).encode())
    weights = tmp_path / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=4), legacy=True, with_opt=True)

    # a fresh process, as in production: the AWS_* environment is set before Ray starts its workers
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", "s3://archive/manifest.csv", "s3://results/run1",
           "--weights", str(weights), "--no-progress", "--tta", "none", "--rotation", "off",
           "--csv", "s3://results/run1/original.csv"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 3, first.stderr[-3000:]  # two error rows, job finished
    assert "testing" not in first.stderr  # no credentials in logs

    parts = [p for p in s3_env.fs.find("results/run1/parts") if p.endswith(".parquet")]
    assert parts
    df = pd.concat([pq.read_table(io.BytesIO(s3_env.get(f"s3://{p}"))).to_pandas() for p in parts])
    df = df.set_index("image_id")
    assert sorted(df.index) == sorted(manifest["uri"])
    assert df.loc["films/missing.png", "error"].startswith("ReadError: not found")
    assert df.loc["films/corrupt.png", "error"].startswith("DecodeError")
    assert df.loc["films/sub/b.png", "status"] == "ok" and np.isfinite(df.loc["films/sub/b.png", "cxr_age"])
    assert df.loc["films/sub/b.png", "site"] == "y"
    summary = json.loads(s3_env.get("s3://results/run1/_cxrage/summary.json"))
    assert summary["rows_ok"] == 2 and summary["errors_by_kind"] == {"DecodeError": 1, "ReadError": 1}
    original = pd.read_csv(io.BytesIO(s3_env.get("s3://results/run1/original.csv")))
    assert list(original.columns)[1:] == ["File", "SD_Prediction", "CXR_Age"] and len(original) == 2

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 3, again.stderr[-3000:]
    summary = json.loads(s3_env.get("s3://results/run1/_cxrage/summary.json"))
    assert summary["rows_scored_this_run"] == 0 and summary["rows_written"] == 4
