"""Start-up cost against manifest size: seconds to the first committed part, and the driver's peak RSS (issue 23).

In:  a work folder (default: a temporary one) where the script makes `PICTURES` small grey PNGs and, per size, a
     Parquet manifest of that many rows cycling through them (unique `image_id` per row, absolute `uri`s).
Out: one line per run on stdout, then a table:
     - start-up: `cxrage score MANIFEST OUT --weights demo --preprocess none --tta none --rotation off --device cpu`
       (pre-made pictures, CPU, demo weights: the pipeline's own cost dominates) is started, OUTPUT/parts polled
       every 50 ms, and the run killed (its whole process group) once the first part is committed; the driver's RSS
       is sampled with psutil meanwhile (peak reported);
     - resume (`--resume`): a 1M-row job 99% done: one real run commits its first part (so OUTPUT holds that
       release's own job.json), the rest of rows 0..989,999 are fabricated as parts with the project's own writer
       (`write_part`, 10k rows a part), then the same command is started again and timed until its first part
       that was not there before.

    python benchmarks/manifest_scale.py                                  # 10k, 100k, 1M
    python benchmarks/manifest_scale.py --sizes 10k,1M --resume          # and the 99%-done 1M resume
    python benchmarks/manifest_scale.py --sizes 10M --timeout 900
    python benchmarks/manifest_scale.py --pythonpath /tmp/prev           # another checkout's code, same venv

Sides run one after another, never at once; on a shared machine compare runs made back to back (`--repeat`).
A 10k run is a warm-up first (demo weights made, file cache warm) and is not reported.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Distinct pictures the manifest cycles through (pre-made: `--preprocess none` reads them as they are).
PICTURES = 32
PICTURE_SIZE = 256
#: Fraction of the resume job that is already done.
DONE_FRACTION = 0.99
RESUME_ROWS = 1_000_000


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def make_pictures(folder: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:PICTURE_SIZE, 0:PICTURE_SIZE]
    for i in range(PICTURES):
        path = folder / f"picture{i:02d}.png"
        if not path.exists():
            film = 120 + 60 * np.sin(x / (9 + i)) * np.cos(y / 23) + rng.normal(0, 5, x.shape)
            Image.fromarray(np.clip(film, 0, 255).astype(np.uint8)).save(path)
        paths.append(path.resolve())
    return paths


def make_manifest(path: Path, pictures: list[Path], rows: int) -> Path:
    """A Parquet manifest of `rows` rows (made once per size; 64k-row row groups, as `cxrage manifest` writes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    uris = np.array([str(p) for p in pictures], dtype=object)
    writer = None
    for start in range(0, rows, 1_000_000):
        ids = np.arange(start, min(rows, start + 1_000_000))
        table = pa.table({"image_id": pa.array([f"r{i:09d}" for i in ids]), "uri": pa.array(uris[ids % len(uris)])})
        writer = writer or pq.ParquetWriter(str(path) + ".tmp", table.schema, compression="zstd")
        writer.write_table(table, row_group_size=65_536)
    writer.close()
    os.replace(str(path) + ".tmp", path)
    return path


def parts(out: Path) -> set[str]:
    folder = out / "parts"
    return {p.name for p in folder.glob("*.parquet")} if folder.is_dir() else set()


def first_part(manifest: Path, out: Path, home: Path, pythonpath: str | None, timeout: float,
               before: set[str] | None = None) -> tuple[float, float, str]:
    """(seconds to the first new committed part or nan, peak driver RSS in MiB, note) of one killed run."""
    import psutil

    env = {**os.environ, "CXRAGE_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": ""}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "cxrage_ray.cli", "score", str(manifest), str(out), "--weights", "demo",
           "--preprocess", "none", "--tta", "none", "--rotation", "off", "--device", "cpu", "--no-progress"]
    before = before or set()
    started = time.monotonic()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=pythonpath or REPO,
                            start_new_session=True)
    driver = psutil.Process(proc.pid)
    peak, seconds, note = 0, float("nan"), ""
    try:
        while time.monotonic() - started < timeout:
            try:
                peak = max(peak, driver.memory_info().rss)
            except psutil.Error:
                pass
            if parts(out) - before:
                seconds = time.monotonic() - started
                break
            if proc.poll() is not None:
                note = f"exited {proc.returncode} before a part"
                break
            time.sleep(0.05)
        else:
            note = f"no part within {timeout:.0f} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(60)
        log.close()
    return seconds, peak / 2**20, note


