"""Benchmark: one two-thread scoring call against two one-thread calls at once, quiet and beside Ray-like noise.

In:  seeded random weights in the published format (`cxrage_ray.model.demo`; speed only), 16 random 512 px grey
     pictures, seed TTA; `--noise N` background processes that each wake 200 times a second for ~35 µs (what an
     idle Ray worker, helper actor, raylet or GCS does: ~170-210 wake-ups a second each, measured on the light
     pipeline's processes; there are ~8 of them beside the scoring actor).
Out: per layout, ms per view (best of `--repeats`, layouts alternating inside every repeat) and the ratio:
     one-call  `AgePredictor(batch_size=16, num_threads=2)`: what a CPU scoring actor ran before (16 films a call)
     two-calls `AgePredictor(batch_size=8, num_threads=1)` called from two threads at once on 8 films each: what
               the scoring actor runs now on this machine's cores (`plan.cpu_predictor`, Ray Data's
               `enable_true_multi_threading`)
     Each run is its own process (torch's thread count is process-wide).

Why: a two-thread forward pass waits for both threads at every synchronisation point, so each short preemption of
one thread by another process stalls the other too; two one-thread calls only slow the preempted one (issue 22).

    python benchmarks/concurrent_calls.py                 # quiet, then beside 8 noise processes
    python benchmarks/concurrent_calls.py --noise 0 8 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

WAKE_HZ, WAKE_US = 200, 35


def noise(seconds: float) -> None:
    """A Ray-like idle process: wakes WAKE_HZ times a second and works WAKE_US microseconds each time."""
    end = time.time() + seconds
    while time.time() < end:
        started = time.perf_counter()
        while time.perf_counter() - started < WAKE_US / 1e6:
            pass
        time.sleep(1 / WAKE_HZ)


def layout_worker(layout: str, rounds: int) -> None:
    """Time `rounds` x 16 films (80 views) through `layout` in this process; JSON ms per view on stdout."""
    import threading

    import numpy as np

    from cxrage_ray.config import PredictorConfig
    from cxrage_ray.model.demo import demo_state_dict
    from cxrage_ray.predict.predictor import AgePredictor

    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(16)]
    if layout == "one-call":
        predictor = AgePredictor(demo_state_dict(), PredictorConfig(device="cpu", batch_size=16, num_threads=2))

        def score() -> None:
            predictor.predict(films)
    else:
        predictor = AgePredictor(demo_state_dict(), PredictorConfig(device="cpu", batch_size=8, num_threads=1))

        def score() -> None:
            calls = [threading.Thread(target=predictor.predict, args=(films[k::2],)) for k in range(2)]
            for call in calls:
                call.start()
            for call in calls:
                call.join()
    score()  # warm-up: oneDNN's kernels for this shape
    started = time.perf_counter()
    for _ in range(rounds):
        score()
    print(json.dumps({"ms_per_view": 1000 * (time.perf_counter() - started) / (rounds * 80)}))


def run_layout(layout: str, rounds: int, noisy: int) -> float:
    command = [sys.executable, str(Path(__file__).resolve())]
    helpers = [subprocess.Popen([*command, "--noise-worker", "600"]) for _ in range(noisy)]
    try:
        done = subprocess.run([*command, "--layout-worker", layout, "--rounds", str(rounds)],
                              capture_output=True, text=True, check=True)
    finally:
        for helper in helpers:
            helper.kill()
            helper.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])["ms_per_view"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=int, nargs="+", default=[0, 8], help="background noise processes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both layouts; the best is kept")
    parser.add_argument("--rounds", type=int, default=3, help="16-film batches timed per run")
    parser.add_argument("--layout-worker", help=argparse.SUPPRESS)
    parser.add_argument("--noise-worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.noise_worker is not None:
        return noise(args.noise_worker)
    if args.layout_worker:
        return layout_worker(args.layout_worker, args.rounds)
    layouts = ["one-call", "two-calls"]
    for noisy in args.noise:
        best = {layout: float("inf") for layout in layouts}
        for repeat in range(args.repeats):
            for layout in layouts if repeat % 2 == 0 else layouts[::-1]:
                best[layout] = min(best[layout], run_layout(layout, args.rounds, noisy))
        print(f"noise processes {noisy:2d}: one two-thread call {best['one-call']:.1f} ms/view, two one-thread "
              f"calls {best['two-calls']:.1f} ms/view, one/two = {best['one-call'] / best['two-calls']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
