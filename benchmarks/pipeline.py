"""Benchmark: `cxrage score` (embedded local Ray) against a plain single-process loop, and streaming memory.

In:  the 250 real radiographs in $CXRAGE_SHARED/data/cxr-sample/images (default: ../shared next to the repo),
     repeated through a CSV manifest (unique `image_id` per row) written to a temporary directory, and random
     weights in the published format (`cxrage weights demo`; speed only, the ages mean nothing).
Out: a table on stdout (and `--json PATH`):
     - throughput: wall-clock images/s of the loop and of `cxrage score` on the same `--rows` manifest, process
       start-up, imports, model load and (ours) Ray start-up included, and ours / loop (issue 4 target >= 0.9);
       max |cxr_age ours - loop| over the rows as a check that both did the same work;
     - memory: peak RSS of `cxrage score`'s whole process tree (driver, raylet, GCS, Ray workers, ...; summed,
       sampled every `--interval` s with psutil) and of the driver alone, at each of `--memory-rows`, and
       peak(largest) / peak(smallest) (target <= 1.2: nothing accumulates on the driver).

The loop (`--loop-worker`, run as a fresh `python` subprocess) does per row what the pipeline's CPU stage does:
read bytes (`storage.read_bytes`), `decode_image`, `seed_chain`, `orient` with the default `OrientConfig()`
(a film the orientation step corrects is turned before the chain and the chain rerun, as the pipeline does),
then `AgePredictor.predict` on batches of the pipeline's size (the films whose views fill whole passes of
`--batch-size` views, `plan.films_per_batch`), `PredictorConfig(device="cpu")` so torch runs on every core.
torch's thread count is one process-wide setting: the loop sets it to 1 around the tiny orientation
classifier (on this busy 2-core machine it is ~40x slower on 2 threads than on 1) and back to all cores for the
age model, which makes the loop the faster, fairer baseline; `--loop-orient-threads 0` keeps all cores
throughout instead.

Memory runs use `--tta none` and, by default (`--memory-input small`), the 250 films' seed-chain PNGs made once
by `cxrage preprocess` and scored with `--preprocess none`: the same pixels reach the object store as with
`--preprocess seed` (512 px pictures), but each row costs far less CPU, so 10k rows fit in ~6 minutes here.
`--memory-input real` uses the original files and the seed chain instead.

    python benchmarks/pipeline.py                                   # 2000 rows, --tta seed, memory at 1k and 10k
    python benchmarks/pipeline.py --rows 200 --memory-rows 200 1000 # quick check
    python benchmarks/pipeline.py --skip-memory --tta none          # throughput only, centre view only

Run it on a quiet machine if you can: both sides compete with everything else for the same cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def images_dir() -> Path:
    root = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    return root / "data" / "cxr-sample" / "images"


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"no images in {folder} (set CXRAGE_SHARED)")
    return files


def write_manifest(path: Path, images: list[Path], rows: int) -> Path:
    """CSV manifest of `rows` rows cycling through `images`; image_id `<row>-<file name>` (unique)."""
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "uri"])
        for i in range(rows):
            image = images[i % len(images)]
            writer.writerow([f"{i:06d}-{image.name}", str(image.resolve())])
    return path


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    """One subprocess run: wall time from spawn to exit, peak memory of its process tree."""

    label: str
    command: list[str]
    returncode: int
    wall_s: float
    peak_tree_rss: int = 0
    peak_driver_rss: int = 0
    peak_processes: int = 0
    peak_tree_pss: int = 0
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)
    per_process: list = field(default_factory=list)
    per_process_pss: list = field(default_factory=list)  # (name, peak PSS MiB, USS MiB at that peak)
    cpu_s: float = 0.0  # CPU seconds (user + system) of the whole tree, as last sampled per process
    cpu_s_driver: float = 0.0


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every `interval` s (psutil).

    Ray's processes (GCS, raylet, workers) are descendants of the driver that ran `ray.init()`, so the tree
    covers the whole embedded cluster. Summed RSS counts shared pages (the object store's /dev/shm, shared
    libraries, torch's code) once per process that touches them: an upper bound that also grows as each worker
    touches more of the object store's mapping. Summed PSS (proportional set size: each shared page split among
    the processes mapping it) counts every page once: the tree's real footprint. PSS reads /proc/PID/smaps_rollup,
    so it is sampled every `pss_every`-th time only.
    """

    def __init__(self, pid: int, interval: float, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.samples = 0
        self.stop_event = threading.Event()
        self.peak_tree = self.peak_driver = self.peak_processes = self.peak_tree_pss = 0
        self.per_process_pss: dict[int, tuple[str, int, int]] = {}  # pid -> (name, peak PSS, USS at that peak)
        self.per_process: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS): where the memory sits
        self.cpu_s: dict[int, float] = {}  # pid -> CPU seconds at its last sample (a lower bound for each)

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = total_pss = 0
        with_pss = self.samples % self.pss_every == 0
        self.samples += 1
        for proc in procs:
            try:
                rss = proc.memory_info().rss
                full = proc.memory_full_info() if with_pss else None
                times = proc.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            self.cpu_s[proc.pid] = times.user + times.system
            total += rss
            if full is not None:
                total_pss += full.pss
                if full.pss >= self.per_process_pss.get(proc.pid, ("", -1, 0))[1]:
                    self.per_process_pss[proc.pid] = (process_name(proc), full.pss, full.uss)
            # the name is read again each time: a Ray worker retitles itself (ray::IDLE -> ray::MapWorker(...))
            if rss >= self.per_process.get(proc.pid, ("", -1))[1]:
                self.per_process[proc.pid] = (process_name(proc), rss)
            if proc.pid == self.root.pid:
                self.peak_driver = max(self.peak_driver, rss)
        self.peak_tree = max(self.peak_tree, total)
        self.peak_tree_pss = max(self.peak_tree_pss, total_pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def process_name(proc) -> str:
    """A short label: Ray sets worker titles (`ray::IDLE`, `ray::MapWorker(...)`); others by executable."""
    import psutil

    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return proc.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0][:60]
    if "python" in Path(cmd[0]).name and len(cmd) > 1:  # a Python program: name the script or module
        return Path(cmd[2] if cmd[1] == "-m" and len(cmd) > 2 else cmd[1]).name[:60]
    return Path(cmd[0]).name


