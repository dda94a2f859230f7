"""What an interrupted or refused `cxrage score` keeps: this checkout vs another (`--pythonpath`), same films.

Scenarios, each on a fresh OUTPUT, default settings (so the default commit window applies) except
`--tta none --rotation off` on small generated films, so the run's time is the pipeline's. The moment of each
fault is read from the run's own progress bar (films done), not from a clock, since this machine's load swings:

1. a full run: wall seconds and exit code;
2. SIGKILL of the driver at 60% of the films: rows committed, and how many of the run's processes are alive
   5 s and 30 s later (descendants of the driver recorded just before the kill);
3. SIGTERM at 60%: exit code, seconds to exit, rows committed;
4. OUTPUT made unwritable at 30% (`chattr +i` on OUTPUT and OUTPUT/parts; root only): exit code, seconds
   from the lock to the exit, a traceback or not, rows committed + kept in the spill; then the lock is lifted
   and the same command rerun: rows it scored and the unique rows in OUTPUT.
5. `--cluster` (issue 23; instead of 1-4): the README's cluster route on loopback (`ray start` head with the job
   API + one 4-CPU worker node, moto S3, `ray job submit --working-dir . -- python jobs/score.py s3://… s3://…`):
   the first submission's exit; the worker node SIGKILLed at its job's first committed part (seconds until the
   job ended by itself, its exit, whether it said how to resume), a replacement node and one resubmission (rows,
   unique rows, rows it scored); the head restarted at a job's first part and the job resubmitted (the same).

    python benchmarks/chaos.py                                   # this checkout
    python benchmarks/chaos.py --cluster --films 120             # the cluster case
    git worktree add /tmp/before 60e8091 && python benchmarks/chaos.py --pythonpath /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from checkpoints import random_state_dict, save_fastai_checkpoint  # noqa: E402


def make_films(root: Path, n: int) -> tuple[Path, Path]:
    folder = root / "films"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 64), dtype=np.uint8)).save(folder / f"film{i:04d}.png")
    weights = root / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=3), legacy=False, with_opt=False)
    return folder, weights


class Run:
    """One `cxrage score` process of FILMS into OUT, its progress bar read as it goes."""

    def __init__(self, films: tuple[Path, Path], out: Path, spill: Path, pythonpath: str | None) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
               "CXRAGE_SPILL_DIR": str(spill)}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", str(films[0]), str(out), "--weights", str(films[1]),
               "--rotation", "off", "--tta", "none"]
        self.total = len(list(films[0].iterdir()))
        self.out = out
        self.output = ""
        self.films_done = 0
        self.started = time.monotonic()
        # the working folder goes first on sys.path (`python -m`): run where the code to measure is
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=pythonpath or REPO)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        bar = re.compile(rf"(\d+)/{self.total}\b")
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.output += chunk.decode(errors="replace")
            if counts := bar.findall(self.output[-4096:]):
                self.films_done = int(counts[-1])

    def wait_for(self, fraction: float, limit_s: float = 1800) -> None:
        deadline = time.monotonic() + limit_s
        while self.films_done < fraction * self.total:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the run ended or stalled before {fraction:.0%}:\n{self.output[-2000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 1800) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.proc.returncode, self.output


def committed_rows(out: Path) -> list[int]:
    parts = sorted((out / "parts").glob("*.parquet")) if (out / "parts").exists() else []
    return [r for p in parts for r in pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist()]


def spilled_rows(spill: Path) -> list[int]:
    return [r for p in spill.rglob("part-*.parquet") for r in pq.read_table(p, columns=["row_id"])
            .column("row_id").to_pylist()]


def alive(procs: list[psutil.Process]) -> int:
    count = 0
    for proc in procs:
        try:
            count += proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    return count


def chattr(flag: str, *folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            subprocess.run(["chattr", flag, str(folder)], check=False)


def cluster_case(films: int, no_progress_s: int = 30) -> dict[str, object]:
    """Scenario 5 (see the module docstring): figures of the cluster route on loopback."""
    import io as _io

    import boto3
    import pandas as pd
    from moto.server import ThreadedMotoServer

    from cluster_fixtures import LoopbackCluster
    from imagegen import radiograph

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    for bucket in ("archive", "results"):
        s3.create_bucket(Bucket=bucket)
    for i in range(films):
        buf = _io.BytesIO()
        Image.fromarray(radiograph(256, 256, seed=i)).save(buf, format="PNG")
        s3.put_object(Bucket="archive", Key=f"films/f{i:04d}.png", Body=buf.getvalue())
    s3.put_object(Bucket="archive", Key="manifest.csv",
                  Body=pd.DataFrame({"uri": [f"films/f{i:04d}.png" for i in range(films)]}).to_csv(index=False).encode())

    def rows(prefix: str) -> list[int]:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="results", Prefix=f"{prefix}/parts/").get("Contents", [])]
        return [r for k in keys if k.endswith(".parquet") for r in pq.read_table(_io.BytesIO(
            s3.get_object(Bucket="results", Key=k)["Body"].read()), columns=["row_id"]).column("row_id").to_pylist()]

    def scored(prefix: str) -> int | None:
        try:
            body = s3.get_object(Bucket="results", Key=f"{prefix}/_cxrage/summary.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        return json.loads(body).get("rows_scored_this_run")

    def command(prefix: str) -> list[str]:
        return ["python", "jobs/score.py", "s3://archive/manifest.csv", f"s3://results/{prefix}/", "--device", "cpu",
                "--weights", "demo", "--preprocess", "none", "--tta", "none", "--rotation", "off", "--no-progress",
                "--part-rows", "10", "--no-progress-timeout", str(no_progress_s)]

    def at_first_part(job, prefix: str) -> int:
        while not (done := rows(prefix)):
            if job.poll() is not None:
                raise SystemExit(f"the job ended before its first part:\n{job.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        return len(done)

    def outcome(prefix: str, result) -> dict[str, object]:
        got = rows(prefix)
        return {"exit": result.returncode, "rows": len(got), "unique_rows": len(set(got)), "scored": scored(prefix)}

    figures: dict[str, object] = {"films": films, "no_progress_timeout_s": no_progress_s}
    with tempfile.TemporaryDirectory(prefix="cxc-", dir="/tmp") as tmp:
        root = Path(tmp)
        home = root / "home"
        from cxrage_ray.model.demo import write_demo_checkpoint

        write_demo_checkpoint(home / "weights" / "demo-random-seed0.pth")  # the weights thread reads them
        env = {**os.environ, **aws, "CXRAGE_HOME": str(home),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        cluster = LoopbackCluster(root, env, head_cpus=0)
        try:
            started = time.monotonic()
            cluster.start_head()
            cluster.add_worker(4)
            figures["cluster_up_s"] = round(time.monotonic() - started, 1)
            started = time.monotonic()
            first = cluster.submit(REPO, command("first"), 900)
            figures["first_submission"] = {**outcome("first", first), "wall_s": round(time.monotonic() - started, 1),
                                           "FileNotFoundError": "FileNotFoundError" in first.stdout}

            job = cluster.submit(REPO, command("spot"), 900, wait=False)
            committed = at_first_part(job, "spot")
            killed = time.monotonic()
            processes = cluster.kill_node(cluster.nodes[1])
            job.wait(timeout=no_progress_s + 600)
            text = job.log_path.read_text(errors="replace")
            figures["worker_killed"] = {"rows_at_kill": committed, "processes_killed": processes,
                                        "job_ended_after_s": round(time.monotonic() - killed, 1),
                                        "exit": job.returncode, "says_resume": "resumes" in text,
                                        "rows_kept": len(set(rows("spot")))}
            cluster.add_worker(4)
            figures["resubmitted"] = outcome("spot", cluster.submit(REPO, command("spot"), 900))

            job = cluster.submit(REPO, command("head"), 900, wait=False)
            committed = at_first_part(job, "head")
            started = time.monotonic()
            cluster.restart_head(worker_cpus=[4])
            try:  # the client tailing the old job's log has lost its job API with the head
                job.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.kill()
            figures["head_restarted"] = {"rows_at_restart": committed,
                                         "restart_s": round(time.monotonic() - started, 1),
                                         "rows_kept": len(set(rows("head")))}
            figures["resumed"] = outcome("head", cluster.submit(REPO, command("head"), 900))
        finally:
            figures["processes_left"] = len(cluster.close())
            moto.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=600)
    parser.add_argument("--pythonpath", help="run another checkout's code (same venv)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cluster", action="store_true", help="run scenario 5 (the cluster route) instead of 1-4")
    args = parser.parse_args()
    if args.cluster:
        figures = cluster_case(args.films)
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return
    figures: dict[str, object] = {"code": args.pythonpath or str(REPO), "films": args.films}
    with tempfile.TemporaryDirectory(prefix="cxrage-chaos-") as tmp:
        root = Path(tmp)
        films = make_films(root, args.films)
        spill = root / "spill"

        full = Run(films, root / "full", spill, args.pythonpath)
        code, _ = full.wait()
        t_full = time.monotonic() - full.started
        figures["full"] = {"exit": code, "wall_s": round(t_full, 1), "rows": len(set(committed_rows(root / "full")))}

        killed = Run(films, root / "killed", spill, args.pythonpath)
        killed.wait_for(0.6)
        tree = psutil.Process(killed.proc.pid).children(recursive=True)
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        time.sleep(5)
        after_5 = alive(tree)
        time.sleep(25)
        figures["sigkill_at_60pct"] = {"films_done_at_kill": killed.films_done,
                                       "rows_kept": len(set(committed_rows(root / "killed"))),
                                       "processes": len(tree), "alive_after_5s": after_5,
                                       "alive_after_30s": alive(tree)}

        termed = Run(films, root / "termed", spill, args.pythonpath)
        termed.wait_for(0.6)
        sent = time.monotonic()
        termed.proc.send_signal(signal.SIGTERM)
        code, output = termed.wait()
        figures["sigterm_at_60pct"] = {"exit": code, "exit_after_s": round(time.monotonic() - sent, 1),
                                       "rows_kept": len(set(committed_rows(root / "termed"))),
                                       "traceback": "Traceback" in output}

        if os.geteuid() == 0 and shutil.which("chattr"):
            out = root / "locked"
            locked = Run(films, out, spill, args.pythonpath)
            locked.wait_for(0.3)
            chattr("+i", out, out / "parts")
            sent = time.monotonic()
            code, output = locked.wait()
            stopped = time.monotonic() - sent
            chattr("-i", out, out / "parts")
            kept, spilled = committed_rows(out), spilled_rows(spill)
            rerun = Run(films, out, spill, args.pythonpath)
            rerun_code, _ = rerun.wait()
            summary_file = next((p for p in (out / "_cxrage" / "summary.json", out / "summary.json") if p.exists()),
                                None)
            summary = json.loads(summary_file.read_text()) if summary_file else {}
            figures["output_unwritable_at_30pct"] = {
                "exit": code, "exit_after_lock_s": round(stopped, 1), "traceback": "Traceback" in output,
                "rows_committed": len(kept), "rows_spilled": len(spilled),
                "films_done_at_lock": locked.films_done,
                "last_line": ([line for line in output.replace("\r", "\n").splitlines() if line.strip()] or [""])[-1][:300],
                "rerun_exit": rerun_code, "rerun_scored": summary.get("rows_scored_this_run"),
                "rows_after_rerun": len(set(committed_rows(out))),
            }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
