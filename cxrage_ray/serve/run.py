"""Start, run and stop `cxrage serve`: Ray (embedded or RAY_ADDRESS), Ray Serve's HTTP proxy, three deployments.

    ScoreAPI (ingress, FastAPI) --> FilmPreparer (decode, seed chain, orientation) --> FilmScorer (model; @serve.batch)

The deployments reserve fractional CPUs: on a 2-core machine a replica holding every CPU starves the rest
(environment.md). The model deployment accepts many requests at once so `@serve.batch` can gather films of
concurrent clients.

The console is as quiet as `cxrage score`'s (`cxrage_ray.runtime.console`): without `-v`, the replicas' and
Serve's own log lines stay in their files under Ray's session log folder (`logs/serve/`, named on start), and a
stop (Ctrl-C, SIGTERM) deletes the application and shuts Serve down before Ray.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

from cxrage_ray.serve.config import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "cxrage"


def build_application(cfg: ServeConfig):
    """The Serve application: the ingress bound to handles of the prepare and model deployments."""
    from ray import serve

    from cxrage_ray.serve.app import ScoreAPI
    from cxrage_ray.serve.model import FilmScorer
    from cxrage_ray.serve.prepare import FilmPreparer

    model_requests = max(4 * cfg.max_batch_size, 64)
    scorer = serve.deployment(
        FilmScorer, name="FilmScorer", num_replicas=1, max_ongoing_requests=model_requests,
        ray_actor_options={"num_cpus": cfg.model_num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg)
    preparer = serve.deployment(
        FilmPreparer, name="FilmPreparer", num_replicas=cfg.prepare_replicas, max_ongoing_requests=model_requests,
        ray_actor_options={"num_cpus": cfg.prepare_num_cpus},
    ).bind(cfg)
    return serve.deployment(
        ScoreAPI, name="ScoreAPI", num_replicas=1, max_ongoing_requests=4 * model_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(preparer, scorer, cfg)


@contextlib.contextmanager
def ray_for_serve(cfg: ServeConfig) -> Iterator[str | None]:
    """Join `cfg.ray_address`, or start a new embedded local Ray that is stopped on exit; yields the folder of
    Serve's log files (None with `cfg.verbose`, whose log lines reach the terminal)."""
    import ray

    from cxrage_ray.runtime.console import (driver_stdout_to_session_log, native_stderr_to_session_log,
                                            ray_init_options, serve_driver_log_to_file)
    from cxrage_ray.runtime.session import init_ray

    # no object spilling: uploads and their pictures pass through the object store (shared memory) and must
    # never reach a disk; a full store makes requests wait instead
    spilling = {} if cfg.ray_address else {"_system_config": {"automatic_object_spilling_enabled": False}}
    init_ray(cfg.ray_address, cfg.num_cpus, {**ray_init_options(cfg.verbose), **spilling})
    import ray.serve  # noqa: F401  (gives the `ray.serve` logger the terminal handler moved to a file below)

    with contextlib.ExitStack() as stack:
        stack.enter_context(native_stderr_to_session_log(cfg.verbose))
        stack.enter_context(driver_stdout_to_session_log(cfg.verbose))  # Ray's messages for the driver
        stack.callback(ray.shutdown)  # inside the redirect: the core's complaints about dying actors stay in the log
        yield stack.enter_context(serve_driver_log_to_file(cfg.verbose))


def serve_until_stopped(cfg: ServeConfig, on_ready: Callable[[str], None] = print,
                        on_logs: Callable[[str], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; the application is deleted and Serve shut down before Ray (an
    embedded Ray is then stopped). `on_logs` is told where Serve's log files are (not when verbose)."""
    from ray import serve

    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        with ray_for_serve(cfg) as logs:
            for sig in signals:  # again: ray.init installed a SIGTERM handler of its own
                signal.signal(sig, lambda *_: stop.set())
            if logs and on_logs:
                on_logs(logs)
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
            try:
                serve.run(build_application(cfg), name=APP_NAME, route_prefix="/")
                on_ready(f"http://{_url_host(cfg.host)}:{cfg.port}/")
                stop.wait()
            finally:
                # the application first: its replicas stop while the controller still answers, so Serve's
                # shutdown below has only its own actors left
                with contextlib.suppress(Exception):
                    serve.delete(APP_NAME)
                serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
