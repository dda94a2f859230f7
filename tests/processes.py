"""Whether processes a test started (or saw) are still running: for the tests that check nothing outlives a job."""

from __future__ import annotations

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