def run_measured(label: str, command: list[str], interval: float, env: dict[str, str]) -> Measured:
    """Run `command`, sampling its process tree; stdout/stderr are captured to temp files (no pipe stalls)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        returncode = proc.wait()
        wall = time.perf_counter() - start
        sampler.stop_event.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        # by keyword: peak_tree_pss sits between peak_processes and stdout, so positional stdout landed in it
        result = Measured(label, command, returncode, wall, sampler.peak_tree, sampler.peak_driver,
                          sampler.peak_processes, stdout=out.read(), stderr=err.read())
        result.per_process = sorted(((name, rss // 2**20) for name, rss in sampler.per_process.values()),
                                    key=lambda item: -item[1])
        result.peak_tree_pss = sampler.peak_tree_pss
        result.cpu_s = sum(sampler.cpu_s.values())
        result.cpu_s_driver = sampler.cpu_s.get(proc.pid, 0.0)
        result.per_process_pss = sorted(
            ((name, pss // 2**20, uss // 2**20) for name, pss, uss in sampler.per_process_pss.values()),
            key=lambda item: -item[1])
    print(f"  {label}: rc={returncode} {wall:.1f} s, peak tree RSS {mib(result.peak_tree_rss)}, "
          f"PSS {mib(result.peak_tree_pss)}, "
          f"driver {mib(result.peak_driver_rss)}, {result.peak_processes} processes", flush=True)
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def cxrage(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxrage_ray.cli", *args]


def check(result: Measured) -> None:
    # cxrage score exits 3 when the job finished with some error rows; anything else is a failed run
    if result.returncode not in (0, 3):
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"{result.label} failed with exit status {result.returncode}")


# ------------------------------------------------------------------------------------------- the loop


def loop_worker(manifest: str, weights: str, tta: str, batch_size: int, orient_threads: int, scores: str) -> None:
    """The baseline, run in a fresh process: one row after another, the model on batches; JSON on stdout."""
    t0 = time.perf_counter()
    import csv

    import numpy as np
    import torch

    from cxrage_ray.model.checkpoint import load_state_dict
    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.decode.image import decode_image
    from cxrage_ray.decode.types import DecodedImage
    from cxrage_ray.errors import CxrAgeError
    from cxrage_ray.config import OrientConfig
    from cxrage_ray.orient.classifier import default_classifier
    from cxrage_ray.orient.stage import correct_orientation, orient
    from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
    from cxrage_ray.preprocess.seed_chain import seed_chain
    from cxrage_ray.config import StorageConfig
    from cxrage_ray.storage.files import read_bytes

    t_import = time.perf_counter()
    predictor = AgePredictor(load_state_dict(weights), PredictorConfig(device="cpu", tta=tta, batch_size=batch_size))
    model_threads = torch.get_num_threads()
    default_classifier()
    t_load = time.perf_counter()

    storage, options, config = StorageConfig(), DecodeOptions(), OrientConfig()
    from cxrage_ray.config import views_per_film
    from cxrage_ray.pipeline.plan import films_per_batch

    per_batch = films_per_batch(batch_size, views_per_film(tta))  # images per batch, as the pipeline's actor gets
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ok = errors = 0
    out_ids: list[str] = []
    out_ages: list[float] = []
    pending: list[tuple[str, np.ndarray]] = []
    stage_s = dict.fromkeys(["read", "decode", "seed_chain", "orient", "predict"], 0.0)

    def flush() -> None:
        if pending:
            t = time.perf_counter()
            ages = predictor.predict([p for _, p in pending]).cxr_age
            stage_s["predict"] += time.perf_counter() - t
            out_ids.extend(i for i, _ in pending)
            out_ages.extend(float(a) for a in ages)
            pending.clear()

    for row in rows:
        try:
            t = time.perf_counter()
            data = read_bytes(row["uri"], storage)
            t1 = time.perf_counter()
            decoded = decode_image(data, row["uri"], options)
            t2 = time.perf_counter()
            picture = seed_chain(decoded)
            t3 = time.perf_counter()
            if orient_threads:
                torch.set_num_threads(orient_threads)
            result = orient(picture, image_id=row["image_id"], uri=row["uri"], meta=decoded.meta,
                            chronological_age=None, config=config)
            t4 = time.perf_counter()
            for name, seconds in zip(["read", "decode", "seed_chain", "orient"], [t1 - t, t2 - t1, t3 - t2, t4 - t3]):
                stage_s[name] += seconds
            picture = result.image
            if result.corrects:  # as the pipeline: turn the decoded film, rerun the chain
                picture = seed_chain(DecodedImage(
                    pixels=correct_orientation(decoded.pixels, result.applied, result.mirrored),
                    alpha=None if decoded.alpha is None else correct_orientation(decoded.alpha, result.applied,
                                                                                 result.mirrored),
                    meta=decoded.meta))
        except CxrAgeError:
            errors += 1
            continue
        finally:
            torch.set_num_threads(model_threads)
        pending.append((row["image_id"], picture if picture.ndim == 3 else picture[:, :, None]))
        ok += 1
        if len(pending) == per_batch:
            flush()
    flush()
    t_end = time.perf_counter()
    with open(scores, "w") as handle:
        json.dump(dict(zip(out_ids, out_ages)), handle)
    print(json.dumps({"rows": len(rows), "ok": ok, "errors": errors, "import_s": t_import - t0,
                      "load_s": t_load - t_import, "run_s": t_end - t_load, "torch_threads": model_threads,
                      "stage_s": stage_s}))


# ------------------------------------------------------------------------------------------- sides


def run_loop(manifest: Path, weights: Path, args: argparse.Namespace, work: Path) -> Measured:
    scores = work / "loop-scores.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--loop-worker", str(manifest), str(weights),
               "--tta", args.tta, "--batch-size", str(args.batch_size),
               "--loop-orient-threads", str(args.loop_orient_threads), "--loop-scores", str(scores)]
    result = run_measured("loop", command, args.interval, child_env())
    check(result)
    result.extra = json.loads(result.stdout.strip().splitlines()[-1])
    result.extra["scores"] = json.loads(scores.read_text())
    return result


def run_ours(label: str, manifest: Path, weights: Path, out: Path, score_args: list[str],
             args: argparse.Namespace) -> Measured:
    command = cxrage("score", str(manifest), str(out), "--weights", str(weights), "--no-progress", *score_args,
                     *shlex.split(args.score_args))
    result = run_measured(label, command, args.interval, child_env())
    check(result)
    result.extra = json.loads((out / "_cxrage" / "summary.json").read_text())
    return result


def our_scores(out: Path) -> dict[str, float]:
    from cxrage_ray.write.parts import read_output
    from cxrage_ray.config import StorageConfig

    table = read_output(str(out), StorageConfig()).select(["image_id", "status", "cxr_age"]).to_pandas()
    table = table[table["status"] == "ok"]
    return dict(zip(table["image_id"], table["cxr_age"].astype(float)))


def throughput(args: argparse.Namespace, images: list[Path], weights: Path, work: Path) -> dict:
    manifest = write_manifest(work / f"manifest-{args.rows}.csv", images, args.rows)
    print(f"throughput: {args.rows} rows over {len(images)} films, --tta {args.tta}, --batch-size {args.batch_size}",
          flush=True)
    sides = {}
    order = ["loop", "ours"] if not args.ours_first else ["ours", "loop"]
    for side in order:
        if side == "loop":
            sides["loop"] = run_loop(manifest, weights, args, work)
        else:
            sides["ours"] = run_ours("cxrage score", manifest, weights, work / "out-throughput",
                                     ["--tta", args.tta, "--batch-size", str(args.batch_size)], args)
    loop, ours = sides["loop"], sides["ours"]
    loop_rate = loop.extra["ok"] / loop.wall_s
    ours_rate = ours.extra["rows_ok"] / ours.wall_s
    theirs, mine = loop.extra.pop("scores"), our_scores(work / "out-throughput")
    common = theirs.keys() & mine.keys()
    max_diff = max((abs(theirs[k] - mine[k]) for k in common), default=float("nan"))
    return {
        "rows": args.rows, "tta": args.tta, "batch_size": args.batch_size,
        "loop": {"ok": loop.extra["ok"], "errors": loop.extra["errors"], "wall_s": round(loop.wall_s, 2),
                 "images_per_s": round(loop_rate, 3), "import_s": round(loop.extra["import_s"], 2),
                 "load_s": round(loop.extra["load_s"], 2), "run_s": round(loop.extra["run_s"], 2),
                 "stage_ms_per_image": {k: round(1000 * v / max(1, loop.extra["ok"]), 1)
                                        for k, v in loop.extra["stage_s"].items()},
                 "peak_tree_rss_mib": round(loop.peak_tree_rss / 2**20)},
        "ours": {"ok": ours.extra["rows_ok"], "errors": ours.extra["rows_error"], "wall_s": round(ours.wall_s, 2),
                 "images_per_s": round(ours_rate, 3), "internal_elapsed_s": ours.extra["elapsed_s"],
                 "peak_tree_rss_mib": round(ours.peak_tree_rss / 2**20),
                 "peak_driver_rss_mib": round(ours.peak_driver_rss / 2**20), "command": shlex.join(ours.command)},
        "ratio": round(ours_rate / loop_rate, 3),
        "rows_compared": len(common),
        "max_abs_cxr_age_diff": max_diff,
    }


def small_pngs(images_folder: Path, work: Path) -> list[Path]:
    """The films' seed-chain PNGs, made once with `cxrage preprocess` (for `--preprocess none` memory runs)."""
    dest = work / "seed-chain-pngs"
    result = run_measured("cxrage preprocess (memory inputs)",
                          cxrage("preprocess", str(images_folder), str(dest), "--workers", "2"), 1.0, child_env())
    check(result)
    return list_images(dest)


