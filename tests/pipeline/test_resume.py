"""Interrupted real runs resume to exactly one row per manifest row (SIGINT, killed driver, lost worker).

Each run is a separate `cxrage score` process with its own embedded Ray, interrupted once it has committed
its first parts; the rerun of the same command must score only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from processes import still_running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_FILMS = 48


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    films = root / "films"
    films.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_FILMS):
        y, x = np.mgrid[0:300, 0:260]
        film = 120 + 60 * np.sin(x / (20 + i)) * np.cos(y / 31) + rng.normal(0, 5, x.shape)
        Image.fromarray(np.clip(film, 0, 255).astype(np.uint8)).save(films / f"film{i:03d}.png")
    weights = root / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=1), legacy=False, with_opt=False)
    return films, weights


def _command(films: Path, weights: Path, out: Path) -> list[str]:
    # small batches and parts so the run commits parts steadily and can be cut in the middle
    return [sys.executable, "-m", "cxrage_ray.cli", "score", str(films), str(out), "--weights", str(weights),
            "--no-progress", "--rotation", "off", "--batch-size", "10", "--part-rows", "4", "--num-cpus", "4"]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}


def _committed_rows(out: Path) -> list[int]:
    parts = sorted((out / "parts").glob("*.parquet")) if (out / "parts").exists() else []
    return [r for p in parts for r in pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist()]


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, as under an interactive terminal. A test run started in the
    background (`cmd &`, nohup, some CI runners) inherits SIGINT *ignored*, and Python then installs no
    KeyboardInterrupt handler: the interrupt would be silently dropped and the run would finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_parts(cmd: list[str], out: Path, min_rows: int) -> subprocess.Popen | None:
    """Start a run and return it once `min_rows` rows are committed; None if it finished before that."""
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 480
    while len(_committed_rows(out)) < min_rows:
        if proc.poll() is not None:
            output = proc.stdout.read().decode()
            assert proc.returncode == 0, f"run failed before it could be interrupted:\n{output[-3000:]}"
            return None
        assert time.monotonic() < deadline, "no parts committed in time"
        time.sleep(0.2)
    return proc


def _interrupted_run(job, tmp_path: Path, min_rows: int, interrupt) -> tuple[list[str], Path, subprocess.Popen, str]:
    """Start a run, let `min_rows` rows be committed, then `interrupt(proc, out)`: it returns the run's output,
    or None when the interrupt came too late (the run had already finished every row).

    The interrupt has to land mid-run, but the run keeps going while the test polls for parts every 0.2 s, so
    on a fast machine it could end first. Such a try proves nothing, so it is made again on a fresh OUTPUT (at
    most 3 tries); the assertions come after.
    """
    films, weights = job
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        cmd = _command(films, weights, out)
        proc = _start_and_wait_for_parts(cmd, out, min_rows)
        if proc is None:
            continue
        try:
            output = interrupt(proc, out)
        finally:
            _kill_group(proc)  # the embedded Ray's own processes, if any outlived the driver
        if output is not None:
            return cmd, out, proc, output
    pytest.fail("three runs finished before they could be interrupted")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def _finish_and_check(cmd: list[str], out: Path, done_before: int) -> None:
    """Run `cmd` to the end; every row is in OUTPUT exactly once, and no process it started outlives it by more
    than a few seconds (the command leaves its embedded Ray to the lifetime watcher, `lifetime.exit_now`)."""
    import psutil

    with open(out.parent / f"{out.name}.log", "w+") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        started: dict[int, psutil.Process] = {}
        names: set[str] = set()
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if child.pid not in started:
                        started[child.pid] = child
                        with contextlib.suppress(psutil.Error):
                            names.add(" ".join(child.cmdline()))
            time.sleep(0.3)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-3000:]
    if done_before < N_FILMS:  # else nothing is left to score, and no Ray starts
        assert any("raylet" in name for name in names), "the run's Ray processes were not seen"
    alive_until = time.monotonic() + 10
    while (survivors := [p.pid for p in started.values() if still_running(p)]) and time.monotonic() < alive_until:
        time.sleep(0.2)
    assert not survivors, f"processes of the finished run still alive 10 s after it exited: {survivors}"
    rows = _committed_rows(out)
    assert sorted(rows) == list(range(N_FILMS)), "every manifest row exactly once"
    summary = json.loads((out / "_cxrage" / "summary.json").read_text())
    assert summary["complete"] and summary["rows_written"] == N_FILMS
    assert summary["rows_scored_this_run"] == N_FILMS - done_before


def test_sigint_then_rerun_scores_only_the_rest(job, tmp_path):
    def sigint(proc: subprocess.Popen, out: Path) -> str | None:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
        return None if proc.returncode == 0 and len(_committed_rows(out)) == N_FILMS else output

    cmd, out, proc, output = _interrupted_run(job, tmp_path, 4, sigint)
    assert proc.returncode == 130, output[-3000:]
    assert "rerun the same command to resume" in output
    assert "rows scored this run were written to" in output  # what was kept, in numbers
    # a quiet console: Ray's and Ray Data's own lines (and the driver's core_worker.cc errors) stay in the session log
    for noise in ("core_worker.cc", "Execution finished", "Progress bars disabled", "(MapWorker", "(pid="):
        assert noise not in output, noise
    done = _committed_rows(out)
    assert 4 <= len(done) < N_FILMS and len(set(done)) == len(done)
    _finish_and_check(cmd, out, len(done))


def test_killed_driver_then_rerun(job, tmp_path):
    def sigkill(proc: subprocess.Popen, out: Path) -> str | None:
        _kill_group(proc)  # SIGKILL the driver and everything it started: no cleanup code runs
        return None if len(_committed_rows(out)) == N_FILMS else ""

    cmd, out, _, _ = _interrupted_run(job, tmp_path, 8, sigkill)
    done = _committed_rows(out)
    assert len(done) < N_FILMS
    _finish_and_check(cmd, out, len(done))


def _pids_matching(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the Ray worker")
def test_lost_predictor_worker(job, tmp_path):
    def kill_predictor(proc: subprocess.Popen, out: Path) -> str:  # finishing anyway is fine: Ray restarts it
        workers = [p for p in _pids_matching("ScoreActor") if p != proc.pid]
        assert workers, "predictor actor process not found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.wait(600)  # Ray restarts the actor, or the driver fails; either way no row may be lost
        return ""

    cmd, out, _, _ = _interrupted_run(job, tmp_path, 4, kill_predictor)
    done = _committed_rows(out)
    assert len(set(done)) == len(done)
    _finish_and_check(cmd, out, len(done))


def test_stalled_run_stops_with_an_explanation(job, tmp_path):
    """A read that never returns must not hang the job for Ray's default 30 minutes."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(50)], daemon=True).start()
    port = server.getsockname()[1]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\nhttp://127.0.0.1:{port}/never.png\n")
    _, weights = job
    cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", str(manifest), str(tmp_path / "out"),
           "--weights", str(weights), "--no-progress", "--rotation", "off", "--no-progress-timeout", "20"]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        _kill_group(proc)
        server.close()
    assert proc.returncode == 2, output[-3000:]
    assert "no image finished for 20s" in output and "rerunning the same command resumes" in output
