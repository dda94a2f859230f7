"""The job's plan, resolved once on the driver: which itinerary, which prepare function, which scoring actor, what
resources and batch sizes.

In:  the `ScoreConfig`, the job's constant labels, and what the connected cluster offers (`ClusterFacts`).
Out: a `Plan` the itinerary (`cxrage_ray.pipeline.itinerary`) wires into Ray Data as it is, with no branching of
     its own:

    cpu     prepare = prepare_batch (fetch, decode, seed chain, orientation on CPU tasks)
            source  = PreparedPictures (the pictures' bytes)
    device  prepare = prepare_encoded_batch (fetch, DICOM header, frame 1's codestream on CPU tasks)
            source  = DevicePictures (batch decode, mapping, seed chain, orientation on the GPU)

Both end in the same scoring actor (`cxrage_ray.predict.scoring.ScoreActor`). Plain functions of their inputs:
no Ray here, so every decision is tested without a cluster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import pandas as pd

from cxrage_ray.config import (SEED_ROWS_PER_TASK, PredictorConfig, PrepareSettings, RayConfig, ScoreConfig,
                               views_per_film)
from cxrage_ray.errors import InputError

#: Model views per forward pass when --batch-size is auto (5 views per image with TTA). On CPU, 16 views run as
#: fast as 64 (21.6-22.7 vs 20.6-21.2 views/s, `benchmarks/cpu_engines.py --batch`, 2 cores) and bring the first
#: scored rows sooner (a 16-film first batch). Every pass has this shape (`PredictorConfig.fixed_shape`), so the
#: ages do not depend on how films were grouped into batches.
GPU_BATCH_VIEWS, CPU_BATCH_VIEWS = 640, 16
#: Model views per forward pass on a CPU actor scoring one-thread calls concurrently (`cpu_predictor`): two
#: one-thread 8-view passes at once ran 36.0 ms a view, one two-thread 16-view pass 37.0 (2 cores, quiet).
CPU_CONCURRENT_VIEWS = 8
#: Bytes one prepare task may hold per pixel of the largest film it accepts (`DecodeOptions.max_pixels`): a 16-bit
#: grey film at the limit is held as uint16 (2 B/px) beside its 8-bit levels (1 B/px); the decoder's buffers and the
#: resize's float64 bands add the rest. Measured by benchmarks/hostile.py: a 16384² 16-bit PNG (the default limit,
#: 268 M px) peaks at ~1,035 MiB in a fresh process, ~3.6 B/px with the interpreter; 4 B/px rounds that up.
PREPARE_BYTES_PER_PIXEL = 4
#: The prepare worker before any film (interpreter, numpy, Pillow, pydicom, pylibjpeg: ~110-150 MiB measured).
PREPARE_BASE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Itinerary:
    """Which way the films go: "cpu" (decode + seed chain on CPU tasks) or "device" (bytes to GPU actors)."""

    path: Literal["cpu", "device"]
    reason: str


@dataclass(frozen=True)
class GpuDecoders:
    """What the cluster's GPU nodes answered when asked whether nvImageCodec loads there
    (`cxrage_ray.runtime.session.probe_gpu_decoders`): asked on the nodes themselves, because the driver's
    environment says nothing about theirs (cluster.yaml installs the `[gpu]` extra on the GPU workers only).

    Args:
        nodes: GPU nodes asked (0: nobody was asked).
        loaded: those where nvImageCodec loaded.
        unanswered: those that did not answer in time (busy, booting, gone).
    """

    nodes: int = 0
    loaded: int = 0
    unanswered: int = 0

    @property
    def everywhere(self) -> bool:
        """nvImageCodec loads on every GPU node (and there is at least one)."""
        return self.nodes > 0 and self.loaded == self.nodes

    def describe(self) -> str:
        """For summary.json's `itinerary.reason`: what the GPU nodes answered."""
        if not self.nodes:
            return "no GPU node was asked whether nvImageCodec loads"
        text = f"nvImageCodec loads on {self.loaded} of {self.nodes} GPU node(s) (asked on the nodes)"
        return text + (f", {self.unanswered} did not answer" if self.unanswered else "")


