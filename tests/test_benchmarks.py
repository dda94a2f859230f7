"""The GPU benchmark script still runs (checked on CPU), so a session lent a GPU spends its minutes measuring."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_predictor_gpu_script_runs_without_ray_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # run the script as __main__, then report whether anything imported Ray (the GPU machine has no Ray)
    runner = (
        "import runpy, sys; sys.argv = ['predictor_gpu.py', '--device', 'cpu', '--images', '2', '--batches', '10', "
        "'--precisions', 'bf16']; runpy.run_path('benchmarks/predictor_gpu.py', run_name='__main__'); "
        "print('ray imported:', 'ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", runner], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "script check only" in result.stdout
    row = re.search(r"^\s*bf16\s+10\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", result.stdout, re.M)
    # the row is there with its three figures; their values are timings (0.0 on a loaded machine), not checked
    assert row, result.stdout
    assert "ray imported: False" in result.stdout


@pytest.mark.timeout(600)
def test_gpu_pipeline_script_runs_without_ray_on_cpu(shared_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CXRAGE_SHARED": str(shared_dir)}
    runner = (
        "import runpy, sys; sys.argv = ['gpu_pipeline.py', '--device', 'cpu', '--cases', 'png', '--films', '2', "
        "'--seconds', '1', '--bare-views', '10', '--batch-views', '10', '--workers', '1']; "
        "runpy.run_path('benchmarks/gpu_pipeline.py', run_name='__main__'); print('ray imported:', 'ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", runner], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=580)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "script check only" in result.stdout
    # both itineraries scored both films, to the same ages (same pictures, CPU fp32 network)
    row = re.search(r"^\s*1024² PNG\s+2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+cpu\s+2/2\s+([\d.]+)$", result.stdout, re.M)
    assert row, result.stdout
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0 and float(row.group(4)) == 0.0
    assert re.search(r"AgePredictor \(compiled=False\)\s+[\d.]+\s+[\d.]+", result.stdout), result.stdout
    assert "ray imported: False" in result.stdout
