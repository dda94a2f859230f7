"""The GPU benchmark kit works on a machine that has only what the GPU machine has (torch, numpy, pillow, pandas,
pyarrow; no Ray, no pydicom, no install of this project): `benchmarks/gpu_kit.sh` builds it for this Python, and
`bench-kit/run.sh --smoke` runs every case on the CPU in such a bare venv — so a missing import shows here, not
in the GPU session's few minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bare_venv import make_bare_venv

REPO = Path(__file__).resolve().parents[1]
GPU_MACHINE_HAS = ["torch", "numpy", "pillow", "pandas", "pyarrow"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kit_smoke_runs_every_case_in_a_bare_venv(shared_dir: Path, tmp_path: Path) -> None:
    kit = tmp_path / "bench-kit"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "CXRAGE_SHARED": str(shared_dir), "KIT_DIR": str(kit), "KIT_PYTHON_VERSION": version,
           "PYTHON": sys.executable}
    built = subprocess.run(["bash", "benchmarks/gpu_kit.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert re.search(r"bench-kit: \d+ MiB \(9 wheels", built.stdout), built.stdout

    python = make_bare_venv(tmp_path / "venv", GPU_MACHINE_HAS)
    bare = subprocess.run([str(python), "-c", "import torch, pandas, pyarrow, PIL\nfor name in ('ray', 'pydicom', "
                           "'cxrage_ray', 'imagecodecs'):\n    try: __import__(name); print('has', name)\n"
                           "    except ImportError: pass"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and bare.stdout == "", bare.stdout + bare.stderr  # as bare as the GPU machine

    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_env.update(PYTHON=str(python), CXRAGE_CHECKOUT=str(REPO), OMP_NUM_THREADS="1")
    smoke = subprocess.run(["bash", str(kit / "run.sh"), "--smoke"], cwd=tmp_path, env=run_env, capture_output=True,
                           text=True, timeout=1100)
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-3000:]
    out = smoke.stdout
    assert "script check only" in out
    summary = out[out.index("end to end"):]
    for case in ("J2K-lossless DICOM 2k 15-bit", "JPEG DICOM", "1024² PNG"):
        # films, cpu path/s, device path/s, ratio, decode_device, pictures equal n/n, ok n/n, max |Δ age|
        row = re.search(rf"^\s*{re.escape(case)}\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+cpu:(\d+)\s+(\d+)/(\d+)\s+"
                        rf"(\d+)/(\d+)\s+([\d.]+)$", summary, re.M)
        assert row, (case, summary)
        films = int(row.group(1))
        assert films > 0 and int(row.group(4)) == films  # every film decoded (on the CPU, here)
        assert row.group(5) == row.group(6) and int(row.group(5)) > 0  # the tensor chain's pictures = exact path's
        assert int(row.group(7)) == films == int(row.group(8))  # ok films, not error rows
        assert float(row.group(9)) == 0.0  # same ages from both itineraries
    assert re.search(r"AgePredictor \(compiled=False\)\s+[\d.]+\s+[\d.]+", out), out
