"""What `cxrage score` shows on the terminal: one progress bar, one summary, and Ray's own logs only with -v.

Ray and Ray Data log to the terminal by default (worker stdout/stderr forwarded to the driver, Ray Data's
"Execution finished", "Progress bars disabled" ...). Their log files in Ray's session folder
(`/tmp/ray/session_latest/logs/`, `ray-data.log`) keep everything; `quiet_ray_console` only takes the
terminal copies away, and `ray_init_options` tells `ray.init` not to forward worker output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

#: Loggers whose terminal handlers are silenced (their file handlers are left alone).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """`ray.init` keyword arguments for the terminal: worker output stays in the session log unless verbose."""
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def quiet_ray_console(verbose: bool) -> None:
    """Raise Ray's and Ray Data's terminal handlers to CRITICAL (unless verbose); file handlers keep logging."""
    import ray.data  # noqa: F401  (configures the `ray.data` logger's handlers on import)

    if verbose:
        return
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.CRITICAL)


@contextlib.contextmanager
def progress_bar(todo: int, total: int, enabled: bool) -> Iterator[Any]:
    """One bar over the whole job: films done (previous runs included), films/s of this run, and the ETA."""
    from tqdm import tqdm

    with tqdm(total=total, initial=total - todo, unit="film", disable=not enabled, dynamic_ncols=True,
              smoothing=0.1, desc="cxrage", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}, {rate_fmt}]") as bar:
        yield bar


@contextlib.contextmanager
def native_stderr_to_session_log(verbose: bool) -> Iterator[None]:
    """While Ray runs, send what writes to file descriptor 2 directly (the driver's C++ core worker, e.g. an
    error-level `core_worker.cc ... max_restarts > 0` line) to `cxrage-driver-stderr.log` in Ray's session log
    folder; Python's `sys.stderr` (our bar and messages) keeps the terminal. No-op when verbose, or when fd 2
    is not available (embedded use, odd platforms)."""
    if verbose:
        yield
        return
    try:
        import ray

        logs = session_logs_dir(ray.get_runtime_context())
        log_fd = os.open(os.path.join(logs, "cxrage-driver-stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o644)
        sys.stderr.flush()
        terminal_fd = os.dup(2)
    except Exception:  # noqa: BLE001 - keeping the terminal noisy is better than failing the job
        yield
        return
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None)
                           or "utf-8", errors="replace")
    os.dup2(log_fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        sys.stderr.close()
        sys.stderr = python_stderr
        os.close(terminal_fd)
        os.close(log_fd)


def session_logs_dir(context: Any) -> str:
    """The Ray session's log folder, from the public runtime context: `<temp dir>/<session name>/logs`."""
    logs = os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    if not os.path.isdir(logs):
        raise FileNotFoundError(logs)
    return logs
