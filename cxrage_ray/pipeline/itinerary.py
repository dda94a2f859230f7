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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from cxrage_ray.pipeline.resume import claim_output, drop_retried_errors, finished_row_ids, job_record, settle_earlier_runs
from cxrage_ray.pipeline.summary import summarise
from cxrage_ray.runtime.console import progress_bar
from cxrage_ray.runtime.lifetime import Terminated
from cxrage_ray.runtime.session import cluster_facts, ray_session
from cxrage_ray.write.committer import PartCommitter, commit_on_ray, committing_on_time
from cxrage_ray.write.original_csv import write_original_csv
from cxrage_ray.write.parts import write_json
from cxrage_ray.write.pending import BlockRecord, PendingWrite
from cxrage_ray.write.spill import Spill

log = logging.getLogger(__name__)


def score(cfg: ScoreConfig, weights_home: Path, manifest: ManifestSource | None = None) -> dict[str, Any]:
    """Run a scoring job to completion (or resume one); returns the summary written to summary.json.

    `manifest`: INPUT opened when the caller did it already (the CLI does, before importing torch).
    """
    job = open_job(cfg, weights_home, manifest)
    return finish_job(job, run_job(job, weights_home))


@dataclass
class OpenJob:
    """A job ready to run: what is left to score of the manifest, and where its rows go (`open_job`)."""

    cfg: ScoreConfig
    manifest: ManifestSource
    scan: ManifestScan
    weights: ResolvedWeights
    weights_name: str
    done: np.ndarray  # row_ids OUTPUT holds already
    committer: PartCommitter
    write: PendingWrite
    started: float
    startup: dict[str, float] = field(default_factory=dict)  # seconds since the job was opened, by milestone

    @property
    def todo(self) -> int:
        return self.scan.rows - len(self.done)

    @property
    def labels(self) -> dict[str, str]:
        return {"weights_sha256": self.weights.sha256, "weights_name": self.weights_name,
                "preprocess": self.cfg.preprocess, "tta": self.cfg.predictor.tta, "decode": self.cfg.decode.mode}

    def mark(self, milestone: str) -> None:
        self.startup.setdefault(milestone, time.perf_counter() - self.started)


def open_job(cfg: ScoreConfig, weights_home: Path, manifest: ManifestSource | None = None) -> OpenJob:
    """INPUT scanned, the weights resolved, OUTPUT claimed for this job and settled (see `pipeline.resume`), and
    the row_ids it holds read; nothing started on Ray."""
    started = time.perf_counter()
    check_gpu_request(cfg)
    if manifest is None:
        manifest = open_manifest(cfg.input, cfg.storage, uri_column=cfg.uri_column)
    scan = scan_manifest(manifest)  # every row once, 8 bytes a row kept: fingerprint, duplicate ids
    scanned = time.perf_counter() - started
    weights = resolve_weights(cfg.weights, weights_home, cfg.allow_fetch)
    weights_name = name_of_weights(cfg.weights_name, weights)  # the rule `cxrage serve` follows too
    record = job_record(scan, cfg, weights.sha256)
    spill = Spill(cfg.spill_root, cfg.output, record) if cfg.spill_root is not None else None
    claim_output({**record, "weights_name": weights_name}, cfg, legacy_fingerprint=lambda: legacy_fingerprint(manifest))
    drop_retried_errors(cfg)
    settle_earlier_runs(cfg, spill)
    done = finished_row_ids(scan.rows, cfg)
    committer = PartCommitter(cfg.output, cfg.storage, commit_on_ray, part_rows=cfg.part_rows,
                              commit_every_s=cfg.commit_every_s, spill=spill)
    write = PendingWrite(cfg.output, output_schema(carried_schema(manifest, scan)), cfg.storage, committer.run)
    job = OpenJob(cfg, manifest, scan, weights, weights_name, done, committer, write, started,
                  {"manifest_scanned_s": scanned})
    job.mark("before_ray_s")
    return job


def run_job(job: OpenJob, weights_home: Path, plan_hook: Callable[[Plan], Plan] | None = None) -> Itinerary:
    """Score what is left of `job` on Ray and commit it; returns the itinerary taken. `plan_hook`: changes the
    resolved plan before it runs (`benchmarks/pipeline_ceiling.py`'s stand-in; the CLI passes none)."""
    cfg, committer = job.cfg, job.committer
    if not job.todo:
        return Itinerary("cpu", "nothing left to score")
    weights_for_actors = _weights_for_actors(job.weights, weights_home, cfg)
    with ray_session(cfg.ray), progress_bar(job.todo, job.scan.rows, cfg.progress) as bar:
        job.mark("ray_started_s")
        plan = resolve_plan(cfg, job.labels, cluster_facts(cfg.ray, wants_decoder_probe(cfg)))
        plan = plan_hook(plan) if plan_hook is not None else plan
        log.info("itinerary: %s (%s)", plan.itinerary.path, plan.itinerary.reason)
        state = weights_for_actors if isinstance(weights_for_actors, WeightsFile) else weights_for_actors.result()
        job.mark("weights_loaded_s")
        with committing_on_time(committer):
            try:
                dataset = _dataset((job.manifest, job.scan, job.done), plan, state, job.write, cfg)
                for block in arriving_blocks(dataset):
                    job.mark("first_film_s")
                    committer.add(block)
                    bar.update(block.record.rows)
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (lifetime.Terminated)
                committer.flush()  # whole rows already scored are worth keeping
                raise JobInterrupted(
                    f"{committer.rows_written} rows scored this run were written to {cfg.output} "
                    f"({len(job.done) + committer.rows_written} of {job.scan.rows} in all)",
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
    return plan.itinerary


def finish_job(job: OpenJob, itinerary: Itinerary) -> dict[str, Any]:
    """summary.json (from the parts' footers and this run's records), write-back and --csv, part by part."""
    cfg, committer = job.cfg, job.committer
    summary = summarise(cfg, job.scan.rows, job.weights.sha256, committer.rows_received,
                        time.perf_counter() - job.started, rows_unique=len(job.done) + committer.rows_written)
    summary["itinerary"] = {"path": itinerary.path, "reason": itinerary.reason}
    summary["retries"] = dict(sorted(committer.retries.items()))
    summary["precision_audit"] = committer.audit.summary()
    if cfg.write_back is not None:  # after scoring, over every ok row of OUTPUT (resumes included)
        from cxrage_ray.pacs.writeback import write_back

        summary["write_back"] = write_back(cfg.output, cfg.write_back, cfg.storage, job.weights.sha256).as_dict()
    summary["weights_name"] = job.weights_name
    summary["startup"] = {k: round(v, 3) for k, v in job.startup.items()}  # seconds since the job was opened
    log.info("start-up: %s", summary["startup"])
    write_json(cfg.output, "summary.json", summary, cfg.storage)
    if cfg.csv:
        write_original_csv(cfg.output, cfg.csv, cfg.storage, weights_name=job.weights_name)
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
