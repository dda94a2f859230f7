"""Benchmark: the pipeline's own cost per film (issue 15): light work against a plain loop, and the ceiling.

In:  the 250 real radiographs in $CXRAGE_SHARED/data/cxr-sample/images, turned once into their 512 px seed-chain
     PNGs by `cxrage preprocess` (as `benchmarks/pipeline.py --memory-input small` does), repeated through CSV
     manifests (unique `image_id` per row); random weights in the published format (`cxrage weights demo`).
Out: a table on stdout (and `--json PATH`):
     - light work: `cxrage score --preprocess none --tta none --rotation off --device cpu --batch-size 32` on
       `--films` rows against a plain single-process loop doing read -> decode (fastai's open_image) ->
       `AgePredictor` (fp32, batch 32, torch on every core), both in fresh subprocesses timed from spawn to
       exit (start-up included), run alternately `--repeats` times; ours / loop per pair and over all pairs;
     - ceiling: the real `cxrage score` pipeline (embedded Ray Data, the real CPU tasks' fetch, the predictor
       actor's batch handling, the Parquet writer) with prepare reduced to reading bytes and the model to a
       constant (`cxrage_ray.pipeline.stand_in.CeilingStandIn`, put into the plan by this script only: the CLI
       cannot select it) on `--ceiling-films` rows, pinned with `taskset` to each of `--cores` cores
       (default 1, then 2); films/s once the first film is out (steady state) and from spawn (start-up included), and the
       process tree's and the driver's CPU seconds per film (start-up included; `--rows-per-task` overrides
       cxrage's rows per CPU task for these runs).

    python benchmarks/pipeline_ceiling.py                         # 1000 films light x1, ceiling 4000 films on 1 and 2 cores
    python benchmarks/pipeline_ceiling.py --films 200 --repeats 2 # quicker light-work pairs
    python benchmarks/pipeline_ceiling.py --films 250 1000 3000 --skip-ceiling  # fixed cost and cost per film
    python benchmarks/pipeline_ceiling.py --skip-light            # the ceiling only

A shared machine is noisy: both sides of a pair run back to back, so a pair's ratio is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the heavy benchmark's helpers (run as a script)
import pipeline as heavy  # noqa: E402  (benchmarks/pipeline.py)

LIGHT_ARGS = ["--preprocess", "none", "--tta", "none", "--rotation", "off", "--device", "cpu"]


# ------------------------------------------------------------------------------------------- workers


def light_loop_worker(manifest: str, weights: str, batch_size: int) -> None:
    """The light-work baseline in a fresh process: read -> decode -> model on batches; JSON on stdout."""
    t0 = time.perf_counter()
    import csv

    from cxrage_ray.model.checkpoint import load_state_dict
    from cxrage_ray.errors import CxrAgeError
    from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
    from cxrage_ray.config import PrepareSettings
    from cxrage_ray.pipeline.prepare import picture_from_bytes
    from cxrage_ray.config import StorageConfig
    from cxrage_ray.storage.files import read_bytes

    predictor = AgePredictor(load_state_dict(weights), PredictorConfig(device="cpu", tta="none",
                                                                       batch_size=batch_size))
    settings = PrepareSettings(storage=StorageConfig(), preprocess="none")
    t_load = time.perf_counter()
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids, ages, pending = [], [], []
    stage_s = {"read_decode": 0.0, "predict": 0.0}

    def flush() -> None:
        t = time.perf_counter()
        ages.extend(float(a) for a in predictor.predict([p for _, p in pending]).cxr_age)
        stage_s["predict"] += time.perf_counter() - t
        ids.extend(i for i, _ in pending)
        pending.clear()

    errors = 0
    for row in rows:
        t = time.perf_counter()
        try:
            picture, _ = picture_from_bytes(read_bytes(row["uri"], settings.storage), row["uri"], settings)
        except CxrAgeError:
            errors += 1
            continue
        finally:
            stage_s["read_decode"] += time.perf_counter() - t
        pending.append((row["image_id"], picture))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    t_end = time.perf_counter()
    print(json.dumps({"ok": len(ids), "errors": errors, "load_s": t_load - t0, "run_s": t_end - t_load,
                      "stage_s": stage_s, "scores": dict(zip(ids, ages))}))


def ceiling_worker(manifest: str, out: str, weights: str, batch_size: int, rows_per_task: int | None,
                   num_cpus: int | None = None) -> None:
    """`pipeline.score` as `cxrage score --preprocess none --tta none --rotation off --device cpu` builds it, with
    `CeilingStandIn`; the summary JSON on stdout."""
    from cxrage_ray.config import RayConfig, ScoreConfig
    from cxrage_ray.config import OrientConfig
    from cxrage_ray.pipeline.itinerary import finish_job, open_job, run_job
    from cxrage_ray.pipeline.stand_in import with_stand_in
    from cxrage_ray.predict.predictor import PredictorConfig

    cfg = ScoreConfig(input=manifest, output=out, weights=weights, weights_name="demo", preprocess="none",
                      predictor=PredictorConfig(device="cpu", tta="none", batch_size=batch_size),
                      orient=OrientConfig(mode="off"), progress=False, gpu_preprocess="off",
                      ray=RayConfig(num_cpus=num_cpus, **({"rows_per_task": rows_per_task} if rows_per_task else {})))
    job = open_job(cfg, Path(out) / "_weights")
    summary = finish_job(job, run_job(job, Path(out) / "_weights", plan_hook=with_stand_in))
    print(json.dumps(summary, default=str))


# ------------------------------------------------------------------------------------------- sides


def this_script(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def light_pair(manifest: Path, weights: Path, work: Path, args: argparse.Namespace, k: int) -> dict:
    """One loop run and one `cxrage score` run back to back (order alternates with `k`, `--ours-first` flips it);
    their figures."""
    sides: dict[str, dict] = {}
    for side in (["loop", "ours"] if (k + args.ours_first) % 2 == 0 else ["ours", "loop"]):
        if side == "loop":
            run = heavy.run_measured(f"light loop #{k + 1}", this_script(
                "--light-loop-worker", str(manifest), str(weights), "--batch-size", str(args.batch_size)),
                args.interval, heavy.child_env())
            heavy.check(run)
            extra = json.loads(run.stdout.strip().splitlines()[-1])
            sides["loop"] = {"wall_s": run.wall_s, "ok": extra["ok"], "scores": extra.pop("scores"),
                             "load_s": extra["load_s"], "stage_s": extra["stage_s"]}
        else:
            out = fresh(work / f"out-light-{k}")
            run = heavy.run_measured(f"cxrage score #{k + 1}", heavy.cxrage(
                "score", str(manifest), str(out), "--weights", str(weights), "--no-progress", *LIGHT_ARGS,
                "--batch-size", str(args.batch_size), *shlex.split(args.score_args)), args.interval, heavy.child_env())
            heavy.check(run)
            summary = json.loads((out / "_cxrage" / "summary.json").read_text())
            sides["ours"] = {"wall_s": run.wall_s, "ok": summary["rows_ok"], "scores": heavy.our_scores(out),
                             "startup": summary["startup"], "command": shlex.join(run.command)}
    loop, ours = sides["loop"], sides["ours"]
    common = loop["scores"].keys() & ours["scores"].keys()
    return {
        "loop_wall_s": round(loop["wall_s"], 2), "ours_wall_s": round(ours["wall_s"], 2),
        "loop_films_per_s": round(loop["ok"] / loop["wall_s"], 3), "ours_films_per_s": round(ours["ok"] / ours["wall_s"], 3),
        "ratio": round((ours["ok"] / ours["wall_s"]) / (loop["ok"] / loop["wall_s"]), 3),
        "loop_ms_per_film": {k: round(1000 * v / max(1, loop["ok"]), 1) for k, v in loop["stage_s"].items()},
        "loop_load_s": round(loop["load_s"], 2), "ours_startup": ours["startup"],
        "max_abs_cxr_age_diff": max((abs(loop["scores"][i] - ours["scores"][i]) for i in common), default=float("nan")),
        "rows_compared": len(common), "command": ours["command"],
    }


def fresh(folder: Path) -> Path:
    """An output folder with nothing in it: a kept one (`--keep`) would resume, i.e. score nothing."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return folder


