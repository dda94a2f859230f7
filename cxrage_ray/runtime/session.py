"""The job's Ray session: join a cluster or start an embedded local Ray, and read what the cluster offers.

In:  the job's `RayConfig`.
Out: a context in which Ray is up (`ray_session`), and `ClusterFacts` for the plan (`cluster_facts`).

The embedded Ray's processes die with this one even when it is killed with SIGKILL (`lifetime.reaped_on_kill`),
and SIGTERM stops the job like Ctrl-C (`lifetime.terminate_as_interrupt`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

from cxrage_ray.config import RayConfig
from cxrage_ray.pipeline.plan import ClusterFacts, embedded_cores
from cxrage_ray.runtime.console import native_stderr_to_session_log, quiet_ray_console, ray_init_options
from cxrage_ray.runtime.lifetime import raise_on_sigterm, reaped_on_kill, terminate_as_interrupt

#: Ray reserves this much for itself; on a 2-core node a predictor actor holding every CPU starved
#: the read tasks (environment.md), so the embedded Ray declares at least this many logical CPUs.
MIN_LOCAL_LOGICAL_CPUS = 4


@contextlib.contextmanager
def ray_session(rc: RayConfig) -> Iterator[None]:
    """Join `rc.address`, or start an embedded local Ray (reused, not stopped, if one is already up).

    SIGTERM's handler is put back by `raise_on_sigterm` after `ray.init` installed one of its own, and kept until
    Ray has shut down.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    # a cluster job keeps Ray's worker output in its job log; the embedded Ray keeps it off the terminal
    loud = rc.verbose or bool(rc.address)
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())  # left after ray.shutdown: a SIGTERM during it is ours too
        if not rc.address:  # entered first, left last: after ray.shutdown below
            stack.enter_context(reaped_on_kill(at_exit=rc.stop_at_exit))
        init_ray(rc.address, rc.num_cpus, ray_init_options(loud))
        quiet_ray_console(loud)
        stack.enter_context(native_stderr_to_session_log(loud))
        if rc.address or not rc.stop_at_exit:  # else the watcher stops Ray when this process exits
            stack.callback(ray.shutdown)  # inside the redirect: shutdown's complaints about dying actors stay in the log
        raise_on_sigterm()  # ray.init replaced our handler with its own sys.exit
        yield


def init_ray(address: str | None, num_cpus: int | None, options: dict[str, Any]) -> None:
    """`ray.init`: join `address`, or start a new embedded local Ray of at least `MIN_LOCAL_LOGICAL_CPUS` logical
    CPUs. The one place Ray is started, for `cxrage score` (`ray_session`) and `cxrage serve`."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, include_dashboard=False, **options)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": always a new embedded instance, never a cluster another process on this machine
    # advertised in /tmp/ray/ray_current_cluster (`ray start`, ray.cluster_utils.Cluster)
    ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS),
             include_dashboard=False, **options)


def cluster_facts(rc: RayConfig) -> ClusterFacts:
    """What the connected cluster offers the plan (GPUs, CPUs, the largest node's memory, nvImageCodec here)."""
    import ray

    resources = ray.cluster_resources()
    memory = max((node.get("Resources", {}).get("memory", 0.0) for node in ray.nodes() if node.get("Alive")),
                 default=0.0)
    return ClusterFacts(gpus=int(resources.get("GPU", 0)), cpus=float(resources.get("CPU", 0)),
                        largest_node_memory=memory, embedded_cores=embedded_cores(rc),
                        nvimgcodec=nvimgcodec_installed())


def nvimgcodec_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False