@dataclass(frozen=True)
class ClusterFacts:
    """What the connected Ray cluster offers, read once (`cxrage_ray.runtime.session.cluster_facts`).

    Args:
        gpus: GPU resources in the cluster.
        cpus: logical CPU resources in the cluster.
        largest_node_memory: the largest `memory` resource (bytes) of one live node (0 when none is reported).
        embedded_cores: the cores inference may use on the embedded local Ray; None on a cluster.
        gpu_decoders: what the GPU nodes answered about nvImageCodec (GPU decode), when they were asked.
    """

    gpus: int = 0
    cpus: float = 0.0
    largest_node_memory: float = 0.0
    embedded_cores: int | None = None
    gpu_decoders: GpuDecoders = GpuDecoders()


@dataclass(frozen=True)
class CpuInference:
    """How CPU inference is laid out: `actors` predictor actors of `threads` torch threads each (0: every core of
    the actor's node)."""

    actors: int
    threads: int


@dataclass(frozen=True)
class Plan:
    """Everything the itinerary needs to wire the job (see the module docstring).

    Args:
        itinerary: the chosen path and why (summary.json).
        prepare: the CPU tasks' function (manifest rows -> prepared rows), with its `settings`.
        source: the scoring actor's `PictureSource`.
        predictor: the predictor settings with batch size and threads resolved.
        labels: constant output columns of every row.
        images_per_batch: films per scoring-actor batch.
        rows_per_task, first_block_rows: manifest rows per CPU task, and in the first one.
        prepare_memory: the `memory` (bytes) a prepare task declares (0: none).
        actors: (min, max) scoring actors; actor_gpus / actor_cpus: what each reserves; actor_calls: batches one
            actor scores at once, on threads of its own (`cpu_predictor`).
        stand_in: benchmark-only `CeilingStandIn` (set by `cxrage_ray.pipeline.stand_in.with_stand_in`), or None.
        saliency: the job's `SaliencySettings`, or None.
    """

    itinerary: Itinerary
    prepare: Callable[[pd.DataFrame, PrepareSettings], pd.DataFrame]
    settings: PrepareSettings
    source: Any
    predictor: PredictorConfig
    labels: dict[str, str]
    images_per_batch: int
    rows_per_task: int
    first_block_rows: int
    prepare_memory: int
    actors: tuple[int, int]
    actor_gpus: float
    actor_cpus: float
    stand_in: Any = None
    saliency: Any = None
    actor_calls: int = 1

    def actor_kwargs(self, state_ref: list, write: Any = None) -> dict[str, Any]:
        """The scoring actor's constructor arguments (`write`: where it writes its rows, `PendingWrite`)."""
        return {"state_dict_ref": state_ref, "predictor_config": self.predictor, "labels": self.labels,
                "source": self.source, "saliency": self.saliency, "stand_in": self.stand_in, "write": write}


def resolve_plan(cfg: ScoreConfig, labels: dict[str, str], cluster: ClusterFacts) -> Plan:
    """The plan for `cfg` on `cluster` (see the module docstring)."""
    from cxrage_ray.pipeline.prepare import prepare_batch
    from cxrage_ray.predict.scoring import PreparedPictures

    itinerary = choose_itinerary(cfg, cluster.gpus, cluster.gpu_decoders)
    gpus = gpus_for_inference(cfg, cluster.gpus)
    layout = cpu_inference_layout(cfg.ray.predict_actors, cluster.embedded_cores)
    predictor, calls = (cfg.predictor, 1) if gpus else cpu_predictor(cfg.predictor, layout, cfg.saliency is None)
    if predictor.batch_size <= 0:  # auto: large batches keep a GPU busy; a CPU gains nothing past ~16 views
        auto = GPU_BATCH_VIEWS if gpus else CPU_BATCH_VIEWS if calls == 1 else CPU_CONCURRENT_VIEWS
        predictor = replace(predictor, batch_size=auto)
    images_per_batch = films_per_batch(predictor.batch_size, views_per_film(predictor.tta))
    per_task = cfg.ray.rows_per_task_for(cfg.preprocess)
    common = dict(settings=PrepareSettings(storage=cfg.storage, decode=cfg.decode, preprocess=cfg.preprocess,
                                           orient=cfg.orient),
                  itinerary=itinerary, images_per_batch=images_per_batch, rows_per_task=per_task,
                  first_block_rows=first_block_rows(per_task, images_per_batch), saliency=cfg.saliency,
                  prepare_memory=prepare_memory_request(cfg.decode.max_pixels, cluster.largest_node_memory))
    if itinerary.path == "device":
        from cxrage_ray.pipeline.device_pictures import DevicePictures  # imports torch: only where it runs
        from cxrage_ray.pipeline.payloads import prepare_encoded_batch

        return Plan(prepare=prepare_encoded_batch, source=DevicePictures(orient=cfg.orient), predictor=predictor,
                    labels={**labels, "preprocess_engine": "tensor"}, actors=(1, max(1, gpus)), actor_gpus=1,
                    actor_cpus=1, **common)
    engine = "exact" if cfg.preprocess == "seed" else "none"
    cpu_labels = {**labels, "decode_device": "cpu", "preprocess_engine": engine}
    prepare = prepare_batch
    if gpus:
        return Plan(prepare=prepare, source=PreparedPictures(), predictor=predictor, labels=cpu_labels,
                    actors=(1, gpus), actor_gpus=1, actor_cpus=1.0, **common)
    return Plan(prepare=prepare, source=PreparedPictures(), predictor=predictor, labels=cpu_labels,
                actors=(layout.actors, layout.actors), actor_gpus=0, actor_calls=calls,
                actor_cpus=cpu_predictor_cpus(layout.actors, cluster.cpus), **common)