def light(args: argparse.Namespace, pngs: list[Path], weights: Path, work: Path, films: int) -> dict:
    manifest = heavy.write_manifest(work / f"manifest-light-{films}.csv", pngs, films)
    print(f"light work: {films} films, {args.repeats} pair(s)", flush=True)
    pairs = [light_pair(manifest, weights, work, args, k) for k in range(args.repeats)]
    total = sum(p["ours_wall_s"] for p in pairs), sum(p["loop_wall_s"] for p in pairs)
    return {"films": films, "batch_size": args.batch_size, "pairs": pairs,
            "ratio_all_pairs": round(total[1] / total[0], 3)}


def wall_lines(runs: list[dict]) -> dict:
    """Least-squares wall = fixed + per_film * films for each side over every pair of every film count; the
    film count from which ours/loop stays >= 0.9, and the ratio as films grow (loop per film / ours per film)."""
    import numpy as np

    films = np.array([run["films"] for run in runs for _ in run["pairs"]], dtype=float)
    fit = {}
    for side in ("loop", "ours"):
        walls = np.array([p[f"{side}_wall_s"] for run in runs for p in run["pairs"]])
        per_film, fixed = np.polyfit(films, walls, 1)
        fit[side] = {"fixed_s": round(float(fixed), 2), "per_film_ms": round(1000 * float(per_film), 2)}
    (a_loop, b_loop), (a_ours, b_ours) = ((fit[s]["fixed_s"], fit[s]["per_film_ms"] / 1000) for s in ("loop", "ours"))
    # (a_loop + b_loop n) / (a_ours + b_ours n) >= 0.9  <=>  n >= (0.9 a_ours - a_loop) / (b_loop - 0.9 b_ours)
    reach = (0.9 * a_ours - a_loop) / (b_loop - 0.9 * b_ours) if b_loop > 0.9 * b_ours else None
    return {**fit, "ratio_as_films_grow": round(b_loop / b_ours, 3),
            "films_for_0_9": None if reach is None else max(0, int(np.ceil(reach)))}


