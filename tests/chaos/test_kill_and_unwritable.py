"""Chaos: a 600-film `cxrage score` killed with SIGKILL at ~60%, stopped with SIGTERM, and an OUTPUT that becomes
unwritable mid-run. Each run is a real CLI process with its own embedded Ray.

What must hold (issue 11): a killed driver loses at most the commit window (`--commit-every`) and no Ray process
of it survives for more than a few seconds; SIGTERM commits and exits 143; an OUTPUT that refuses a part stops the
job at once with exit 4 and the rows it could not write wait in the spill for the rerun; every rerun scores only
what is missing, ending at exactly one row per manifest row.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from processes import still_running

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_FILMS = 600
COMMIT_EVERY_S = 2
#: Parts of at most this many rows, so the SIGKILL at ~60% keeps ~60% (not the whole 2 s window of the moment,
#: ~120 rows on a fast pass) and the rerun still has ~200 rows (seconds of work) left when SIGTERM comes: with 120
#: rows left, a rerun finished and exited before it could be signalled (CI, stop 32).
PART_ROWS = 16


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chaos")
    folder = root / "films"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(N_FILMS):  # small films: the run's time goes to the pipeline, not the seed chain
        Image.fromarray(rng.integers(0, 256, (72, 64), dtype=np.uint8)).save(folder / f"film{i:04d}.png")
    weights = root / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=3), legacy=False, with_opt=False)
    return folder, weights


def _start(films: tuple[Path, Path], out: Path, spill: Path) -> subprocess.Popen:
    folder, weights = films
    cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", str(folder), str(out), "--weights", str(weights),
           "--no-progress", "--rotation", "off", "--tta", "none", "--preprocess", "none", "--batch-size", "32",
           "--commit-every", str(COMMIT_EVERY_S), "--part-rows", str(PART_ROWS), "--num-cpus", "4"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
           "CXRAGE_SPILL_DIR": str(spill)}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _committed(out: Path) -> list[int]:
    parts = sorted((out / "parts").glob("*.parquet")) if (out / "parts").exists() else []
    return [r for p in parts for r in pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist()]


def _wait_for_rows(proc: subprocess.Popen, out: Path, rows: int, limit_s: float = 480) -> list[int]:
    deadline = time.monotonic() + limit_s
    while len(done := _committed(out)) < rows:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {rows} rows were committed:\n"
                        f"{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"fewer than {rows} rows committed in {limit_s:.0f} s"
        time.sleep(0.2)
    return done


def _alive(procs: list[psutil.Process]) -> list[str]:
    return [f"{proc.pid} {proc.as_dict(['name'], ad_value='?')['name']}" for proc in procs if still_running(proc)]


def _summary(out: Path) -> dict:
    return json.loads((out / "_cxrage" / "summary.json").read_text())


def test_sigkill_at_60_percent_then_sigterm_then_rerun(films, tmp_path):
    out, spill = tmp_path / "out", tmp_path / "spill"

    first = _start(films, out, spill)
    _wait_for_rows(first, out, int(0.55 * N_FILMS))
    ray_processes = psutil.Process(first.pid).children(recursive=True)
    assert ray_processes, "the driver had no child processes to check"
    seen = _wait_for_rows(first, out, int(0.6 * N_FILMS))
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 5
    while _alive(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(ray_processes), f"alive 5 s after the driver's SIGKILL: {_alive(ray_processes)}"
    kept = _committed(out)
    assert len(kept) >= len(seen) >= 0.6 * N_FILMS and len(set(kept)) == len(kept)

    second = _start(films, out, spill)
    _wait_for_rows(second, out, len(kept) + 20)
    assert second.poll() is None, f"the rerun ended before SIGTERM ({N_FILMS - len(kept)} rows were left)"
    second.send_signal(signal.SIGTERM)
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 143, output[-3000:]
    assert "terminated (SIGTERM)" in output
    after_term = _committed(out)
    assert len(after_term) >= len(kept) + 20 and len(set(after_term)) == len(after_term)

    third = _start(films, out, spill)
    output = third.communicate(timeout=600)[0]
    assert third.returncode == 0, output[-3000:]
    summary = _summary(out)
    assert summary["rows_scored_this_run"] == N_FILMS - len(after_term)  # only what was missing
    assert sorted(_committed(out)) == list(range(N_FILMS))


def _lock(folder: Path) -> None:
    """Make `folder` refuse new files: read-only mode for a normal user; for root (whom modes do not stop) the
    immutable attribute, where the filesystem and capabilities allow it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without a way to make a folder unwritable (chattr +i failed)")


def _unlock(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    elif shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_output_unwritable_mid_run_stops_early_and_loses_nothing(films, tmp_path):
    out, spill = tmp_path / "out", tmp_path / "spill"
    run = _start(films, out, spill)
    _wait_for_rows(run, out, 1)
    _lock(out / "parts")
    try:
        locked_at = time.monotonic()
        output = run.communicate(timeout=300)[0]
        stopped_after_s = time.monotonic() - locked_at
    finally:
        _unlock(out / "parts")
    assert run.returncode == 4, output[-3000:]
    assert "cannot write" in output and "scored rows are kept in" in output and "Traceback" not in output
    spilled = [r for p in spill.rglob("part-*.parquet") for r in pq.read_table(p).column("row_id").to_pylist()]
    committed = _committed(out)
    assert spilled and not set(spilled) & set(committed)
    # stopped at the first refused part, not after scoring everything
    assert len(committed) + len(spilled) < N_FILMS, f"scored all {N_FILMS} films before stopping"
    assert stopped_after_s < 60

    rerun = _start(films, out, spill)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert _summary(out)["rows_scored_this_run"] == N_FILMS - len(committed) - len(spilled)  # spilled: not rescored
    assert sorted(_committed(out)) == list(range(N_FILMS))
    assert not list(spill.rglob("part-*.parquet"))