def _gpu_blockers(cfg: ScoreConfig) -> list[tuple[str, str]]:
    """Settings that rule the device itinerary out, as (the setting, why) pairs."""
    return [(setting, why) for blocked, setting, why in (
        (cfg.preprocess != "seed", "--preprocess none", "the device itinerary runs the seed chain on the GPU"),
        (cfg.decode.mode != "exact", "--decode fast", "the device itinerary decodes full-resolution frames"),
        (cfg.predictor.device == "cpu", "--device cpu", "the device itinerary needs a GPU"),
    ) if blocked]


def check_gpu_request(cfg: ScoreConfig, local_cuda: Callable[[], bool] | None = None) -> None:
    """Refuse `--gpu-preprocess on` that cannot be honoured, before Ray starts or OUTPUT is touched.

    `local_cuda` says whether this machine has a CUDA GPU (default: ask the driver, `preflight.cuda_devices`);
    it is only asked for `on` on an embedded Ray.
    """
    if cfg.gpu_preprocess != "on":
        return
    for setting, why in _gpu_blockers(cfg):
        raise InputError(f"--gpu-preprocess on cannot be combined with {setting}: {why}")
    if local_cuda is None:
        from cxrage_ray.runtime.preflight import cuda_devices

        local_cuda = lambda: cuda_devices() > 0  # noqa: E731
    if not cfg.ray.address and not local_cuda():
        raise InputError("--gpu-preprocess on, but this machine has no CUDA GPU (no NVIDIA driver or no device); use "
                         "--gpu-preprocess auto or off, or run on a GPU node / cluster (--ray-address)")


def wants_decoder_probe(cfg: ScoreConfig) -> bool:
    """Whether the itinerary depends on what the GPU nodes can decode (`auto` with nothing else ruling the device
    itinerary out): only then are the GPU nodes asked (`ClusterFacts.gpu_decoders`)."""
    return cfg.gpu_preprocess == "auto" and not _gpu_blockers(cfg)


def choose_itinerary(cfg: ScoreConfig, cluster_gpus: int, decoders: GpuDecoders) -> Itinerary:
    """The device itinerary when asked for (`on`), or under `auto` when the cluster has GPUs and nvImageCodec
    loads on every GPU node (asked there: `decoders`); the CPU itinerary otherwise, with the reason (it goes into
    summary.json)."""
    if cfg.gpu_preprocess == "on":
        if not cluster_gpus:
            raise InputError("--gpu-preprocess on, but the Ray cluster has no GPU resources")
        return Itinerary("device", "--gpu-preprocess on")
    if cfg.gpu_preprocess == "off":
        return Itinerary("cpu", "--gpu-preprocess off")
    reasons = [setting for setting, _ in _gpu_blockers(cfg)]
    reasons += ["no GPU in the cluster"] if not cluster_gpus else []
    if not decoders.everywhere:
        reasons += [f"{decoders.describe()}; pip install 'cxrage-ray[gpu]' on the GPU nodes"]
    if reasons:
        return Itinerary("cpu", f"auto: {reasons[0]}")
    return Itinerary("device", f"auto: {decoders.describe()}")


def gpus_for_inference(cfg: ScoreConfig, cluster_gpus: int) -> int:
    """GPUs the scoring actors use: none with --device cpu; --device cuda on a cluster without GPUs is refused."""
    if cfg.predictor.device == "cuda" and not cluster_gpus:
        raise InputError("--device cuda, but the Ray cluster has no GPU resources")
    return 0 if cfg.predictor.device == "cpu" else cluster_gpus


