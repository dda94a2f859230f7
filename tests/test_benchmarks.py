"""The GPU benchmark scripts still run (checked on CPU), so a session lent a GPU spends its minutes measuring (the
kit's `gpu_pipeline.py` run: tests/test_gpu_kit.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script_without_ray(script: str, args: list[str], timeout: float, **env: str) -> str:
    """Run `benchmarks/<script>` as __main__ in a fresh interpreter; its stdout, then whether Ray was imported
    (the GPU machine has no Ray)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    runner = (f"import runpy, sys; sys.argv = {[script, *args]!r}; "
              f"runpy.run_path('benchmarks/{script}', run_name='__main__'); print('ray imported:', 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", runner], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(300)
def test_predictor_gpu_script_runs_without_ray_on_cpu():
    stdout = run_script_without_ray("predictor_gpu.py", ["--device", "cpu", "--images", "2", "--batches", "10",
                                                         "--precisions", "bf16"], timeout=280)
    assert "script check only" in stdout
    row = re.search(r"^\s*bf16\s+10\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
    # the row is there with its three figures; their values are timings (0.0 on a loaded machine), not checked
    assert row, stdout
    assert "ray imported: False" in stdout


@pytest.mark.timeout(900)
def test_pipeline_ceiling_script_reports_light_ratio_and_ceiling(shared_dir, tmp_path):
    """The issue-15 benchmark at toy sizes: one light-work pair and one ceiling run, with sane figures."""
    env = {**os.environ, "CXRAGE_SHARED": str(shared_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "benchmarks/pipeline_ceiling.py", "--films", "8", "16", "--ceiling-films", "64",
                             "--cores", "2", "--json", str(tmp_path / "figures.json")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pair = re.search(r"ours/loop = ([\d.]+)\s+max \|d cxr_age\| ([\d.e+-]+) over (\d+)", result.stdout)
    assert pair, result.stdout
    # both sides scored all 8 films to the same ages (same pictures, CPU fp32 network, same batches); the scoring
    # actor runs one-thread passes two at a time and the loop two-thread passes, which oneDNN rounds differently on
    # some CPUs (4.9e-6 years seen here): far below anything a wrong picture or model would move
    assert float(pair.group(1)) > 0 and float(pair.group(2)) < 1e-4 and pair.group(3) == "8"
    steady = re.search(r"2 core\(s\):\s+([\d.]+) films/s after the first film", result.stdout)
    assert steady and float(steady.group(1)) > 0, result.stdout
    assert re.search(r"next to it: light-work ours/loop = [\d.]+", result.stdout)
    # two film counts: each side's wall clock split into a fixed cost and a cost per film
    assert re.search(r"wall = fixed \+ per film x films, fitted over 2 film counts: loop [-\d.]+ s \+ [-\d.]+ ms/film, "
                     r"ours [-\d.]+ s \+ [-\d.]+ ms/film", result.stdout), result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert [run["films"] for run in figures["light_runs"]] == [8, 16]
    assert set(figures["light_lines"]) == {"loop", "ours", "ratio_as_films_grow", "films_for_0_9"}


def test_ceiling_stand_in_is_not_reachable_from_the_cli(tmp_path, monkeypatch, capsys):
    """The benchmark-only stand-in (`CeilingStandIn`) has no flag, and `cxrage score` never passes it."""
    from cxrage_ray import cli
    from cxrage_ray.pipeline import itinerary as pipeline

    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    help_text = capsys.readouterr().out.lower()
    assert "score a folder" in help_text
    assert not any(word in help_text for word in ("stand-in", "stand_in", "ceiling", "benchmark"))
    score_parser = cli.build_parser()._subparsers._group_actions[0].choices["score"]
    assert not [a.dest for a in score_parser._actions if "stand" in a.dest or "ceiling" in a.dest]
    with pytest.raises(SystemExit):  # no abbreviation or spelling of it parses either
        cli.build_parser().parse_args(["score", "in", "out", "--stand-in"])

    calls, real_score = [], pipeline.score

    def fake_score(cfg, weights_home, manifest=None, **kwargs):
        calls.append(kwargs)
        return {"rows_ok": 1, "rows_error": 0, "rows_total": 1, "rows_scored_this_run": 1, "images_per_s": 1.0,
                "errors_by_kind": {}}

    monkeypatch.setattr(pipeline, "score", fake_score)
    (tmp_path / "film.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cli.main(["score", str(tmp_path), str(tmp_path / "out"), "--weights", "demo", "--no-progress"],
             env={"CXRAGE_HOME": str(tmp_path / "home")})
    assert calls == [{}]  # the CLI passes cfg, weights home and manifest only: never `stand_in`
    assert "stand_in" not in (REPO / "cxrage_ray" / "cli.py").read_text()
    # and `score` itself takes no stand-in or plan hook: only the benchmark composes open/run/finish with one
    import inspect

    assert list(inspect.signature(real_score).parameters) == ["cfg", "weights_home", "manifest"]


def test_timeline_script_reports_each_process_title_and_cpu(tmp_path):
    """`benchmarks/timeline.py` on a command with a busy child: both processes, the child's retitling (a new
    program), their CPU and the windowed slice are reported."""
    child = "import time; t = time.process_time(); [None for _ in iter(lambda: time.process_time() - t > 0.6, True)]"
    parent = ("import subprocess, sys, time; time.sleep(0.3); "
              f"subprocess.run([sys.executable, '-c', {child!r}]); time.sleep(0.3)")
    result = subprocess.run([sys.executable, "benchmarks/timeline.py", "--interval", "0.05", "--window", "0.2", "0.9",
                             "--", sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s*[\d.]+\s+\d+\s+.*python.* -c import subprocess", result.stdout, re.M), result.stdout
    assert re.search(r"^\s*[\d.]+\s+\d+\s+.*python.* -c import time; t = ", result.stdout, re.M), result.stdout
    busy = re.search(r"^\s+([\d.]+)\s+\d+ .* -c import time; t = ", result.stdout.split("CPU seconds per process")[1], re.M)
    assert busy and float(busy.group(1)) >= 0.5, result.stdout  # the child burnt ~0.6 s of CPU
    assert re.search(r"total over 0.7 s", result.stdout), result.stdout
    assert re.search(r"^\s*[\d.]+ exit 0$", result.stdout, re.M)
