"""Process lifetime: SIGTERM as Ctrl-C, and the watcher that reaps a SIGKILLed driver's processes.

The reaper tests run a real driver process that starts the watcher (`reaped_on_kill`) and a small process tree
(a child, its grandchild, and an orphan whose parent already exited), then kill the driver with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from processes import still_running

from cxrage_ray.runtime.lifetime import Terminated, terminate_as_interrupt

DRIVER = textwrap.dedent("""
    import atexit, json, os, subprocess, sys, time
    from cxrage_ray.runtime.lifetime import exit_now, reaped_on_kill

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    with reaped_on_kill(at_exit=sys.argv[1] == "exit_now"):
        # a child with a grandchild, like raylet and its workers
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; g = subprocess.Popen(sys.argv[1:]); print(g.pid, flush=True); "
            "time.sleep(120)", *sleeper], stdout=subprocess.PIPE)
        grandchild = int(child.stdout.readline())
        # an orphan by the time the driver dies: its parent exits a second after starting it, as a raylet's
        # agents outlive a dead raylet
        middle = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; g = subprocess.Popen(sys.argv[1:], start_new_session=True); "
            "print(g.pid, flush=True); time.sleep(1)", *sleeper], stdout=subprocess.PIPE)
        orphan = int(middle.stdout.readline())
        middle.wait()
        time.sleep(1.5)  # the watcher records descendants every 0.5 s
        print(json.dumps([child.pid, grandchild, orphan]), flush=True)
        if sys.argv[1] == "hang":
            time.sleep(120)
    if sys.argv[1] == "exit_now":
        time.sleep(1.0)  # past the block: what it started still runs
        alive = [os.path.exists(f"/proc/{pid}") for pid in (child.pid, grandchild, orphan)]
        atexit.register(print, "exit handler ran")  # not flushed by itself either
        print(json.dumps(alive), flush=False)  # left in the buffer (stdout is a pipe): exit_now must flush it
        exit_now(7)
""")


def _start_driver(mode: str) -> tuple[subprocess.Popen, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered, as by default
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, mode], stdout=subprocess.PIPE, text=True, env=env)
    line = driver.stdout.readline()
    assert line, "the driver printed no pids"
    return driver, json.loads(line)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if still_running(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigkilled_driver_takes_its_processes_along():
    driver, pids = _start_driver("hang")
    tree = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
    try:
        assert all(still_running(pid) for pid in pids)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 5
        while any(still_running(pid) for pid in pids + tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in pids + tree if still_running(pid)]
        assert not survivors, f"still alive 5 s after the driver's SIGKILL: {survivors}"
    finally:
        _kill_all(pids + tree)


def test_a_driver_that_ends_normally_leaves_other_processes_alone():
    driver, pids = _start_driver("exit")
    try:
        assert driver.wait(timeout=30) == 0
        time.sleep(1.0)  # a watcher that wrongly reaped would have done so by now
        assert all(still_running(pid) for pid in pids)
    finally:
        _kill_all(pids)


def test_exit_now_after_leaving_processes_to_the_watcher_takes_them_along():
    """`reaped_on_kill(at_exit=True)`: what the driver started outlives the block and dies with the driver, which
    `exit_now` ends with its code, its buffered output and its exit handlers."""
    driver, pids = _start_driver("exit_now")
    try:
        rest = driver.communicate(timeout=30)[0].splitlines()
        assert driver.returncode == 7
        assert json.loads(rest[0]) == [True, True, True]
        assert "exit handler ran" in rest
        deadline = time.monotonic() + 5
        while any(still_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if still_running(pid)], "still alive 5 s after the driver exited"
    finally:
        _kill_all(pids)


def test_sigterm_raises_terminated_and_the_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs between bytecodes; this is never reached
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)  # the pipeline's Ctrl-C path commits and reports