def films_per_batch(views_per_pass: int, film_views: int) -> int:
    """Films per scoring-actor batch: the fewest whose views fill whole forward passes (16 views, 5 per film: 16
    films, 5 passes), so no pass but a batch's last is padded (`PredictorConfig.fixed_shape`). At most
    `film_views` passes: a `--batch-size` that is a multiple of 5 keeps a TTA batch to one pass (640 on GPU)."""
    return views_per_pass // math.gcd(views_per_pass, film_views)


def first_block_rows(per_task: int, images_per_batch: int) -> int:
    """Rows of the first block (one CPU task): no more than a seed-chain task's, so the predictor starts on it
    while the larger blocks follow, but no fewer than one predictor batch: Ray Data gathers an actor's input
    until it holds a whole batch, so a smaller first block only waited for the second (~2 s on 2 cores, issue 15).
    """
    return min(per_task, max(SEED_ROWS_PER_TASK, images_per_batch))


def cpu_inference_layout(actors: int, cores: int | None) -> CpuInference:
    """The torch threads of each of `actors` CPU predictor actors.

    In:  `--predict-actors`; the embedded node's cores (None on a cluster, whose nodes' cores are their actors' own).
    Out: on the embedded node the cores are split between the actors (`cores // actors` threads, at least one):
         N actors each running torch on every core would ask N times the cores there are. On a cluster, every core
         of the actor's own node.

    One actor stays the default: a second process costs ~6 s of start-up; the one actor gets the single-thread
    gain instead by scoring a one-thread batch per core at once (`cpu_predictor`, issue 22).
    """
    return CpuInference(actors=actors, threads=0 if cores is None else max(1, cores // actors))


def cpu_predictor(predictor: PredictorConfig, layout: CpuInference, concurrent_safe: bool = True
                  ) -> tuple[PredictorConfig, int]:
    """A CPU scoring actor's predictor settings and how many batches it scores at once.

    Where the actor's cores are known (the embedded node), it scores one batch per core at a time, each on one
    torch thread: a thread another process preempts then holds up only its own batch, not its partner at every
    synchronisation point of a pass (the actor's threads ran 95% of the time instead of 88% beside Ray's own
    processes; light pace 0.89-0.94x a plain two-thread loop's on 2 cores, was 0.84x; issue 22,
    benchmarks/README.md, `benchmarks/concurrent_calls.py`). A torch thread count the caller chose,
    a cluster node (cores unknown here), OpenVINO's bf16 (its own threads) and saliency maps (hooks on the one
    model) keep one call on every thread.
    """
    if predictor.num_threads:
        return predictor, 1
    if layout.threads > 1 and predictor.precision != "bf16" and concurrent_safe:
        return replace(predictor, num_threads=1), layout.threads
    return replace(predictor, num_threads=layout.threads), 1


def embedded_cores(rc: RayConfig) -> int | None:
    """The cores inference may use on the embedded local Ray (this process's CPUs, at most `--num-cpus`); None when
    the job runs on a cluster."""
    if rc.address:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, rc.num_cpus or cores))


def prepare_memory_request(max_pixels: int, largest_node_memory: float) -> int:
    """The Ray `memory` (bytes) a prepare task declares: its worst film's budget, bounded so it always fits.

    In:  the decoders' pixel limit and the largest `memory` resource one node offers (0 when none is reported).
    Out: max_pixels * PREPARE_BYTES_PER_PIXEL + PREPARE_BASE_BYTES (~1.3 GB at the default limit), but never
         more than half the largest node's memory — a request no node can meet would leave every prepare task
         pending forever (Ray reports no error) — and 0 (no request) when the cluster reports no memory.
    """
    budget = max_pixels * PREPARE_BYTES_PER_PIXEL + PREPARE_BASE_BYTES
    return int(min(budget, largest_node_memory // 2)) if largest_node_memory > 0 else 0


def cpu_predictor_cpus(actors: int, cluster_cpus: float) -> float:
    """Logical CPUs one CPU predictor actor reserves.

    A lone actor runs torch on several threads, so it asks for 2 where the cluster has room; several actors ask
    for 0.5 each, so the prepare tasks keep their parallelism (the operating system shares the cores). The request
    must differ from the prepare tasks' 1 CPU, or Ray Data fuses both stages into the actor and decode then runs
    serially inside inference.
    """
    return 2 if actors == 1 and cluster_cpus >= 4 else 0.5