def pinned(cores: int, command: list[str]) -> list[str]:
    """`command` pinned, with every process it starts (the whole Ray tree), to the first `cores` CPUs."""
    allowed = sorted(os.sched_getaffinity(0))[:cores]
    return ["taskset", "-c", ",".join(map(str, allowed)), *command]


def ceiling(args: argparse.Namespace, pngs: list[Path], weights: Path, work: Path) -> dict:
    manifest = heavy.write_manifest(work / f"manifest-ceiling-{args.ceiling_films}.csv", pngs, args.ceiling_films)
    print(f"ceiling: {args.ceiling_films} films (bytes only, constant model), cores {args.cores}", flush=True)
    runs = []
    for cores in args.cores:
        out = fresh(work / f"out-ceiling-{cores}")
        command = this_script("--ceiling-worker", str(manifest), str(out), str(weights),
                              "--batch-size", str(args.batch_size),
                              *(["--rows-per-task", str(args.rows_per_task)] if args.rows_per_task else []),
                              *(["--num-cpus", str(args.num_cpus)] if args.num_cpus else []))
        run = heavy.run_measured(f"ceiling on {cores} core(s)", pinned(cores, command), args.interval,
                                 heavy.child_env())
        heavy.check(run)
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        first, elapsed, ok = summary["startup"]["first_film_s"], summary["elapsed_s"], summary["rows_ok"]
        runs.append({"cores": cores, "ok": ok, "wall_s": round(run.wall_s, 2), "first_film_s": first,
                     "films_per_s_steady": round(ok / max(1e-9, elapsed - first), 1),
                     "films_per_s_wall": round(ok / run.wall_s, 1), "startup": summary["startup"],
                     # CPU of the whole tree (start-up included) and of the driver alone, per film
                     "cpu_ms_per_film": round(1000 * run.cpu_s / max(1, ok), 2),
                     "driver_cpu_ms_per_film": round(1000 * run.cpu_s_driver / max(1, ok), 2)})
    return {"films": args.ceiling_films, "runs": runs}


# ------------------------------------------------------------------------------------------- main


