"""Benchmark: `cxrage score` of this tree against another tree (the previous release), alternating, best of N.

In:  a folder holding the other release's source (`git worktree add /tmp/prev <commit>`), the 250 real films in
     $CXRAGE_SHARED/data/cxr-sample/images cycled through a CSV manifest of `--films` rows, and random weights in
     the published format (`cxrage weights demo`; speed only).
Out: per side, the wall-clock films/s of each run (process start to exit, Ray start-up included) and the best;
     ratio = best(this) / best(other); and whether both sides wrote the same rows (max |cxr_age| difference).

Two kinds of work, as the release notes quote them:
    heavy   the seed chain + seed TTA + rotation auto, fp32, CPU (the published pipeline on real films)
    light   pre-made seed-chain pictures (`cxrage preprocess` once), `--preprocess none --tta none --rotation off`

Both sides run in the same venv: the other tree is put first on PYTHONPATH, so only the package's code differs.

    git worktree add /tmp/prev c4110db
    python benchmarks/release_compare.py /tmp/prev --kind heavy --films 100 --repeats 3
    python benchmarks/release_compare.py /tmp/prev --kind light --films 1000 --repeats 3
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
sys.path.insert(0, str(REPO / "benchmarks"))
from pipeline import images_dir, list_images, write_manifest  # noqa: E402

ENTRY = "import sys; from cxrage_ray.cli import entry; sys.argv[0] = 'cxrage'; entry()"
KIND_ARGS = {
    "heavy": ["--tta", "seed", "--rotation", "auto", "--device", "cpu", "--precision", "fp32"],
    "light": ["--preprocess", "none", "--tta", "none", "--rotation", "off", "--device", "cpu"],
}


def run_cxrage(tree: Path, args: list[str], home: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(tree), "CXRAGE_HOME": str(home), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    home.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # cwd outside both trees: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH, so run
    # from this checkout both sides (and their Ray workers) would import this checkout's package
    done = subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, capture_output=True, text=True, cwd=home)
    return time.perf_counter() - started, done


def pictures_of(films: list[Path], work: Path, home: Path) -> list[Path]:
    """The films' seed-chain PNGs, made once by this tree's `cxrage preprocess` (the light work's input)."""
    out = work / "pictures"
    folder = work / "originals"
    folder.mkdir()
    for film in films:
        (folder / film.name).symlink_to(film.resolve())
    _, done = run_cxrage(REPO, ["preprocess", str(folder), str(out)], home)
    if done.returncode not in (0, 3):
        raise SystemExit(done.stderr[-2000:])
    return sorted(out.glob("*.png"))


def max_age_difference(a: Path, b: Path) -> float:
    import pandas as pd

    left = pd.read_parquet(a).set_index("image_id").sort_index()
    right = pd.read_parquet(b).set_index("image_id").sort_index()
    if list(left.index) != list(right.index) or list(left["status"]) != list(right["status"]):
        return float("inf")
    return float((left["cxr_age"] - right["cxr_age"]).abs().max())


def compare(other: Path, kind: str, films_wanted: int, repeats: int) -> dict:
    """This tree against `other` on one kind of work, alternating who goes first, best of `repeats`."""
    if not (other / "cxrage_ray").is_dir():
        raise SystemExit(f"{other} holds no cxrage_ray/ (make one with `git worktree add`)")
    with tempfile.TemporaryDirectory(prefix="cxrage-release-") as tmp:
        work, home = Path(tmp), Path(tmp) / "home"
        films = list_images(images_dir())
        if kind == "light":
            films = pictures_of(films, work, home)
        manifest = write_manifest(work / "manifest.csv", films, films_wanted)
        sides = {"this": REPO, "other": other.resolve()}
        walls: dict[str, list[float]] = {side: [] for side in sides}
        for repeat in range(repeats):
            order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]  # alternate who goes first
            for side in order:
                out = work / f"out-{side}"
                command = ["score", str(manifest), str(out), "--weights", "demo", "--no-progress", "--overwrite",
                           *KIND_ARGS[kind]]
                subprocess.run(["rm", "-rf", str(out)], check=True)
                wall, done = run_cxrage(sides[side], command, home)
                if done.returncode != 0:
                    raise SystemExit(f"{side}: exit {done.returncode}\n{done.stderr[-3000:]}")
                walls[side].append(wall)
                print(f"  {kind} run {repeat + 1} {side:5s}: {films_wanted / wall:7.2f} films/s ({wall:.1f} s)",
                      flush=True)
        difference = max_age_difference(work / "out-this", work / "out-other")
    best = {side: films_wanted / min(w) for side, w in walls.items()}
    print(f"{kind}, {films_wanted} films, best of {repeats}: this {best['this']:.2f} films/s, "
          f"other {best['other']:.2f} films/s, ratio this/other {best['this'] / best['other']:.3f}; "
          f"max |cxr_age this - other| = {difference:.3g} years", flush=True)
    return {"kind": kind, "films": films_wanted, "repeats": repeats, "this_films_per_s": round(best["this"], 3),
            "other_films_per_s": round(best["other"], 3), "ratio": round(best["this"] / best["other"], 3),
            "max_abs_cxr_age_diff": difference, "walls_s": {k: [round(x, 2) for x in v] for k, v in walls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other release's source tree (holding cxrage_ray/)")
    parser.add_argument("--kind", choices=sorted(KIND_ARGS), default="heavy")
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    compare(args.other, args.kind, args.films, args.repeats)


if __name__ == "__main__":
    main()
