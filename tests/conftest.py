"""Shared fixtures. Real data lives in ../shared (CXRAGE_SHARED overrides); tests that need it skip
with a clear reason when it is absent and run when it is present (CI has it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest
from s3_fixtures import s3_server, s3_env  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("CXRAGE_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if not (root / "data").is_dir():
        pytest.skip(f"../shared not found at {root} (set CXRAGE_SHARED)")
    return root


@pytest.fixture(scope="session")
def cxr_sample(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cxr-sample"


@pytest.fixture(scope="session")
def dicom_sample(shared_dir: Path) -> Path:
    return shared_dir / "data" / "dicom-sample"


def require_tool(name: str) -> str:
    """Path of a reference command-line tool (mogrify, dcmj2pnm, chromium); skip when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it: see .ci/run)")
    return path


def run_reference(cmd: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a reference tool (ImageMagick, DCMTK); a failing run is retried once (they have failed for load
    reasons on a busy CI box), and a second failure fails the test as the tool's failure, not as a wrong
    answer from our code."""
    for attempt in (1, 2):
        result = subprocess.run(list(cmd), capture_output=True, timeout=timeout)
        if result.returncode == 0:
            return result
    pytest.fail(f"reference tool failed twice (exit {result.returncode}): {' '.join(map(str, cmd[:3]))} ...: "
                f"{result.stderr.decode(errors='replace')[-500:]}", pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test run (start-up costs seconds; environment.md)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        # more logical than physical CPUs: on 2-core CI machines an actor holding every CPU starves tasks
        # address="local": never join a cluster another process on a shared machine advertised in /tmp/ray
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_no_progress_timeout_s = 120  # fail a wedged test instead of hanging for 30 min
    yield ray
    ray.shutdown()
