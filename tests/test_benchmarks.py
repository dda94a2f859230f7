"""The GPU benchmark script still runs (checked on CPU), so a session lent a GPU spends its minutes measuring."""

from __future__ import annotations

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


@pytest.mark.timeout(600)
def test_gpu_pipeline_script_runs_without_ray_on_cpu(shared_dir):
    stdout = run_script_without_ray(
        "gpu_pipeline.py", ["--device", "cpu", "--cases", "png", "--films", "2", "--seconds", "1", "--bare-views", "10",
                            "--batch-views", "10", "--workers", "1"], timeout=580, CXRAGE_SHARED=str(shared_dir))
    assert "script check only" in stdout
    # both itineraries scored both films, to the same ages (same pictures, CPU fp32 network)
    row = re.search(r"^\s*1024² PNG\s+2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+cpu\s+2/2\s+([\d.]+)$", stdout, re.M)
    assert row, stdout
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0 and float(row.group(4)) == 0.0
    assert re.search(r"AgePredictor \(compiled=False\)\s+[\d.]+\s+[\d.]+", stdout), stdout
    assert "ray imported: False" in stdout
