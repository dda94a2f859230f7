"""The driver's CPU per scored row (issue 38): a light `cxrage score` job of N and of M films, the driver's own CPU
seconds (getrusage of the driver process: its threads, not Ray's workers) in each, and (cpu(M) - cpu(N)) / (M - N).

Light job, as issue 38 measured it: `--preprocess none --tta none --rotation off --device cpu --num-cpus 16` on
small generated PNGs (72x64), so the films cost little and the pipeline's own work shows. Each side (this checkout,
and `--pythonpath` trees) runs in a fresh process per job, alternating, `--repeats` times; the best (lowest) CPU of
each size is kept. Films/s (wall) and the whole process tree's peak are not measured here (pipeline_ceiling.py).

    python benchmarks/driver_cpu.py                                   # 1,000 and 4,000 films, this checkout
    git worktree add /tmp/before <commit> && python benchmarks/driver_cpu.py --pythonpath /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from checkpoints import random_state_dict, save_fastai_checkpoint  # noqa: E402

LIGHT = ["--preprocess", "none", "--tta", "none", "--rotation", "off", "--device", "cpu", "--no-progress"]
#: Runs the CLI in this process and prints the process's own CPU seconds (all its threads) as JSON.
ENTRY = """
import json, resource, sys
from cxrage_ray.cli import main
code = main(sys.argv[1:])
use = resource.getrusage(resource.RUSAGE_SELF)
print("DRIVER_CPU " + json.dumps({"exit": code, "cpu_s": use.ru_utime + use.ru_stime}))
"""


def make_films(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(11)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 64), dtype=np.uint8)).save(folder / f"film{i:05d}.png")


def driver_cpu(tree: Path, films: Path, out: Path, weights: Path, num_cpus: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": ""}
    args = ["score", str(films), str(out), "--weights", str(weights), "--num-cpus", str(num_cpus), *LIGHT]
    # cwd outside the trees, so each side imports its own package (see release_compare.py)
    done = subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, capture_output=True, text=True,
                          cwd=out.parent)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("DRIVER_CPU ")]
    if not line:
        raise SystemExit(f"{tree}: no result (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(line[-1].split(" ", 1)[1])
    if result["exit"] not in (0, None):
        raise SystemExit(f"{tree}: exit {result['exit']}:\n{done.stderr[-3000:]}")
    return float(result["cpu_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, nargs=2, default=[1000, 4000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=16)
    parser.add_argument("--pythonpath", action="append", default=[], help="another tree to measure alongside")
    args = parser.parse_args()
    trees = [REPO, *map(Path, args.pythonpath)]
    with tempfile.TemporaryDirectory(prefix="cxrage-driver-cpu-") as tmp:
        root = Path(tmp)
        small, large = args.films
        make_films(root / "films-large", large)
        (root / "films-small").mkdir()
        for path in sorted((root / "films-large").iterdir())[:small]:
            (root / "films-small" / path.name).symlink_to(path)
        weights = root / "w.pth"
        save_fastai_checkpoint(weights, random_state_dict(seed=3), legacy=False, with_opt=False)
        best: dict[tuple[int, int], float] = {}
        run = 0
        for repeat in range(args.repeats):
            order = trees if repeat % 2 == 0 else trees[::-1]
            for k, tree in ((trees.index(t), t) for t in order):
                for n, folder in ((small, "films-small"), (large, "films-large")):
                    run += 1
                    cpu = driver_cpu(tree, root / folder, root / f"out-{run}", weights, args.num_cpus)
                    print(f"  {tree}  {n:>6} films: driver CPU {cpu:6.2f} s", flush=True)
                    best[k, n] = min(best.get((k, n), float("inf")), cpu)
        for k, tree in enumerate(trees):
            per_row = (best[k, large] - best[k, small]) / (large - small)
            print(f"{tree}: driver CPU {best[k, small]:.2f} s ({small}) / {best[k, large]:.2f} s ({large}), best of "
                  f"{args.repeats}: {per_row * 1e3:.3f} ms per row, ~{1 / per_row if per_row > 0 else float('inf'):,.0f}"
                  " rows/s of one driver core")


if __name__ == "__main__":
    main()
