"""The README's cluster route, for real (issue 23): `ray start` head (job API) + a worker node on loopback, S3 on
loopback, `ray job submit --working-dir . -- python jobs/score.py s3://… s3://… --device cpu --weights demo`.

- the first submission of a fresh working directory succeeds (it failed with FileNotFoundError on the weights
  thread while `ray.init` connected: `runtime.session.settle_cwd_dependent_imports`);
- the worker node SIGKILLed mid-job (a reclaimed spot node): the job ends by itself within the no-progress timeout,
  and one resubmission, once a replacement node has joined, completes with exactly one row per manifest row;
- the head restarted mid-job (ray stop + ray start: a new cluster) and the job resubmitted: it resumes.

One cluster for the whole scenario (start-up costs ~20 s on 2 cores); every process it started is ended by PID.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster_fixtures import LoopbackCluster
from imagegen import radiograph

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
FILMS = 90
NO_PROGRESS_S = 30  # --no-progress-timeout: how long a job with no node to run on waits before it stops
LIGHT = ["--device", "cpu", "--weights", "demo", "--preprocess", "none", "--tta", "none", "--rotation", "off",
         "--no-progress", "--part-rows", "10", "--no-progress-timeout", str(NO_PROGRESS_S)]


def _command(output: str) -> list[str]:
    return ["python", "jobs/score.py", "s3://archive/manifest.csv", output, *LIGHT]


def _row_ids(s3, output: str) -> list[int]:
    bucket, prefix = output.removeprefix("s3://").split("/", 1)
    listing = s3.client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/parts/").get("Contents", [])
    return [r for obj in listing if obj["Key"].endswith(".parquet")
            for r in pq.read_table(io.BytesIO(s3.get(f"s3://{bucket}/{obj['Key']}")), columns=["row_id"])
            .column("row_id").to_pylist()]


def _summary(s3, output: str) -> dict:
    return json.loads(s3.get(f"{output.rstrip('/')}/_cxrage/summary.json"))


def _wait_for_rows(s3, output: str, job, limit_s: float = 400) -> int:
    """Rows committed to OUTPUT once the first part is there (the job still running), polled."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if rows := _row_ids(s3, output):
            return len(rows)
        assert job.poll() is None, f"the job ended before its first part:\n{job.log_path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no part in {output} after {limit_s:.0f}s")


@pytest.fixture
def cluster(s3_env, tmp_path):
    s3_env.make_bucket("archive")
    s3_env.make_bucket("results")
    for i in range(FILMS):
        buf = io.BytesIO()
        Image.fromarray(radiograph(256, 256, seed=i)).save(buf, format="PNG")
        s3_env.put(f"s3://archive/films/f{i:03d}.png", buf.getvalue())
    manifest = pd.DataFrame({"uri": [f"films/f{i:03d}.png" for i in range(FILMS)]})
    s3_env.put("s3://archive/manifest.csv", manifest.to_csv(index=False).encode())

    home = tmp_path / "home"  # the demo weights exist already, as after a first local run: the driver reads them
    from cxrage_ray.model.demo import write_demo_checkpoint  # on its weights thread (the failure's condition)

    write_demo_checkpoint(home / "weights" / "demo-random-seed0.pth")
    env = {**os.environ, "CXRAGE_HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    root = Path(tempfile.mkdtemp(prefix="cxc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    loopback = LoopbackCluster(root, env, head_cpus=0)  # the head schedules no work, as in cluster.yaml
    try:
        loopback.start_head()
        loopback.add_worker(num_cpus=4)
        yield loopback, s3_env
    finally:
        left = loopback.close()
        assert not left, f"processes of the loopback cluster still running: {left}"


def test_cluster_job_first_submission_node_loss_and_head_restart(cluster):
    loopback, s3 = cluster

    # 1. the first submission of a fresh working directory succeeds
    first = loopback.submit(REPO, _command("s3://results/first/"), timeout_s=600)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "FileNotFoundError" not in first.stdout
    rows = _row_ids(s3, "s3://results/first/")
    assert sorted(rows) == list(range(FILMS))

    # 2. the worker node is lost mid-job: the job ends by itself, never hangs
    job = loopback.submit(REPO, _command("s3://results/spot/"), timeout_s=600, wait=False)
    committed = _wait_for_rows(s3, "s3://results/spot/", job)
    killed_at = time.monotonic()
    assert loopback.kill_node(loopback.nodes[1]) >= 2
    try:
        job.wait(timeout=NO_PROGRESS_S + 240)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError("the job did not end by itself after its only worker node was lost") from None
    output = job.log_path.read_text(errors="replace")
    ended_after = time.monotonic() - killed_at
    if job.returncode != 0:  # failed: with the resumable no-progress error, not a traceback of Ray's
        assert "rerunning the same command resumes" in output, output[-4000:]
    assert committed < FILMS or job.returncode == 0
    assert ended_after < NO_PROGRESS_S + 240

    # ... and one resubmission, on the replacement node, completes: one row per manifest row, no duplicates
    loopback.add_worker(num_cpus=4)
    again = loopback.submit(REPO, _command("s3://results/spot/"), timeout_s=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    rows = _row_ids(s3, "s3://results/spot/")
    assert len(rows) == FILMS and sorted(rows) == list(range(FILMS))
    if job.returncode != 0:
        assert _summary(s3, "s3://results/spot/")["rows_scored_this_run"] < FILMS

    # 3. the head restarted mid-job (a new cluster on the same ports), the job resubmitted: it resumes
    job = loopback.submit(REPO, _command("s3://results/head/"), timeout_s=600, wait=False)
    committed = _wait_for_rows(s3, "s3://results/head/", job)
    loopback.restart_head(worker_cpus=[4])
    try:  # the client tailing the old job's log loses its job API with the head; it is only a client
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait(timeout=30)
    resumed = loopback.submit(REPO, _command("s3://results/head/"), timeout_s=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    rows = _row_ids(s3, "s3://results/head/")
    assert len(rows) == FILMS and sorted(rows) == list(range(FILMS))
    summary = _summary(s3, "s3://results/head/")
    # resumed: the rows committed before the head went down are not scored again (how many more the old job
    # committed before its head was gone is a race: at these sizes it may have finished, and then this is 0)
    assert committed <= FILMS - summary["rows_scored_this_run"]