def memory(args: argparse.Namespace, images_folder: Path, weights: Path, work: Path) -> dict:
    if args.memory_input == "small":
        inputs, mode = small_pngs(images_folder, work), ["--preprocess", "none"]
    else:
        inputs, mode = list_images(images_folder), ["--preprocess", "seed"]
    print(f"memory: --tta none {' '.join(mode)}, {len(inputs)} distinct files, rows {args.memory_rows}", flush=True)
    runs = []
    for rows in args.memory_rows:
        manifest = write_manifest(work / f"manifest-mem-{rows}.csv", inputs, rows)
        result = run_ours(f"cxrage score {rows} rows", manifest, weights, work / f"out-mem-{rows}",
                          ["--tta", "none", "--batch-size", str(args.batch_size), *mode], args)
        runs.append({"rows": rows, "ok": result.extra["rows_ok"], "errors": result.extra["rows_error"],
                     "wall_s": round(result.wall_s, 2), "images_per_s": round(result.extra["rows_ok"] / result.wall_s, 3),
                     "peak_tree_rss_mib": round(result.peak_tree_rss / 2**20),
                     "peak_tree_pss_mib": round(result.peak_tree_pss / 2**20),
                     "peak_driver_rss_mib": round(result.peak_driver_rss / 2**20),
                     "peak_processes": result.peak_processes, "command": shlex.join(result.command),
                     "per_process_peak_mib": result.per_process[:8],
                     "per_process_peak_pss_uss_mib": result.per_process_pss[:8]})
    small, large = min(runs, key=lambda r: r["rows"]), max(runs, key=lambda r: r["rows"])
    return {
        "input": args.memory_input, "runs": runs,
        "tree_ratio": round(large["peak_tree_rss_mib"] / small["peak_tree_rss_mib"], 3),
        "tree_pss_ratio": round(large["peak_tree_pss_mib"] / small["peak_tree_pss_mib"], 3),
        "driver_ratio": round(large["peak_driver_rss_mib"] / small["peak_driver_rss_mib"], 3),
    }