def fabricate_done(out: Path, manifest: Path, done_rows: int, pythonpath: str | None) -> int:
    """Commit rows [0, done_rows) OUTPUT lacks as parts written by the project's `write_part`; returns the rows."""
    code = f"""
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, glob
from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import output_schema
from cxrage_ray.write.parts import write_part
out, done_rows = {str(out)!r}, {done_rows}
have = set()
for p in glob.glob(out + "/parts/*.parquet"):
    have.update(pq.read_table(p, columns=["row_id"]).column("row_id").to_pylist())
keys = pq.read_table({str(manifest)!r}, columns=["image_id", "uri"]).slice(0, done_rows)
ids = np.array([i for i in range(done_rows) if i not in have], dtype=np.int64)
for start in range(0, len(ids), 10_000):
    chunk = ids[start:start + 10_000]
    write_part(out, f"part-fabricated-{{start // 10_000:05d}}.parquet", pa.table({{"row_id": chunk, "image_id": keys["image_id"].take(chunk), "uri": keys["uri"].take(chunk),
                         "status": pa.array(["ok"] * len(chunk)), "cxr_age": pa.array(np.full(len(chunk), 50.0))}}),
               output_schema(pa.schema([])), StorageConfig())
print(len(ids))
"""
    env = {**os.environ, **({"PYTHONPATH": str(REPO)})}  # the current tree's writer: the contract is the same
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10k,100k,1M", help="manifest rows, comma-separated (10k, 1M, 10M, ...)")
    parser.add_argument("--resume", action="store_true", help="also time the resume of a 99%%-done 1M-row job")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (best and all reported)")
    parser.add_argument("--pythonpath", help="run the cxrage_ray package found here instead of this checkout's")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take to its first part")
    parser.add_argument("--work", help="folder for pictures and manifests (kept between runs); default: temporary")
    args = parser.parse_args()
    side = args.pythonpath or "this checkout"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        pictures = make_pictures(work / "pictures")
        home = work / "home"
        runs = work / f"runs-{os.getpid()}"
        runs.mkdir()
        warm = make_manifest(work / "manifest-10000.parquet", pictures, 10_000)
        first_part(warm, runs / "warmup", home, args.pythonpath, args.timeout)
        table = []
        for size in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
            manifest = make_manifest(work / f"manifest-{size}.parquet", pictures, size)
            results = []
            for i in range(args.repeat):
                seconds, rss, note = first_part(manifest, runs / f"out-{size}-{i}", home, args.pythonpath,
                                                args.timeout)
                print(f"{side}: {size:>10,} rows  first part {seconds:7.1f} s  driver peak RSS {rss:7.0f} MiB "
                      f"{note}", flush=True)
                results.append((seconds, rss))
            table.append((f"{size:,} rows", results))
        if args.resume:
            manifest = make_manifest(work / f"manifest-{RESUME_ROWS}.parquet", pictures, RESUME_ROWS)
            results = []
            for i in range(args.repeat):
                out = runs / f"resume-{i}"
                first_part(manifest, out, home, args.pythonpath, args.timeout)  # job.json + a first part
                made = fabricate_done(out, manifest, int(RESUME_ROWS * DONE_FRACTION), args.pythonpath)
                seconds, rss, note = first_part(manifest, out, home, args.pythonpath, args.timeout,
                                                before=parts(out))
                print(f"{side}: resume of {RESUME_ROWS:,} rows, {DONE_FRACTION:.0%} done ({made:,} fabricated): "
                      f"first new part {seconds:7.1f} s  driver peak RSS {rss:7.0f} MiB {note}", flush=True)
                results.append((seconds, rss))
            table.append((f"resume 1M, 99% done", results))
        print(f"\n{side}\n| run | first part (s), best | driver peak RSS (MiB), best | all runs (s) |")
        print("| --- | ---: | ---: | --- |")
        for label, results in table:
            best = min(results, key=lambda r: (r[0] != r[0], r[0]))
            print(f"| {label} | {best[0]:.1f} | {min(r[1] for r in results):.0f} | "
                  f"{', '.join(f'{r[0]:.1f}' for r in results)} |")


if __name__ == "__main__":
    main()
