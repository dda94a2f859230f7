"""How a scoring job's processes live and die.

- `terminate_as_interrupt`: SIGTERM (what `kill`, `timeout`, systemd and Kubernetes send) raises `Terminated`,
  a KeyboardInterrupt, so the job commits what it has scored and exits as after Ctrl-C (exit 143, not 130).
  `ray.init` installs its own SIGTERM handler (`sys.exit`): `raise_on_sigterm` puts ours back after it, and the
  block's exit restores the handler from before Ray (a SIGTERM during `ray.shutdown` is still ours).
- `ReaperGuard`: the embedded Ray's processes outlive a driver killed with SIGKILL (its DashboardAgent and
  RuntimeEnvAgent were measured alive 20-40 s later, workers a few seconds). A small watcher process, started
  with the embedded Ray and in its own session (so Ctrl-C or a kill of the driver's process group does not reach
  it), records the driver's descendants every `poll_s`; when the driver dies without saying "done" it freezes
  them (SIGSTOP, so none can fork or be re-parented away), adds their children, and kills them all.

The watcher learns of the driver's death from its stdin: the driver holds the only write end of that pipe
(Python's pipes are not inherited by Ray's children), and the kernel closes it whatever kills the driver.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

#: The watcher's message that the driver shut Ray down itself: nothing to reap.
DONE = b"done\n"


class Terminated(KeyboardInterrupt):
    """The job was asked to stop by SIGTERM: handled as Ctrl-C (commit, then exit 128 + SIGTERM)."""

    signal_number = signal.SIGTERM


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the handler from before the block comes
    back after it, whatever replaced it in between (`ray.init`)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_on_sigterm() -> None:
    """SIGTERM raises `Terminated` from now on (main thread only): after `ray.init` replaced the handler."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class ReaperGuard:
    """Start a watcher of this process; `done()` tells it this process ended Ray itself (nothing to reap)."""

    poll_s: float = 0.5
    process: subprocess.Popen | None = None

    def start(self) -> ReaperGuard:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxrage_ray.runtime.lifetime", str(os.getpid()), str(self.poll_s)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def done(self) -> None:
        if self.process is None or self.process.stdin is None:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.write(DONE)
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


@contextlib.contextmanager
def reaped_on_kill(at_exit: bool = False) -> Iterator[ReaperGuard]:
    """Within the block, processes this one starts are killed if it dies abruptly (see module docstring).

    `at_exit`: also when it ends normally, however long after the block: what it started is left running until
    this process exits (`exit_now`), and is then killed at once.
    """
    guard = ReaperGuard().start()
    try:
        yield guard
    finally:
        if not at_exit:
            guard.done()


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once: the exit handlers run, except Ray's `ray.shutdown`, and the
    interpreter's teardown is skipped.

    For the end of a command whose embedded Ray was left to the watcher (`reaped_on_kill(at_exit=True)`): Ray's
    shutdown stops its processes one by one (~1.4 s on 2 cores), and tearing down an interpreter that loaded
    torch, Ray and pandas takes another ~1-1.5 s, after every result is written.
    """
    import atexit

    ray = sys.modules.get("ray")
    if ray is not None:
        atexit.unregister(ray.shutdown)
    # logging's flush, finalizers' cleanup (temporary folders), ...: the standard library has no public way to
    # run the exit handlers and then skip the interpreter's teardown (sys.exit does both), so this private one
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def watch(driver_pid: int, poll_s: float) -> list[int]:
    """The watcher's loop: record `driver_pid`'s descendants until it says done (returns []) or dies (kills the
    recorded ones and returns their pids)."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, float] = {}  # pid -> create_time, so a recycled pid is never killed
    while True:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], poll_s)
        if readable:
            message = os.read(sys.stdin.fileno(), 64)
            if message.startswith(DONE):
                return []
            if not message:  # EOF: the driver is gone, whatever killed it
                break
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    with contextlib.suppress(psutil.Error):
                        seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
    return kill_recorded(seen, me)


def kill_recorded(seen: dict[int, float], me: int) -> list[int]:
    """Freeze the recorded processes still alive (same pid and start time) and their children, then kill all."""
    import psutil

    frozen: dict[int, psutil.Process] = {}

    def freeze(proc: psutil.Process) -> None:
        if proc.pid != me and proc.pid not in frozen:
            with contextlib.suppress(psutil.Error):
                proc.suspend()
                frozen[proc.pid] = proc

    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                freeze(proc)
    frontier = list(frozen.values())
    while frontier:  # a frozen parent keeps its children: the closure is complete
        with contextlib.suppress(psutil.Error):
            for child in frontier.pop().children():
                if child.pid not in frozen:
                    freeze(child)
                    frontier.append(child)
    for proc in frozen.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(frozen.values()), timeout=5)
    return sorted(frozen)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