# ------------------------------------------------------------------------------------------- main


def report(results: dict) -> None:
    print()
    for r in results.get("release", []):
        print(f"release ({r['kind']}, {r['films']} films, best of {r['repeats']}): this {r['this_films_per_s']:.2f} "
              f"films/s, other {r['other_films_per_s']:.2f}, ratio {r['ratio']:.3f}, max |Δ cxr_age| "
              f"{r['max_abs_cxr_age_diff']:.3g} years")
    if "throughput" in results:
        t = results["throughput"]
        print(f"throughput ({t['rows']} rows, --tta {t['tta']}, batch {t['batch_size']} views; wall clock incl. start-up)")
        for side in ("loop", "ours"):
            s = t[side]
            print(f"  {side:5s} {s['images_per_s']:8.2f} img/s  {s['wall_s']:8.1f} s  ok {s['ok']}  errors {s['errors']}"
                  f"  peak tree RSS {s['peak_tree_rss_mib']} MiB")
        stages = ", ".join(f"{k} {v}" for k, v in t["loop"]["stage_ms_per_image"].items())
        print(f"  loop: imports {t['loop']['import_s']} s, model load {t['loop']['load_s']} s; ms per image: {stages}")
        verdict = "meets" if t["ratio"] >= 0.9 else "misses"
        print(f"  ours / loop = {t['ratio']:.3f}  ({verdict} the >= 0.9 target); "
              f"max |cxr_age ours - loop| = {t['max_abs_cxr_age_diff']:.2e} over {t['rows_compared']} rows")
    if "memory" in results:
        m = results["memory"]
        print(f"memory (cxrage score --tta none, input {m['input']}; summed RSS of the process tree)")
        for r in m["runs"]:
            print(f"  {r['rows']:6d} rows  tree {r['peak_tree_rss_mib']:6d} MiB  driver {r['peak_driver_rss_mib']:5d} MiB"
                  f"  {r['peak_processes']} processes  {r['images_per_s']:.1f} img/s  {r['wall_s']:.0f} s")
            print(f"          tree PSS {r['peak_tree_pss_mib']} MiB; largest processes (peak RSS MiB): "
                  + ", ".join(f"{name} {mb}" for name, mb in r["per_process_peak_mib"][:6]))
            print("          largest processes (peak PSS / private USS MiB): "
                  + ", ".join(f"{name} {pss}/{uss}" for name, pss, uss in r["per_process_peak_pss_uss_mib"][:6]))
        for key, what in (("tree_pss_ratio", "PSS (real footprint)"), ("tree_ratio", "RSS (upper bound)")):
            verdict = "meets" if m[key] <= 1.2 else "misses"
            print(f"  peak tree {what} ratio largest/smallest = {m[key]:.3f} ({verdict} the <= 1.2 target)")
        print(f"  driver RSS ratio = {m['driver_ratio']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="manifest rows for the throughput comparison")
    parser.add_argument("--tta", choices=["seed", "none"], default="seed", help="TTA for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=64, help="model views per forward pass (cxrage's default)")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--memory-input", choices=["small", "real"], default="small",
                        help="small: seed-chain PNGs + --preprocess none; real: the original files + the seed chain")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period (s)")
    parser.add_argument("--loop-orient-threads", type=int, default=1,
                        help="torch threads for the loop's orientation classifier (0: keep all cores)")
    parser.add_argument("--score-args", default="", help="extra arguments for `cxrage score` (one string)")
    parser.add_argument("--ours-first", action="store_true", help="run cxrage score before the loop")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--pythonpath", type=Path,
                        help="also compare `cxrage score` of this tree against this source tree (the previous "
                             "release: git worktree add /tmp/prev <commit>), heavy and light work, alternating, "
                             "best of --release-repeats (benchmarks/release_compare.py)")
    parser.add_argument("--release-films", type=int, nargs=2, default=[100, 1000], metavar=("HEAVY", "LIGHT"))
    parser.add_argument("--release-repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    parser.add_argument("--loop-worker", nargs=2, metavar=("MANIFEST", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("--loop-scores", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop_worker:
        loop_worker(*args.loop_worker, args.tta, args.batch_size, args.loop_orient_threads, args.loop_scores)
        return 0
    if importlib.util.find_spec("psutil") is None:  # checked up front: the first measured run would fail late
        raise SystemExit("this benchmark needs psutil: pip install psutil")
    folder = images_dir()
    images = list_images(folder)
    with tempfile.TemporaryDirectory(prefix="cxrage-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights = work / "demo.pth"
        check(run_measured("cxrage weights demo", cxrage("weights", "demo", str(weights)), 1.0, child_env()))
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
        results: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
        if not args.skip_throughput:
            results["throughput"] = throughput(args, images, weights, work)
            save(results, args.json)  # each section as soon as it is measured: a long run may be cut short
        if args.pythonpath is not None:
            from release_compare import compare

            results["release"] = [compare(args.pythonpath, kind, films, args.release_repeats)
                                  for kind, films in zip(("heavy", "light"), args.release_films)]
            save(results, args.json)
        if not args.skip_memory:
            results["memory"] = memory(args, folder, weights, work)
        results["load_average_end"] = os.getloadavg()
        save(results, args.json)
    report(results)
    print(f"load average {results['load_average_start'][0]:.2f} at start, {results['load_average_end'][0]:.2f} at end "
          "(a shared machine: expect noise)")
    return 0


def save(results: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
