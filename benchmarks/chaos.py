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

    python benchmarks/chaos.py                                   # this checkout
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=600)
    parser.add_argument("--pythonpath", help="run another checkout's code (same venv)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
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
