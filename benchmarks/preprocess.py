"""Benchmark: our decode + seed chain + PNG write against one `mogrify` run, with identical output.

In:  the 250 real radiographs in $CXRAGE_SHARED/data/cxr-sample/images (default: ../shared next to the repo).
Out: per-image milliseconds of our chain, the two wall times (process start-up included) and their ratio;
     exit status 1 if any of our PNGs differs in a single pixel from mogrify's.

Both sides write into a temporary directory; nothing is copied into the repository. Ours runs as a fresh
`python` subprocess (start-up and imports counted) with `--jobs` worker processes: mogrify uses OpenMP
threads on every core, so the default gives ours as many processes as the machine has cores (at most 2).
BLAS runs single-threaded in our workers (as in Ray workers): multi-threaded OpenBLAS on tiny banded
products only spins.

    python benchmarks/preprocess.py [--jobs N] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MOGRIFY_ARGS = ["-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8",
                "-resize", "512x512^", "-format", "png"]
REPO = Path(__file__).resolve().parents[1]


def images_dir() -> Path:
    root = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    return root / "data" / "cxr-sample" / "images"


def _one(args: tuple[str, str]) -> tuple[str, float]:
    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.decode.raster import decode_raster
    from cxrage_ray.preprocess.seed_chain import seed_chain_png

    src, out_dir = args
    t0 = time.perf_counter()
    png = seed_chain_png(decode_raster(Path(src).read_bytes(), DecodeOptions()))
    (Path(out_dir) / (Path(src).stem + ".png")).write_bytes(png)
    return Path(src).name, (time.perf_counter() - t0) * 1000.0


def worker(out_dir: str, jobs: int, files: list[str]) -> None:
    """Runs in the fresh subprocess: convert every file, print one JSON line per image."""
    tasks = [(f, out_dir) for f in files]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_one, tasks, chunksize=1)
    else:
        results = [_one(t) for t in tasks]
    for name, ms in results:
        print(json.dumps({"file": name, "ms": round(ms, 2)}))


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGBA"))
    return arr if (arr[:, :, 3] < 255).any() else arr[:, :, :3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.jobs, args.worker[1:])
        return 0

    src = images_dir()
    if not src.is_dir():
        print(f"no images at {src} (set CXRAGE_SHARED)", file=sys.stderr)
        return 2
    files = sorted(str(p) for p in src.iterdir() if p.is_file())
    if args.limit:
        files = files[: args.limit]
    with tempfile.TemporaryDirectory(prefix="cxrage-bench-") as tmp:
        im_dir, our_dir = Path(tmp, "mogrify"), Path(tmp, "ours")
        im_dir.mkdir()
        our_dir.mkdir()
        t0 = time.perf_counter()
        subprocess.run(["mogrify", "-path", str(im_dir), *MOGRIFY_ARGS, *files], check=True,
                       stderr=subprocess.DEVNULL)
        t_im = time.perf_counter() - t0

        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--jobs", str(args.jobs), "--worker", str(our_dir), *files],
                             check=True, capture_output=True, text=True, env=env, cwd=REPO)
        t_ours = time.perf_counter() - t0

        per_image = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        mismatches = []
        for f in files:
            name = Path(f).stem + ".png"
            a, b = _pixels(im_dir / name), _pixels(our_dir / name)
            if a.shape != b.shape or (a != b).any():
                mismatches.append(name)
    for rec in per_image:
        print(f"{rec['ms']:9.1f} ms  {rec['file']}")
    ms = sorted(r["ms"] for r in per_image)
    print(f"\nimages: {len(files)}   ours per image: median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms")
    print(f"mogrify wall: {t_im:.2f} s")
    print(f"ours wall:    {t_ours:.2f} s  (jobs={args.jobs}, fresh interpreter included)")
    print(f"speed-up:     {t_im / t_ours:.2f}x")
    print(f"identical:    {len(files) - len(mismatches)}/{len(files)}")
    for name in mismatches:
        print(f"MISMATCH {name}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
