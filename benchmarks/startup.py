"""Seconds from typing `cxrage score` to the first scored film, seen from outside the process.

With `--part-rows 1` every scored film is committed as its own Parquet part, so the first
`OUTPUT/parts/*.parquet` to appear marks the first scored film, whatever version of cxrage runs. The
script starts the command, polls for that file, and prints the time to it and the total wall time.

    python benchmarks/startup.py                       # this checkout, 8 sample films, --weights demo
    python benchmarks/startup.py --pythonpath /tmp/old # an older checkout's code, same venv, same films
    python benchmarks/startup.py --repeat 3 --films 4

Figures depend on the machine's load (a shared 2-core box swings by 2x): compare runs made back to back.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_film_seconds(films: Path, out: Path, home: Path, pythonpath: str | None, extra: list[str]) -> tuple[float, float, int]:
    """(seconds to the first committed part, total wall seconds, exit code) of one `cxrage score` run."""
    env = {**os.environ, "CXRAGE_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", str(films), str(out), "--weights", "demo",
           "--part-rows", "1", "--no-progress", *extra]
    started = time.monotonic()
    # the working folder goes first on sys.path (`python -m`): run where the code to measure is
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=pythonpath or REPO)
    first = None
    while proc.poll() is None:
        if first is None and any((out / "parts").glob("*.parquet")):
            first = time.monotonic() - started
        time.sleep(0.05)
    total = time.monotonic() - started
    if first is None and any((out / "parts").glob("*.parquet")):
        first = total
    if proc.returncode not in (0, 3):
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return (first if first is not None else float("nan")), total, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=8, help="sample films to score")
    parser.add_argument("--repeat", type=int, default=1, help="runs (a fresh OUTPUT each)")
    parser.add_argument("--pythonpath", help="run the cxrage_ray package found here instead of this checkout's")
    parser.add_argument("extra", nargs="*", help="more `cxrage score` options (after --)")
    args = parser.parse_args()
    shared = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    images = sorted((shared / "data" / "cxr-sample" / "images").glob("*.png"))[: args.films]
    with tempfile.TemporaryDirectory() as tmp:
        films = Path(tmp) / "films"
        films.mkdir()
        for image in images:
            (films / image.name).symlink_to(image)
        home = Path(tmp) / "home"
        for i in range(args.repeat):
            first, total, code = first_film_seconds(films, Path(tmp) / f"out{i}", home, args.pythonpath, args.extra)
            print(f"run {i}: first scored film after {first:.1f} s, all {len(images)} after {total:.1f} s "
                  f"(exit {code})", flush=True)


if __name__ == "__main__":
    main()
