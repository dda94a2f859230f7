"""What `cxrage score` shows on the terminal: one progress bar, one summary, and Ray's own logs only with -v.

Ray and Ray Data log to the terminal by default (worker stdout/stderr forwarded to the driver, Ray Data's
"Execution finished", "Progress bars disabled" ...). Their log files in Ray's session folder
(`/tmp/ray/session_latest/logs/`, `ray-data.log`) keep everything; `quiet_ray_console` only takes the
terminal copies away, and `ray_init_options` tells `ray.init` not to forward worker output.

Failed films are named by `named_errors` (the file's base name, never its folders: those may name a patient)
and printed by `failed_film_lines`, for `cxrage score`, `cxrage report` and `cxrage preprocess` alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

#: Loggers whose terminal handlers are silenced (their file handlers are left alone).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
#: Error rows named on the console (and in summary.json's `first_errors`); the rest are in OUTPUT.
ERRORS_NAMED = 5
#: How a user finds every error row of OUTPUT's Parquet (the `status` column of the output contract).
ERROR_ROWS_FILTER = "status == 'error'"


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


@contextlib.contextmanager
def driver_stdout_to_session_log(verbose: bool) -> Iterator[None]:
    """While Ray runs, send this process's `sys.stdout` to `cxrage-driver-stdout.log` in Ray's session log folder:
    Ray's listener thread prints the errors it is told of there, whatever `log_to_driver` says (e.g. Ray Serve's
    own shutdown: "(raylet) Task ServeController.graceful_shutdown failed ... retried"). For commands that write
    nothing to stdout themselves (`cxrage serve`: its lines go to stderr). No-op when verbose."""
    if verbose:
        yield
        return
    try:
        import ray

        sink = open(os.path.join(session_logs_dir(ray.get_runtime_context()), "cxrage-driver-stdout.log"), "a",
                    encoding="utf-8", buffering=1)
    except Exception:  # noqa: BLE001 - a noisy terminal is better than no server
        yield
        return
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.close()


@contextlib.contextmanager
def serve_driver_log_to_file(verbose: bool) -> Iterator[str | None]:
    """While Ray Serve runs from this process, its driver-side log lines ("Started Serve", "Application ... is
    ready") go to `serve/cxrage-serve-driver.log` in Ray's session log folder instead of the terminal, beside
    the controller's, proxy's and replicas' own log files; yields that folder (None when verbose or unknown).
    Call after `ray.init` and `import ray.serve` (which gives the `ray.serve` logger its terminal handler)."""
    if verbose:
        yield None
        return
    try:
        import ray

        folder = os.path.join(session_logs_dir(ray.get_runtime_context()), "serve")
        os.makedirs(folder, exist_ok=True)
        handler = logging.FileHandler(os.path.join(folder, "cxrage-serve-driver.log"), encoding="utf-8")
    except Exception:  # noqa: BLE001 - a noisy terminal is better than no server
        yield None
        return
    serve_logger = logging.getLogger("ray.serve")
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
    serve_logger.addHandler(handler)
    quiet_ray_console(verbose)  # the terminal handlers Serve's import added; the file handler keeps logging
    try:
        yield folder
    finally:
        serve_logger.removeHandler(handler)
        handler.close()


def session_logs_dir(context: Any) -> str:
    """The Ray session's log folder, from the public runtime context: `<temp dir>/<session name>/logs`."""
    logs = os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    if not os.path.isdir(logs):
        raise FileNotFoundError(logs)
    return logs


def film_name(uri: Any, image_id: Any = None, row_id: Any = None) -> str:
    """What the console calls a film: its file's base name (no folders: they may name a patient), else its
    image_id's base name, else `row <row_id>`."""
    for value in (uri, image_id):
        if isinstance(value, str) and value.strip():
            return PurePosixPath(value.strip().rstrip("/").replace("\\", "/")).name or value.strip()
    return f"row {row_id}" if row_id is not None else "?"


def named_errors(rows: Iterable[Mapping[str, Any]], limit: int = ERRORS_NAMED) -> list[dict[str, str]]:
    """The first `limit` error rows as `{"film": name, "error": "<Kind>: message"}`; a message that quotes the
    film's full location (a ReadError's "not found: <uri>") quotes its base name instead."""
    named = []
    for row in rows:
        if len(named) >= limit:
            break
        named.append(named_error(row.get("uri"), row.get("error"), row.get("image_id"), row.get("row_id")))
    return named


def named_error(uri: Any, error: Any, image_id: Any = None, row_id: Any = None) -> dict[str, str]:
    """One failed film as `{"film": film_name(...), "error": message}`, its full location in the message replaced by
    its base name."""
    film = film_name(uri, image_id, row_id)
    message = error if isinstance(error, str) and error.strip() else "Error: ?"  # a null reads back as None/NaN
    if isinstance(uri, str) and uri.strip():
        message = message.replace(uri.strip(), film)
    return {"film": film, "error": message}


def failed_film_lines(named: list[dict[str, str]], total: int, output: str) -> list[str]:
    """Console lines naming the first failed films and saying where every error row is (`ERROR_ROWS_FILTER`)."""
    if not total:
        return []
    lines = [f"cxrage: failed: {n['film']}: {n['error']}" for n in named]
    more = f"{total - len(named)} more; " if total > len(named) else ""
    lines.append(f"cxrage: {more}every error row: `{ERROR_ROWS_FILTER}` in the Parquet under {output}")
    return lines