def report(results: dict) -> None:
    print()
    for lw in results.get("light_runs", []):
        print(f"light work ({lw['films']} films, --preprocess none --tta none --rotation off, batch "
              f"{lw['batch_size']}; wall clock from spawn, start-up included)")
        for k, p in enumerate(lw["pairs"]):
            print(f"  pair {k + 1}: loop {p['loop_films_per_s']:.2f} films/s ({p['loop_wall_s']:.1f} s)  ours "
                  f"{p['ours_films_per_s']:.2f} films/s ({p['ours_wall_s']:.1f} s)  ours/loop = {p['ratio']:.3f}  "
                  f"max |d cxr_age| {p['max_abs_cxr_age_diff']:.1e} over {p['rows_compared']}")
            print(f"          loop ms/film {p['loop_ms_per_film']}, model load {p['loop_load_s']} s; "
                  f"ours start-up {p['ours_startup']}")
        print(f"  ours/loop over all pairs = {lw['ratio_all_pairs']:.3f} (target >= 0.9)")
    if "light_lines" in results:
        line = results["light_lines"]
        print(f"wall = fixed + per film x films, fitted over {len(results['light_runs'])} film counts: "
              f"loop {line['loop']['fixed_s']} s + {line['loop']['per_film_ms']} ms/film, "
              f"ours {line['ours']['fixed_s']} s + {line['ours']['per_film_ms']} ms/film")
        reach = line["films_for_0_9"]
        print(f"  as films grow ours/loop -> {line['ratio_as_films_grow']:.3f}; "
              + (f"ours/loop >= 0.9 from ~{reach} films" if reach is not None else "never >= 0.9 at these paces"))
    if "ceiling" in results:
        c = results["ceiling"]
        print(f"ceiling ({c['films']} films: real pipeline, prepare = read bytes, model = constant)")
        for r in c["runs"]:
            print(f"  {r['cores']} core(s): {r['films_per_s_steady']:8.1f} films/s after the first film "
                  f"({r['films_per_s_wall']:.1f} from spawn, {r['wall_s']:.1f} s, first film at {r['first_film_s']} s); "
                  f"CPU per film (start-up included): tree {r['cpu_ms_per_film']} ms, driver {r['driver_cpu_ms_per_film']} ms")
        if len(c["runs"]) > 1:
            lo, hi = c["runs"][0], c["runs"][-1]
            print(f"  scaling {lo['cores']} -> {hi['cores']} cores: "
                  f"x{hi['films_per_s_steady'] / max(1e-9, lo['films_per_s_steady']):.2f}")
    if "light" in results and "ceiling" in results:
        print(f"  next to it: light-work ours/loop = {results['light']['ratio_all_pairs']:.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, nargs="+", default=[1000],
                        help="light-work films (the issue's 1,000); with several counts, wall = fixed + per film "
                             "x films is fitted for each side")
    parser.add_argument("--repeats", type=int, default=1, help="light-work pairs (loop and ours back to back)")
    parser.add_argument("--ours-first", action="store_true", help="the first pair runs cxrage score first")
    parser.add_argument("--ceiling-films", type=int, default=4000, help="ceiling films (more than light: it is fast)")
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="cores the ceiling runs are pinned to")
    parser.add_argument("--batch-size", type=int, default=32, help="model views per forward pass")
    parser.add_argument("--rows-per-task", type=int, help="ceiling: manifest rows per CPU task (default: cxrage's)")
    parser.add_argument("--num-cpus", type=int,
                        help="ceiling: logical CPUs of the embedded Ray (e.g. 16: Ray schedules 16-wide on these cores, "
                        "to see the driver's cost per row at a wider cluster's batch rate)")
    parser.add_argument("--score-args", default="", help="extra arguments for the light `cxrage score` (one string)")
    parser.add_argument("--interval", type=float, default=0.5, help="process-tree sampling period (s)")
    parser.add_argument("--skip-light", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    parser.add_argument("--light-loop-worker", nargs=2, metavar=("MANIFEST", "WEIGHTS"), help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-worker", nargs=3, metavar=("MANIFEST", "OUT", "WEIGHTS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.light_loop_worker:
        light_loop_worker(*args.light_loop_worker, args.batch_size)
        return 0
    if args.ceiling_worker:
        ceiling_worker(*args.ceiling_worker, args.batch_size, args.rows_per_task, args.num_cpus)
        return 0
    folder = heavy.images_dir()
    heavy.list_images(folder)  # fails early with a clear message when the films are missing
    with tempfile.TemporaryDirectory(prefix="cxrage-ceiling-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights = work / "demo.pth"
        heavy.check(heavy.run_measured("cxrage weights demo", heavy.cxrage("weights", "demo", str(weights)), 1.0,
                                       heavy.child_env()))
        pngs = heavy.list_images(work / "seed-chain-pngs") if (work / "seed-chain-pngs").is_dir() \
            else heavy.small_pngs(folder, work)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
        results: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
        if not args.skip_light:
            results["light_runs"] = []
            for films in args.films:
                results["light_runs"].append(light(args, pngs, weights, work, films))
                heavy.save(results, args.json)
            results["light"] = results["light_runs"][0]  # the first count's (the issue's 1,000 by default)
            if len(args.films) > 1:
                results["light_lines"] = wall_lines(results["light_runs"])
        if not args.skip_ceiling:
            results["ceiling"] = ceiling(args, pngs, weights, work)
        results["load_average_end"] = os.getloadavg()
        heavy.save(results, args.json)
    report(results)
    print(f"load average {results['load_average_start'][0]:.2f} at start, {results['load_average_end'][0]:.2f} at end "
          "(a shared machine: expect noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
