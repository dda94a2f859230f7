"""Where a command's time and CPU go: its process tree sampled every `--interval` seconds.

In:  any command (usually `cxrage score ...`), after `--`.
Out: on stdout, one line each time a process of the tree appears or changes its title (Ray workers retitle
     themselves: `ray::IDLE`, `ray::MapBatches(prepare_batch)`, `ray::MapWorker(...).__init__`), with the seconds
     since spawn; then the CPU seconds (user + system) of every process, largest first, and their total; and,
     with `--window T1 T2`, the CPU each process used between T1 and T2 seconds (a steady-state slice).

    python benchmarks/timeline.py -- cxrage score M.csv OUT --weights demo.pth --no-progress --preprocess none \\
        --tta none --rotation off --device cpu --batch-size 32
    python benchmarks/timeline.py --window 30 50 -- cxrage score ...   # who takes the cores while scoring

Issue 15's start-up and per-process figures in benchmarks/README.md came from this. Sampling costs a few % of a
core; compare runs made with it only to each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:100] or process.name()
    except psutil.Error:
        return "?"


def cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return None


def sample(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1, help="sampling period (s)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("T1", "T2"),
                        help="also print the CPU each process used between T1 and T2 s after spawn")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    started = time.monotonic()
    proc = subprocess.Popen(command)
    root = psutil.Process(proc.pid)
    titles: dict[int, str] = {}
    used: dict[int, float] = {}
    at_window: dict[int, dict[int, float]] = {}
    while proc.poll() is None:
        now = time.monotonic() - started
        for process in sample(root):
            name = title(process)
            if titles.get(process.pid) != name:
                print(f"{now:7.2f} {process.pid:7d} {name}", flush=True)
                titles[process.pid] = name
            cpu = cpu_seconds(process)
            if cpu is not None:
                used[process.pid] = cpu
        for k, edge in enumerate(args.window or ()):
            if k not in at_window and now >= edge:
                at_window[k] = dict(used)
        time.sleep(args.interval)
    print(f"{time.monotonic() - started:7.2f} exit {proc.returncode}")
    print("CPU seconds per process (start-up included):")
    for pid, cpu in sorted(used.items(), key=lambda item: -item[1]):
        if cpu >= 0.05:
            print(f"  {cpu:7.2f}  {pid:7d} {titles.get(pid, '?')[:80]}")
    print(f"  {sum(used.values()):7.2f}  total")
    if len(at_window) == 2:
        first, second = at_window[0], at_window[1]
        slice_ = {pid: second[pid] - first.get(pid, 0.0) for pid in second}
        print(f"CPU seconds between {args.window[0]:g} and {args.window[1]:g} s:")
        for pid, cpu in sorted(slice_.items(), key=lambda item: -item[1]):
            if cpu >= 0.05:
                print(f"  {cpu:7.2f}  {pid:7d} {titles.get(pid, '?')[:80]}")
        print(f"  {sum(slice_.values()):7.2f}  total over {args.window[1] - args.window[0]:g} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
