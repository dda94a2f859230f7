"""The data's itinerary for `cxrage score`, on Ray Data:

    manifest rows (driver: folder listing or CSV/Parquet, minus rows already scored)
      -> prepare      CPU tasks: fetch bytes, decode, seed chain, orientation  (cxrage_ray.pipeline.stages.prepare_batch)
      -> predict      actor pool, one actor per GPU or CPU actors: fastai views + TTA + calibration
      -> write        driver: whole Parquet parts under OUTPUT/parts, then summary.json
      -> write-back   driver, optional: a DICOM SR per ok DICOMweb row, stored by STOW-RS (cxrage_ray.pacs.writeback)

or, on GPU clusters (the device itinerary, `choose_itinerary`):

      -> prepare      CPU tasks: fetch bytes, parse DICOM headers / decode rasters  (device_stages.prepare_encoded_batch)
      -> score        one actor per GPU: batch decode, mapping, seed chain, orientation, model  (DeviceScoreStage)
      -> write        as above

Every stage named here lives in its own module and runs without Ray; this file only wires them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pandas as pd
import pyarrow as pa

import cxrage_ray
from cxrage_ray.config import SEED_ROWS_PER_TASK, RayConfig, ScoreConfig
from cxrage_ray.runtime.console import native_stderr_to_session_log, progress_bar, quiet_ray_console, ray_init_options
from cxrage_ray.errors import InputError, StalledError, error_kind
from cxrage_ray.runtime.lifetime import raise_on_sigterm, reaped_on_kill, terminate_as_interrupt
from cxrage_ray.manifest.build import PROBLEM_COLUMN, build_manifest
from cxrage_ray.model.registry import DEFAULT_MODEL, resolve_weights
from cxrage_ray.write.parts import (
    PARTS_DIR,
    PartWriter,
    commit_part,
    committed_parts,
    committing_on_time,
    completed_row_ids,
    drop_error_rows,
    move_legacy_records,
    output_schema,
    read_json,
    read_output,
    write_json,
    write_original_csv,
)
from cxrage_ray.write.spill import Spill
from cxrage_ray.config import PrepareSettings
from cxrage_ray.pipeline.stages import CeilingStandIn, PredictStage, prepare_batch, read_bytes_batch, retry_counts
from cxrage_ray.storage.files import filesystem_for

log = logging.getLogger(__name__)

#: Ray reserves this much for itself; on a 2-core node a predictor actor holding every CPU starved
#: the read tasks (environment.md), so the embedded Ray declares at least this many logical CPUs.
MIN_LOCAL_LOGICAL_CPUS = 4
#: Model views per forward pass when --batch-size is auto (5 views per image with TTA).
GPU_BATCH_VIEWS, CPU_BATCH_VIEWS = 640, 64


def score(cfg: ScoreConfig, weights_home: Path, manifest: pd.DataFrame | None = None,
          stand_in: CeilingStandIn | None = None) -> dict[str, Any]:
    """Run a scoring job to completion (or resume one); returns the summary written to summary.json.

    `manifest`: INPUT's rows when the caller built them already (the CLI does, before importing torch).
    `stand_in`: benchmark-only (`benchmarks/pipeline_ceiling.py`): bytes instead of pictures, a constant instead
    of the model; the CLI never passes it.
    """
    started = time.perf_counter()
    check_gpu_request(cfg)
    if manifest is None:
        manifest = build_manifest(cfg.input, cfg.storage, uri_column=cfg.uri_column)
    weights = resolve_weights(cfg.weights, weights_home, cfg.allow_fetch)
    weights_name = cfg.weights_name or (DEFAULT_MODEL if weights.source != "explicit" else weights.path.name)
    job = _job_record(manifest, cfg, weights.sha256)
    spill = Spill(cfg.spill_root, cfg.output, job) if cfg.spill_root is not None else None
    todo = _rows_to_score(manifest, {**job, "weights_name": weights_name}, cfg, spill)
    carried = manifest.drop(columns=[PROBLEM_COLUMN], errors="ignore")  # read by prepare, not an output column
    schema = output_schema(pa.Schema.from_pandas(carried, preserve_index=False))
    writer = PartWriter(cfg.output, schema, cfg.storage, part_rows=cfg.part_rows,
                        commit_every_s=cfg.commit_every_s, spill=spill)
    labels = {"weights_sha256": weights.sha256, "weights_name": weights_name, "preprocess": cfg.preprocess,
              "tta": cfg.predictor.tta, "decode": cfg.decode.mode}

    scored = 0
    retries = Counter()  # storage retries of this run's reads, by kind (summary.json)
    startup: dict[str, float] = {"before_ray_s": time.perf_counter() - started}
    itinerary = Itinerary("cpu", "nothing left to score")
    if len(todo):
        # the weights are read (torch imported, ~85 MB parsed) on a thread while Ray starts: nothing on the way
        # to ray.init imports torch (~2.5 s on a 2-core machine, issue 15)
        loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrage-weights")
        state_dict_future = loading.submit(_load_state_dict, weights.path)
        loading.shutdown(wait=False)
        with ray_session(cfg.ray), progress_bar(len(todo), len(manifest), cfg.progress) as bar, \
                committing_on_time(writer):
            startup["ray_started_s"] = time.perf_counter() - started
            state_dict = state_dict_future.result()
            itinerary = choose_itinerary(cfg, cluster_gpus=_cluster_gpus(), nvimgcodec=nvimgcodec_installed())
            log.info("itinerary: %s (%s)", itinerary.path, itinerary.reason)
            startup["weights_loaded_s"] = time.perf_counter() - started
            try:
                for table in _dataset(todo, cfg, state_dict, labels, itinerary, stand_in).iter_batches(
                        batch_format="pyarrow", batch_size=None):
                    startup.setdefault("first_film_s", time.perf_counter() - started)
                    writer.add(table)
                    scored += len(table)
                    retries += retry_counts(table)
                    bar.update(len(table))
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (lifetime.Terminated)
                writer.flush()  # whole rows already scored are worth keeping
                exc.kept = (f"{writer.rows_written} rows scored this run were written to {cfg.output} "
                            f"({len(manifest) - len(todo) + writer.rows_written} of {len(manifest)} in all)")
                raise
            except Exception as exc:
                if type(exc).__name__ != "ExecutionTimeoutError":
                    raise
                writer.flush()  # keep what was scored: the rerun resumes from it
                raise StalledError(
                    f"no image finished for {cfg.ray.no_progress_timeout_s:.0f}s, so the job stopped instead of "
                    f"hanging; {writer.rows_written} rows of this run are saved and rerunning the same command "
                    "resumes. "
                    "Usual causes: the cluster has no room for the predictor (no free GPU, or every CPU held by "
                    "actors), or a storage read that never returns. Ray said: " + str(exc).splitlines()[0]
                ) from exc
            writer.flush()
    summary = _summary(cfg, manifest, weights.sha256, scored, time.perf_counter() - started)
    summary["itinerary"] = {"path": itinerary.path, "reason": itinerary.reason}
    summary["retries"] = dict(sorted(retries.items()))
    if cfg.write_back is not None:  # after scoring, over every ok row of OUTPUT (resumes included)
        from cxrage_ray.pacs.writeback import write_back

        summary["write_back"] = write_back(cfg.output, cfg.write_back, cfg.storage, weights.sha256).as_dict()
    summary["weights_name"] = weights_name
    summary["startup"] = {k: round(v, 3) for k, v in startup.items()}  # seconds since score() began
    log.info("start-up: %s", summary["startup"])
    write_json(cfg.output, "summary.json", summary, cfg.storage)
    if cfg.csv:
        write_original_csv(read_output(cfg.output, cfg.storage), cfg.csv, cfg.storage,
                           weights_name=weights_name)
    return summary


def _load_state_dict(path: Path) -> dict:
    from cxrage_ray.model.checkpoint import load_state_dict

    return load_state_dict(path)


@dataclass(frozen=True)
class Itinerary:
    """Which way the films go: "cpu" (decode + seed chain on CPU tasks) or "device" (bytes to GPU actors)."""

    path: Literal["cpu", "device"]
    reason: str


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


def choose_itinerary(cfg: ScoreConfig, cluster_gpus: int, nvimgcodec: bool) -> Itinerary:
    """The device itinerary when asked for (`on`), or under `auto` when the cluster has GPUs and nvImageCodec is
    installed; the CPU itinerary otherwise, with the reason (it goes into summary.json)."""
    if cfg.gpu_preprocess == "on":
        if not cluster_gpus:
            raise InputError("--gpu-preprocess on, but the Ray cluster has no GPU resources")
        return Itinerary("device", "--gpu-preprocess on")
    if cfg.gpu_preprocess == "off":
        return Itinerary("cpu", "--gpu-preprocess off")
    reasons = [setting for setting, _ in _gpu_blockers(cfg)]
    reasons += ["no GPU in the cluster"] if not cluster_gpus else []
    reasons += ["nvImageCodec is not installed (pip install 'cxrage-ray[gpu]')"] if not nvimgcodec else []
    if reasons:
        return Itinerary("cpu", f"auto: {reasons[0]}")
    return Itinerary("device", "auto: GPU and nvImageCodec present")


def nvimgcodec_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _dataset(todo: pd.DataFrame, cfg: ScoreConfig, state_dict: dict, labels: dict[str, str], itinerary: Itinerary,
             stand_in: CeilingStandIn | None = None):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts finished rows across resumes
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s
    settings = PrepareSettings(storage=cfg.storage, decode=cfg.decode, preprocess=cfg.preprocess, orient=cfg.orient)
    gpus = _gpus_for_inference(cfg)
    predictor = cfg.predictor
    if predictor.batch_size <= 0:  # auto: large batches keep a GPU busy; a CPU gains nothing beyond ~64 views
        predictor = replace(predictor, batch_size=GPU_BATCH_VIEWS if gpus else CPU_BATCH_VIEWS)
    images_per_batch = max(1, predictor.batch_size // (5 if predictor.tta == "seed" else 1))
    per_task = cfg.ray.rows_per_task_for(cfg.preprocess)
    first = first_block_rows(per_task, images_per_batch)
    starts = [0, *range(first, len(todo), per_task)] if len(todo) > first else [0]
    blocks = [todo.iloc[i:j] for i, j in zip(starts, [*starts[1:], len(todo)])]
    state_ref = [ray.put(state_dict)]
    # from_blocks computes the blocks' metadata here; from_pandas ran a remote task per block for it, which on a
    # 2-core node waited for worker processes to start and held the whole itinerary back ~8 s (issue 15)
    rows = ray.data.from_blocks(blocks)
    # the scheduler places prepare tasks by the memory their worst film may take, not only by CPU
    prepare_memory = prepare_memory_request(cfg.decode.max_pixels, _largest_node_memory())
    if itinerary.path == "device":
        from cxrage_ray.pipeline.device_stages import DeviceScoreStage, prepare_encoded_batch

        if stand_in is not None:
            raise ValueError("the benchmark stand-in runs on the CPU itinerary only (--gpu-preprocess off)")
        return (
            rows.map_batches(prepare_encoded_batch, fn_kwargs={"settings": settings}, batch_format="pandas",
                             batch_size=None, num_cpus=1, memory=prepare_memory)
            .map_batches(
                DeviceScoreStage,
                fn_constructor_kwargs={"state_dict_ref": state_ref, "predictor_config": predictor, "labels": labels,
                                       "orient": cfg.orient, "saliency": cfg.saliency},
                batch_format="pandas", batch_size=images_per_batch,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus)), num_gpus=1, num_cpus=1,
            )
        )
    if gpus:
        actors, actor_cpus = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus), 1.0
    else:
        layout = cpu_inference_layout(cfg.ray.predict_actors, _embedded_cores(cfg.ray))
        if predictor.num_threads == 0:  # a count the caller chose is kept
            predictor = replace(predictor, num_threads=layout.threads)
        log.info("CPU inference: %d predictor actor(s), torch threads each: %s", layout.actors,
                 predictor.num_threads or "every core of its node")
        actors, actor_cpus = ray.data.ActorPoolStrategy(size=layout.actors), _cpu_predictor_cpus(layout.actors)
    engine = "exact" if cfg.preprocess == "seed" else "none"
    return (
        rows.map_batches(prepare_batch if stand_in is None else read_bytes_batch, fn_kwargs={"settings": settings},
                         batch_format="pandas", batch_size=None, num_cpus=1, memory=prepare_memory)
        .map_batches(
            PredictStage,
            fn_constructor_kwargs={"state_dict_ref": state_ref, "predictor_config": predictor,
                                   "labels": {**labels, "decode_device": "cpu", "preprocess_engine": engine},
                                   "saliency": cfg.saliency, "stand_in": stand_in},
            batch_format="pandas",
            batch_size=images_per_batch,
            compute=actors,
            num_gpus=1 if gpus else 0,
            num_cpus=actor_cpus,
        )
    )


def first_block_rows(per_task: int, images_per_batch: int) -> int:
    """Rows of the first block (one CPU task): no more than a seed-chain task's, so the predictor starts on it
    while the larger blocks follow, but no fewer than one predictor batch: Ray Data gathers an actor's input
    until it holds a whole batch, so a smaller first block only waited for the second (~2 s on 2 cores, issue 15).
    """
    return min(per_task, max(SEED_ROWS_PER_TASK, images_per_batch))


@dataclass(frozen=True)
class CpuInference:
    """How CPU inference is laid out: `actors` predictor actors of `threads` torch threads each (0: every core of
    the actor's node)."""

    actors: int
    threads: int


def cpu_inference_layout(actors: int, cores: int | None) -> CpuInference:
    """The torch threads of each of `actors` CPU predictor actors.

    In:  `--predict-actors`; the embedded node's cores (None on a cluster, whose nodes' cores are their actors' own).
    Out: on the embedded node the cores are split between the actors (`cores // actors` threads, at least one):
         N actors each running torch on every core would ask N times the cores there are. On a cluster, every core
         of the actor's own node.

    One actor on every core stays the default: single-threaded actors beat it by ~20% in a two-process experiment
    with a little CPU noise beside them, but not in the pipeline itself (issue 15, benchmarks/README.md).
    """
    return CpuInference(actors=actors, threads=0 if cores is None else max(1, cores // actors))


def _embedded_cores(rc: RayConfig) -> int | None:
    """The cores inference may use on the embedded local Ray (this process's CPUs, at most `--num-cpus`); None when
    the job runs on a cluster."""
    if rc.address:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, rc.num_cpus or cores))


#: Bytes one prepare task may hold per pixel of the largest film it accepts (`DecodeOptions.max_pixels`): a 16-bit
#: grey film at the limit is held as uint16 (2 B/px) beside its 8-bit levels (1 B/px); the decoder's buffers and the
#: resize's float64 bands add the rest. Measured by benchmarks/hostile.py: a 16384² 16-bit PNG (the default limit,
#: 268 M px) peaks at ~1,035 MiB in a fresh process, ~3.6 B/px with the interpreter; 4 B/px rounds that up.
PREPARE_BYTES_PER_PIXEL = 4
#: The prepare worker before any film (interpreter, numpy, Pillow, pydicom, pylibjpeg: ~110-150 MiB measured).
PREPARE_BASE_BYTES = 256 * 2**20


def prepare_memory_request(max_pixels: int, largest_node_memory: float) -> int:
    """The Ray `memory` (bytes) a prepare task declares: its worst film's budget, bounded so it always fits.

    In:  the decoders' pixel limit and the largest `memory` resource one node offers (0 when none is reported).
    Out: max_pixels * PREPARE_BYTES_PER_PIXEL + PREPARE_BASE_BYTES (~1.3 GB at the default limit), but never
         more than half the largest node's memory — a request no node can meet would leave every prepare task
         pending forever (Ray reports no error) — and 0 (no request) when the cluster reports no memory.
    """
    budget = max_pixels * PREPARE_BYTES_PER_PIXEL + PREPARE_BASE_BYTES
    return int(min(budget, largest_node_memory // 2)) if largest_node_memory > 0 else 0


def _largest_node_memory() -> float:
    """The largest `memory` resource (bytes) of one live node of the connected Ray cluster."""
    import ray

    return max((node.get("Resources", {}).get("memory", 0.0) for node in ray.nodes() if node.get("Alive")),
               default=0.0)


def _cpu_predictor_cpus(actors: int = 1) -> float:
    """Logical CPUs one CPU predictor actor reserves.

    A lone actor runs torch on several threads, so it asks for 2 where the cluster has room; several actors ask
    for 0.5 each, so the prepare tasks keep their parallelism (the operating system shares the cores). The request
    must differ from the prepare tasks' 1 CPU, or Ray Data fuses both stages into the actor and decode then runs
    serially inside inference.
    """
    import ray

    return 2 if actors == 1 and ray.cluster_resources().get("CPU", 0) >= 4 else 0.5


def _gpus_for_inference(cfg: ScoreConfig) -> int:
    gpus = _cluster_gpus()
    if cfg.predictor.device == "cuda" and not gpus:
        raise InputError("--device cuda, but the Ray cluster has no GPU resources")
    return 0 if cfg.predictor.device == "cpu" else gpus


@contextlib.contextmanager
def ray_session(rc: RayConfig) -> Iterator[None]:
    """Join `rc.address`, or start an embedded local Ray (reused, not stopped, if one is already up).

    The embedded Ray's processes die with this one even when it is killed with SIGKILL (`lifetime.reaped_on_kill`),
    and SIGTERM stops the job like Ctrl-C (`lifetime.terminate_as_interrupt`, put back by `raise_on_sigterm` after
    `ray.init` installed a handler of its own, and kept until Ray has shut down).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a cluster job keeps Ray's worker output in its job log; the embedded Ray keeps it off the terminal
    loud = rc.verbose or bool(rc.address)
    kwargs: dict[str, Any] = {"include_dashboard": False, **ray_init_options(loud)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())  # left after ray.shutdown: a SIGTERM during it is ours too
        if rc.address:
            ray.init(address=rc.address, **kwargs)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # entered first, left last: after ray.shutdown below
            stack.enter_context(reaped_on_kill(at_exit=rc.stop_at_exit))
            # address="local": always a new embedded instance, never a cluster another process on this machine
            # advertised in /tmp/ray/ray_current_cluster (`ray start`, ray.cluster_utils.Cluster)
            ray.init(address="local", num_cpus=rc.num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS),
                     **kwargs)
        quiet_ray_console(loud)
        stack.enter_context(native_stderr_to_session_log(loud))
        if rc.address or not rc.stop_at_exit:  # else the watcher stops Ray when this process exits
            stack.callback(ray.shutdown)  # inside the redirect: shutdown's complaints about dying actors stay in the log
        raise_on_sigterm()  # ray.init replaced our handler with its own sys.exit
        yield


def _job_record(manifest: pd.DataFrame, cfg: ScoreConfig, weights_sha256: str) -> dict[str, Any]:
    """What makes two runs the same job: the manifest rows and every setting that changes a score."""
    rows = pd.util.hash_pandas_object(manifest[["row_id", "image_id", "uri"]].astype(str), index=False)
    return {
        "manifest_rows": len(manifest),
        "manifest_fingerprint": f"{int(rows.sum()) & (2**64 - 1):016x}",
        "weights_sha256": weights_sha256,
        "preprocess": cfg.preprocess,
        "tta": cfg.predictor.tta,
        "decode": cfg.decode.mode,
        "orient": repr(cfg.orient),
    }


#: job.json keys that describe a job without defining it: older outputs lack them, and resume still applies.
JOB_INFO_KEYS = ("weights_name",)


def _rows_to_score(manifest: pd.DataFrame, job: dict[str, Any], cfg: ScoreConfig, spill: Spill | None = None
                   ) -> pd.DataFrame:
    move_legacy_records(cfg.output, cfg.storage)  # job.json/summary.json of older outputs -> OUTPUT/_cxrage/
    previous = read_json(cfg.output, "job.json", cfg.storage)
    defining = [k for k in job if k not in JOB_INFO_KEYS]
    conflict = previous is not None and any(previous.get(k) != job[k] for k in defining)
    if conflict and committed_parts(cfg.output, cfg.storage):  # a record without rows binds nothing
        if not cfg.overwrite:
            changed = sorted(k for k in defining if previous.get(k) != job[k])
            raise InputError(
                f"{cfg.output} holds results of a different job (differs in: {', '.join(changed)}); "
                "choose another OUTPUT or pass --overwrite to discard them"
            )
        fs, path = filesystem_for(f"{cfg.output.rstrip('/')}/{PARTS_DIR}", cfg.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    write_json(cfg.output, "job.json", job, cfg.storage)
    if cfg.retry_errors is not None:
        dropped = drop_error_rows(cfg.output, cfg.storage, cfg.retry_errors)
        log.warning("--retry-errors: %d error rows%s will be scored again", dropped,
                    f" ({', '.join(cfg.retry_errors)})" if cfg.retry_errors else "")
    if spill is not None and spill.restore(lambda name, data: commit_part(cfg.output, name, data, cfg.storage)):
        log.warning("rows an earlier run could not write to OUTPUT were committed from %s", spill.folder)
    done = completed_row_ids(cfg.output, cfg.storage)
    if done:
        log.info("resuming: %d of %d rows already scored", len(done), len(manifest))
    return manifest[~manifest["row_id"].isin(done)].reset_index(drop=True)


def _summary(cfg: ScoreConfig, manifest: pd.DataFrame, sha: str, scored: int, elapsed: float) -> dict[str, Any]:
    table = read_output(cfg.output, cfg.storage).select(["row_id", "status", "error", "qc"]).to_pandas()
    errors = table.loc[table["status"] == "error", "error"].fillna("Error: ?")
    kinds = Counter(errors.map(error_kind))
    flags = Counter(flag for qc in table["qc"] if qc is not None for flag in qc)
    import numpy
    import ray
    import torch

    return {
        "input": cfg.input,
        "output": cfg.output,
        "rows_total": len(manifest),
        "rows_written": len(table),
        "rows_unique": int(table["row_id"].nunique()),
        "rows_ok": int((table["status"] == "ok").sum()),
        "rows_error": int((table["status"] == "error").sum()),
        "errors_by_kind": dict(sorted(kinds.items())),
        "qc_flags": dict(sorted(flags.items())),
        "complete": int(table["row_id"].nunique()) == len(manifest),
        # every part listed here is whole: parts only appear by atomic rename / single PUT
        "parts": sorted(u.rsplit("/", 1)[-1] for u in committed_parts(cfg.output, cfg.storage)),
        "rows_scored_this_run": scored,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(scored / elapsed, 3) if elapsed > 0 else None,
        "weights_sha256": sha,
        "settings": {"preprocess": cfg.preprocess, "tta": cfg.predictor.tta, "decode": cfg.decode.mode,
                     "device": cfg.predictor.device, "precision": cfg.predictor.precision},
        "ray": asdict(cfg.ray),
        "versions": {"cxrage_ray": cxrage_ray.__version__, "torch": torch.__version__, "ray": ray.__version__,
                     "numpy": numpy.__version__, "pyarrow": pa.__version__, "python": platform.python_version()},
    }
