"""The job's Ray session: join a cluster or start an embedded local Ray, and read what the cluster offers.

In:  the job's `RayConfig`.
Out: a context in which Ray is up (`ray_session`), and `ClusterFacts` for the plan (`cluster_facts`, which waits
     for the autoscaler's GPU nodes when the job needs GPUs: `wait_for_gpus`, and asks the GPU nodes whether
     nvImageCodec loads there: `probe_gpu_decoders`).

The embedded Ray's processes die with this one even when it is killed with SIGKILL (`lifetime.reaped_on_kill`),
and SIGTERM stops the job like Ctrl-C (`lifetime.terminate_as_interrupt`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from cxrage_ray.config import RayConfig
from cxrage_ray.errors import InputError
from cxrage_ray.pipeline.plan import ClusterFacts, GpuDecoders, embedded_cores
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
        settle_cwd_dependent_imports()  # first: connecting may delete our working folder (a Ray Job's driver)
        ray.init(address=address, include_dashboard=False, **options)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": always a new embedded instance, never a cluster another process on this machine
    # advertised in /tmp/ray/ray_current_cluster (`ray start`, ray.cluster_utils.Cluster)
    ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS),
             include_dashboard=False, **options)


def settle_cwd_dependent_imports() -> None:
    """Finish importing torch before this process joins a cluster, because joining may delete our working folder.

    A Ray Job's driver runs in Ray's extracted copy of `--working-dir`. When the driver connects, Ray installs the
    job's runtime environment on every node, and a node's runtime-env agent that has not unpacked that package itself
    unpacks it with overwrite (rmtree, then unzip) into the session folder. Where two nodes share a session folder
    (`ray start` twice on one machine, as the loopback cluster test does) this deletes the driver's working folder
    under it: from then on `os.getcwd()` raises FileNotFoundError. Importing torch needs the working folder, because
    `torch.library` calls `inspect.getmodule`, which makes every loaded module's `__file__` absolute and torch.ops'
    is the relative `_ops.py` (issue 23: the first `ray job submit` failed that way on the weights thread while
    `ray.init` connected; the second found the package unpacked and passed). Once imported, inspect has cached those
    paths and nothing the driver does later reads the working folder, so the import is finished first. Joining
    takes ~0.1 s, so there is no Ray start-up for the weights thread to overlap with here; on the embedded Ray
    (seconds to start, no working folder replaced) it still overlaps.
    """
    import torch  # noqa: F401  (waits for the weights thread's import of it when that one is under way)


#: How often `wait_for_gpus` looks at the cluster and says it is still waiting.
GPU_POLL_S = 5.0
GPU_MESSAGE_EVERY_S = 60.0


def wait_for_gpus(timeout_s: float, gpus: Callable[[], float], request: Callable[[list[dict]], None],
                  say: Callable[[str], None], sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> float:
    """Wait until the cluster offers a GPU; returns its GPU count.

    An autoscaling cluster (cluster.yaml: GPU workers at `min_workers: 0`) has no GPU when the job starts; the
    job asks the autoscaler for one (`request`: `ray.autoscaler.sdk.request_resources`), says so, and waits
    (a g5 spot node takes ~3-6 minutes to boot and run its setup) instead of refusing `--device cuda`. After
    `timeout_s` (`--no-progress-timeout`) without one it stops with an `InputError` saying where to look; the
    request is withdrawn either way, so the autoscaler does not keep a GPU node for a job that is gone.
    """
    have = gpus()
    if have:
        return have
    started = clock()
    request([{"GPU": 1}])
    say("cxrage: the cluster has no GPU yet; asked the autoscaler for a GPU node and waiting up to "
        f"{timeout_s:.0f}s (--no-progress-timeout) for it to join")
    said = started
    try:
        while not (have := gpus()):
            waited = clock() - started
            if waited >= timeout_s:
                raise InputError(
                    f"--device cuda, but no GPU joined the Ray cluster in {waited:.0f}s: check `ray status` (a GPU "
                    "worker type with max_workers > 0, spot capacity in the region, the node's setup log with "
                    "`ray monitor cluster.yaml`), or pass a longer --no-progress-timeout; nothing was scored")
            if clock() - said >= GPU_MESSAGE_EVERY_S:
                say(f"cxrage: still waiting for a GPU node ({waited:.0f}s of {timeout_s:.0f}s)")
                said = clock()
            sleep(min(GPU_POLL_S, max(0.0, timeout_s - waited)))
    finally:
        request([])
    say(f"cxrage: {have:g} GPU(s) in the cluster after {clock() - started:.0f}s; scoring starts")
    return have


def cluster_facts(rc: RayConfig, probe_decoders: bool = False) -> ClusterFacts:
    """What the connected cluster offers the plan (GPUs, CPUs, the largest node's memory, and, with
    `probe_decoders`, whether nvImageCodec loads on its GPU nodes: `probe_gpu_decoders`).

    A job that needs GPUs on a cluster that has none yet waits for the autoscaler first (`wait_for_gpus`)."""
    import ray

    if rc.address and rc.wait_for_gpus:
        from ray.autoscaler.sdk import request_resources

        wait_for_gpus(rc.no_progress_timeout_s, lambda: ray.cluster_resources().get("GPU", 0),
                      lambda bundles: request_resources(bundles=bundles), lambda line: print(line, file=sys.stderr))
    resources = ray.cluster_resources()
    memory = max((node.get("Resources", {}).get("memory", 0.0) for node in ray.nodes() if node.get("Alive")),
                 default=0.0)
    gpus = int(resources.get("GPU", 0))
    return ClusterFacts(gpus=gpus, cpus=float(resources.get("CPU", 0)), largest_node_memory=memory,
                        embedded_cores=embedded_cores(rc),
                        gpu_decoders=probe_gpu_decoders() if probe_decoders and gpus else GpuDecoders())


#: How long the GPU nodes have to say whether nvImageCodec loads (a worker start on a busy node takes seconds).
PROBE_TIMEOUT_S = 60.0


def probe_gpu_decoders(timeout_s: float = PROBE_TIMEOUT_S) -> GpuDecoders:
    """Ask every live GPU node, with a task pinned to it, whether nvImageCodec loads there.

    The decoding happens in the scoring actors on those nodes, so what the driver has installed says nothing (on
    the cluster we ship, the `[gpu]` extra is on the GPU workers only). The task needs no CPU, so a node whose
    CPUs are all busy still answers; a node that does not answer in `timeout_s` counts as not having it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cxrage_ray.decode.nvimgcodec import nvimgcodec_loads

    nodes = [node["NodeID"] for node in ray.nodes()
             if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0]
    if not nodes:
        return GpuDecoders()
    probe = ray.remote(num_cpus=0, max_retries=0)(nvimgcodec_loads)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    loaded = 0
    for ref in ready:
        try:
            loaded += bool(ray.get(ref))
        except Exception:  # the probe's worker died: that node does not count as having it
            pass
    return GpuDecoders(nodes=len(nodes), loaded=loaded, unanswered=len(late))

