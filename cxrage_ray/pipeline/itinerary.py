"""The data's itinerary for `cxrage score`, top to bottom, on Ray Data:

    manifest   driver: INPUT opened (a Parquet manifest's footer; a folder listed or a CSV parsed once), one
               scan of every row for the fingerprint and duplicate ids at 8 bytes a row (cxrage_ray.manifest.stream),
               the row_ids already scored read from OUTPUT's parts (resume)
    rows       read tasks stream the manifest unit by unit, minus the rows already scored
                                                                      (pipeline.manifest_reads)
    plan       driver: itinerary, prepare function, scoring actor, resources, batch sizes (plan.resolve_plan)
    prepare    CPU tasks, one of:
                 cpu     fetch, decode, seed chain, orientation          (prepare.prepare_batch)
                 device  fetch, DICOM header, frame 1's codestream        (payloads.prepare_encoded_batch)
    score      actor pool, one actor per GPU or CPU actors: pictures from the plan's source (the prepared pixels,
               or GPU decode + tensor seed chain + orientation, device_pictures), then fastai views + TTA +
               calibration                                            (cxrage_ray.predict.scoring.ScoreActor)
    write      in the scoring actors: each scored batch a pending file under OUTPUT/_cxrage/pending, one small
               record to the driver                                       (cxrage_ray.write.pending)
    commit     driver: every commit window, a task makes one part under OUTPUT/parts of the windows' pending files;
               then summary.json from the parts' footers        (cxrage_ray.write.committer, pipeline.summary)
    write-back driver, optional: a DICOM SR per ok DICOMweb row, stored by STOW-RS (cxrage_ray.pacs.writeback)

Every stage runs without Ray in its own module; this one wires them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxrage_ray.config import ScoreConfig
from cxrage_ray.contract import output_schema
from cxrage_ray.errors import JobInterrupted, StalledError
from cxrage_ray.manifest.build import open_manifest
from cxrage_ray.manifest.stream import ManifestScan, ManifestSource, carried_schema, legacy_fingerprint, scan_manifest
from cxrage_ray.model.registry import ResolvedWeights, resolve_weights
from cxrage_ray.model.registry import weights_name as name_of_weights
from cxrage_ray.model.weights_file import WeightsFile, actors_can_read, remember_loadable
from cxrage_ray.pipeline.plan import Itinerary, Plan, check_gpu_request, resolve_plan, wants_decoder_probe
from cxrage_ray.pipeline.manifest_reads import manifest_dataset
from cxrage_ray.pipeline.resume import finished_rows, job_record
from cxrage_ray.pipeline.summary import summarise
from cxrage_ray.runtime.console import progress_bar
from cxrage_ray.runtime.lifetime import Terminated
from cxrage_ray.runtime.session import cluster_facts, ray_session
from cxrage_ray.write.committer import PartCommitter, commit_on_ray, committing_on_time
from cxrage_ray.write.parts import read_output, write_json, write_original_csv
from cxrage_ray.write.pending import BlockRecord, PendingWrite
from cxrage_ray.write.spill import Spill

log = logging.getLogger(__name__)


def score(cfg: ScoreConfig, weights_home: Path, manifest: ManifestSource | None = None,
          stand_in: Any = None) -> dict[str, Any]:
    """Run a scoring job to completion (or resume one); returns the summary written to summary.json.

    `manifest`: INPUT opened when the caller did it already (the CLI does, before importing torch).
    `stand_in`: benchmark-only (`cxrage_ray.pipeline.stand_in.CeilingStandIn`, `benchmarks/pipeline_ceiling.py`):
    bytes instead of pictures, a constant instead of the model; the CLI never passes it.
    """
    started = time.perf_counter()
    check_gpu_request(cfg)
    if manifest is None:
        manifest = open_manifest(cfg.input, cfg.storage, uri_column=cfg.uri_column)
    scan = scan_manifest(manifest)  # every row once, 8 bytes a row kept: fingerprint, duplicate ids
    startup_scan_s = time.perf_counter() - started
    weights = resolve_weights(cfg.weights, weights_home, cfg.allow_fetch)
    weights_name = name_of_weights(cfg.weights_name, weights)  # the rule `cxrage serve` follows too
    job = job_record(scan, cfg, weights.sha256)
    spill = Spill(cfg.spill_root, cfg.output, job) if cfg.spill_root is not None else None
    done = finished_rows(scan.rows, {**job, "weights_name": weights_name}, cfg, spill,
                         legacy_fingerprint=lambda: legacy_fingerprint(manifest))
    todo = scan.rows - len(done)
    committer = PartCommitter(cfg.output, cfg.storage, commit_on_ray, part_rows=cfg.part_rows,
                              commit_every_s=cfg.commit_every_s, spill=spill)
    write = PendingWrite(cfg.output, output_schema(carried_schema(manifest, scan)), cfg.storage, committer.run)
    labels = {"weights_sha256": weights.sha256, "weights_name": weights_name, "preprocess": cfg.preprocess,
              "tta": cfg.predictor.tta, "decode": cfg.decode.mode}

    startup: dict[str, float] = {"manifest_scanned_s": startup_scan_s, "before_ray_s": time.perf_counter() - started}
    itinerary = Itinerary("cpu", "nothing left to score")
    if todo:
        weights_for_actors = _weights_for_actors(weights, weights_home, cfg)
        with ray_session(cfg.ray), progress_bar(todo, scan.rows, cfg.progress) as bar:
            startup["ray_started_s"] = time.perf_counter() - started
            plan = resolve_plan(cfg, labels, cluster_facts(cfg.ray, wants_decoder_probe(cfg)), stand_in)
            itinerary = plan.itinerary
            log.info("itinerary: %s (%s)", itinerary.path, itinerary.reason)
            state = weights_for_actors if isinstance(weights_for_actors, WeightsFile) else weights_for_actors.result()
            startup["weights_loaded_s"] = time.perf_counter() - started
            with committing_on_time(committer):
                try:
                    dataset = _dataset((manifest, scan, done), plan, state, write, cfg)
                    for block in arriving_blocks(dataset):
                        startup.setdefault("first_film_s", time.perf_counter() - started)
                        committer.add(block)
                        bar.update(block.record.rows)
                except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (lifetime.Terminated)
                    committer.flush()  # whole rows already scored are worth keeping
                    raise JobInterrupted(
                        f"{committer.rows_written} rows scored this run were written to {cfg.output} "
                        f"({scan.rows - todo + committer.rows_written} of {scan.rows} in all)",
                        terminated=isinstance(exc, Terminated)) from exc
                except _execution_timeout() as exc:
                    committer.flush()  # keep what was scored: the rerun resumes from it
                    raise StalledError(
                        f"no image finished for {cfg.ray.no_progress_timeout_s:.0f}s, so the job stopped instead "
                        f"of hanging; {committer.rows_written} rows of this run are saved and rerunning the same "
                        "command resumes. "
                        "Usual causes: the cluster has no room for the predictor (no free GPU, or every CPU held "
                        "by actors), or a storage read that never returns. Ray said: " + str(exc).splitlines()[0]
                    ) from exc
                committer.flush()
    summary = summarise(cfg, scan.rows, weights.sha256, committer.rows_received, time.perf_counter() - started,
                        rows_unique=len(done) + committer.rows_written)
    summary["itinerary"] = {"path": itinerary.path, "reason": itinerary.reason}
    summary["retries"] = dict(sorted(committer.retries.items()))
    summary["precision_audit"] = committer.audit.summary()
    if cfg.write_back is not None:  # after scoring, over every ok row of OUTPUT (resumes included)
        from cxrage_ray.pacs.writeback import write_back

        summary["write_back"] = write_back(cfg.output, cfg.write_back, cfg.storage, weights.sha256).as_dict()
    summary["weights_name"] = weights_name
    summary["startup"] = {k: round(v, 3) for k, v in startup.items()}  # seconds since score() began
    log.info("start-up: %s", summary["startup"])
    write_json(cfg.output, "summary.json", summary, cfg.storage)
    if cfg.csv:
        write_original_csv(read_output(cfg.output, cfg.storage), cfg.csv, cfg.storage, weights_name=weights_name)
    return summary


def arriving_blocks(dataset: Any) -> Iterator[BlockRecord]:
    """The scoring actors' block records (one per scored batch: the pending file and its counts, never the rows),
    each as soon as it is done.

    Ray Data's default (`prefetch_batches=1`) holds every block back until the next one is there, which kept the
    first scored rows from OUTPUT for one more predictor batch (~5-8 s on 2 CPU cores, issue 23); the driver only
    commits, so fetching ahead gains nothing."""
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        for row in table.to_pylist():
            yield BlockRecord.from_row(row)


def _weights_for_actors(weights: ResolvedWeights, home: Path, cfg: ScoreConfig) -> WeightsFile | Future:
    """Where the scoring actors get their weights: on the embedded Ray (this machine), weights known to load are
    handed over as the file, which the actors read themselves (`WeightsFile`: this process never imports torch);
    otherwise the state dict, parsed on a thread while Ray starts (nothing on the way to ray.init imports torch,
    ~2.5 s on a 2-core machine, issue 15) so a bad file fails here with its own message, and shipped through the
    object store."""
    if not cfg.ray.address and actors_can_read(weights, home):
        return WeightsFile(weights.path, weights.sha256)
    loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrage-weights")
    state_dict = loading.submit(_load_state_dict, weights.path, weights.sha256, home)
    loading.shutdown(wait=False)
    return state_dict


def _load_state_dict(path: Path, sha256: str, home: Path) -> dict:
    from cxrage_ray.model.checkpoint import load_state_dict

    state_dict = load_state_dict(path)
    remember_loadable(home, sha256)  # the next job on this machine hands its actors the file
    return state_dict


def _execution_timeout() -> type[BaseException]:
    """Ray Data's no-progress timeout (`DataContext.execution_no_progress_timeout_s`); a Ray without it never
    raises it."""
    try:
        from ray.data.exceptions import ExecutionTimeoutError
    except ImportError:  # Ray before the no-progress guard
        return type("NeverRaised", (Exception,), {})
    return ExecutionTimeoutError


def _dataset(todo: tuple[ManifestSource, ManifestScan, np.ndarray], plan: Plan, state: WeightsFile | dict,
             write: PendingWrite, cfg: ScoreConfig):
    """The plan as a Ray Dataset: the manifest's rows still to score (`todo`: the source, its scan, the row_ids
    already scored), streamed by read tasks -> prepare tasks -> scoring actors, which write their rows (`write`)
    and yield block records; `state`: the weights file the actors read, or the state dict they get through the
    object store."""
    import ray

    from cxrage_ray.predict.scoring import ScoreActor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts finished rows across resumes
    if hasattr(ctx, "execution_no_progress_timeout_s"):
        ctx.execution_no_progress_timeout_s = cfg.ray.no_progress_timeout_s
    threads = plan.predictor.num_threads or "every core of its node"
    if plan.actor_gpus:
        log.info("GPU inference: %d-%d scoring actor(s), %d films per batch", *plan.actors, plan.images_per_batch)
    else:
        log.info("CPU inference: %d predictor actor(s), %d batch(es) at once each, torch threads each: %s",
                 plan.actors[1], plan.actor_calls, threads)
    # blocks of one prepare task's rows, cut as the read tasks stream the manifest
    rows = manifest_dataset(*todo, plan.rows_per_task, plan.first_block_rows)
    min_actors, max_actors = plan.actors
    return (
        # the scheduler places prepare tasks by the memory their worst film may take, not only by CPU
        rows.map_batches(plan.prepare, fn_kwargs={"settings": plan.settings}, batch_format="pandas",
                         batch_size=None, num_cpus=1, memory=plan.prepare_memory)
        .map_batches(
            ScoreActor,
            fn_constructor_kwargs=plan.actor_kwargs([state if isinstance(state, WeightsFile) else ray.put(state)],
                                                    write),
            batch_format="pandas",
            batch_size=plan.images_per_batch,
            # actor_calls > 1: batches scored at once on the actor's threads, each on one torch thread (plan.py)
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                                               max_concurrent_calls_per_actor=plan.actor_calls,
                                               enable_true_multi_threading=plan.actor_calls > 1),
            num_gpus=plan.actor_gpus,
            num_cpus=plan.actor_cpus,
        )
    )
