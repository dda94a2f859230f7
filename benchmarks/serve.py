"""Benchmark: `cxrage serve` under 1, 8 and 32 concurrent clients on loopback.

In:  the real radiographs in $CXRAGE_SHARED/data/cxr-sample/images (default: ../shared next to the repo), read
     into memory once and sent in a fixed cycle, and seeded random weights in the published format (speed only).
Out: per concurrency level a row on stdout (and `--json PATH`): requests sent / answered 200 with `status: ok`,
     p50 and p99 latency (client-side, request start to full answer), requests/s (requests / wall time of the
     level) and the mean batch size the model deployment actually ran during the level (from `/v1/stats`,
     films in batches / batches run, differences before and after the level).

Each request is `POST /v1/score` with one film (the page's pattern); the baseline is the same server at one
client, where `@serve.batch` has nothing to gather. The server is started here (`cxrage serve` in a subprocess,
its own embedded Ray, a free loopback port) unless `--url` points at a running one. Bounded: `--requests` per
level, a per-request timeout and a per-level deadline; the server is stopped at the end.

    python benchmarks/serve.py                                    # 400 requests at 1, 8 and 32 clients
    python benchmarks/serve.py --requests 40 --concurrency 1 8    # quick check
    python benchmarks/serve.py --url http://127.0.0.1:8000        # against a running `cxrage serve`
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Requests sent before measuring (model warm-up: the first passes allocate and pick kernels).
WARMUP_REQUESTS = 4


def images_dir() -> Path:
    root = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    return root / "data" / "cxr-sample" / "images"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--films", type=int, default=50, help="distinct films cycled through (spread over the sample)")
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--weights", help="weights file for the server (default: seeded demo weights in a temp dir)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="passed to `cxrage serve`")
    p.add_argument("--max-batch-films", type=int, default=16, help="passed to `cxrage serve`")
    p.add_argument("--prepare-replicas", type=int, default=2,
                   help="passed to `cxrage serve`: decoding replicas feeding the model replica")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--level-timeout", type=float, default=1800.0, help="give up on a level after this long")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[str, subprocess.Popen, Path]:
    weights = args.weights
    if weights is None:
        weights = str(workdir / "demo.pth")
        subprocess.run([sys.executable, "-m", "cxrage_ray.cli", "weights", "demo", weights], check=True,
                       capture_output=True)
    port = free_port()
    log_path = workdir / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrage_ray.cli", "serve", "--port", str(port), "--weights", weights,
         "--batch-wait-ms", str(args.batch_wait_ms), "--max-batch-films", str(args.max_batch_films),
         "--prepare-replicas", str(args.prepare_replicas)],
        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cxrage serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/healthz", timeout=40).status_code == 200:
                return url, proc, log_path
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"cxrage serve did not become healthy in 600 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def score_once(session: requests.Session, url: str, name: str, data: bytes, timeout: float) -> tuple[float, bool]:
    """One request; (latency seconds, answered 200 with an ok result)."""
    started = time.perf_counter()
    try:
        answer = session.post(f"{url}/v1/score", files=[("files", (name, data, "application/octet-stream"))],
                              timeout=timeout)
        ok = answer.status_code == 200 and answer.json()[0]["status"] == "ok"
    except requests.RequestException:
        ok = False
    return time.perf_counter() - started, ok


def run_level(url: str, films: list[tuple[str, bytes]], clients: int, n: int, args: argparse.Namespace) -> dict:
    """`n` requests from `clients` concurrent clients (each sends its next request when its answer arrives)."""
    before = requests.get(f"{url}/v1/stats", timeout=60).json()
    sessions = threading.local()
    counter = iter(range(n))
    lock = threading.Lock()
    results: list[tuple[float, bool]] = []
    deadline = time.monotonic() + args.level_timeout

    def client() -> None:
        sessions.s = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            name, data = films[i % len(films)]
            outcome = score_once(sessions.s, url, name, data, args.request_timeout)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    after = requests.get(f"{url}/v1/stats", timeout=60).json()
    latencies = sorted(t for t, _ in results)
    batches = after["batches_run"] - before["batches_run"]
    films_batched = after["films_scored_in_batches"] - before["films_scored_in_batches"]
    return {
        "clients": clients,
        "requests": n,
        "answered_ok": sum(ok for _, ok in results),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "requests_per_s": round(len(results) / wall, 2),
        "wall_s": round(wall, 1),
        "batches": batches,
        "mean_batch_size": round(films_batched / batches, 2) if batches else None,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def main() -> int:
    args = parse_args()
    everything = sorted(p for p in images_dir().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = everything[:: max(1, len(everything) // args.films)][: args.films]  # both sources, all sizes
    if not paths:
        raise SystemExit(f"no films under {images_dir()} (set CXRAGE_SHARED)")
    films = [(p.name, p.read_bytes()) for p in paths]
    with tempfile.TemporaryDirectory(prefix="cxrage-serve-bench-") as tmp:
        proc = None
        url = args.url
        if url is None:
            t0 = time.perf_counter()
            url, proc, _ = start_server(args, Path(tmp))
            print(f"server up in {time.perf_counter() - t0:.1f} s at {url}", file=sys.stderr)
        try:
            for name, data in films[:WARMUP_REQUESTS]:
                score_once(requests.Session(), url, name, data, args.request_timeout)
            try:
                load = os.getloadavg()[0]
            except OSError:
                load = float("nan")
            rows = []
            for clients in args.concurrency:
                rows.append(run_level(url, films, clients, args.requests, args))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            if proc is not None:
                stop_server(proc)
    header = f"{'clients':>7} {'requests':>8} {'ok':>5} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>7} {'mean batch':>10}"
    print(f"cxrage serve, {len(films)} films cycled, load average {load:.1f} at start")
    print(header)
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['answered_ok']:>5} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
              f"{r['requests_per_s']:>7.2f} {r['mean_batch_size'] or 0:>10.2f}")
    base = rows[0]["requests_per_s"] if rows else 0
    for r in rows[1:]:
        print(f"throughput at {r['clients']} clients / at {rows[0]['clients']}: {r['requests_per_s'] / base:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_start": load, "levels": rows}, indent=2))
    return 0 if all(r["answered_ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
