"""Processes a test started: whether they (or ones it saw) still run — for the tests that check nothing outlives a
job — and waiting for a started `cxrage serve` to answer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil


def still_running(proc: psutil.Process | int) -> bool:
    """True while the process (a pid, or a `psutil.Process` recorded earlier) runs; a zombie (dead, not yet
    reaped) does not count, and a recorded process whose pid was reused by another does not either."""
    try:
        if isinstance(proc, int):
            proc = psutil.Process(proc)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until_healthy(proc: subprocess.Popen, base: str, log: Path, timeout_s: float) -> None:
    """Poll a started `cxrage serve` at `base`/healthz until it answers 200; fail the test, with the tail of its
    `log`, if the process exits first or `timeout_s` passes."""
    import time

    import pytest
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"cxrage serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{base}/healthz", timeout=40).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or the app is still deploying
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"cxrage serve not healthy after {timeout_s}s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
