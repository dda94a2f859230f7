"""Resume: which job OUTPUT holds, and which of the manifest's rows are still to score.

In:  the manifest's scan (`cxrage_ray.manifest.stream.ManifestScan`: row count and fingerprint), the `ScoreConfig`,
     the weights' sha256, OUTPUT's job record and committed parts.
Out: the job record written to OUTPUT/_cxrage/job.json (`job_record`, `claim_output`: a different job in OUTPUT is
     refused, or discarded with --overwrite), error rows dropped for --retry-errors (`drop_retried_errors`), what
     earlier runs left settled (`settle_earlier_runs`: uncommitted blocks deleted, spilled parts committed), and
     the row_ids OUTPUT already holds as a sorted int64 array (`finished_row_ids`, 8 bytes per finished row; the
     manifest stream leaves them out batch by batch).

The job's identity is explicit: the manifest's fingerprint and every setting that changes a score, the rotation
list by its hash (`OrientConfig.job_key`), never the list itself. An OUTPUT whose record holds the fingerprint of
a release before the streaming manifest is compared with that same older fingerprint, so it still resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from cxrage_ray.config import OrientConfig, ScoreConfig
from cxrage_ray.errors import InputError
from cxrage_ray.storage.files import filesystem_for
from cxrage_ray.write.parts import (
    PARTS_DIR,
    commit_part,
    committed_parts,
    completed_row_id_array,
    drop_error_rows,
    move_legacy_records,
    read_json,
    write_json,
)
from cxrage_ray.manifest.stream import FINGERPRINT_PREFIX, ManifestScan
from cxrage_ray.write.pending import clear_pending
from cxrage_ray.write.spill import Spill

log = logging.getLogger(__name__)

#: job.json keys that describe a job without defining it: older outputs lack them, and resume still applies.
JOB_INFO_KEYS = ("weights_name",)


def job_record(scan: ManifestScan, cfg: ScoreConfig, weights_sha256: str) -> dict[str, Any]:
    """What makes two runs the same job: the manifest rows (their count and fingerprint, from the scan) and every
    setting that changes a score."""
    return {
        "manifest_rows": scan.rows,
        "manifest_fingerprint": scan.fingerprint,
        "weights_sha256": weights_sha256,
        "preprocess": cfg.preprocess,
        "tta": cfg.predictor.tta,
        "decode": cfg.decode.mode,
        "orient": None if cfg.orient is None else cfg.orient.job_key(),
    }


def differences(previous: dict[str, Any], job: dict[str, Any], orient: OrientConfig | None,
                legacy_fingerprint: Callable[[], str] | None = None) -> list[str]:
    """The defining keys in which OUTPUT's recorded job differs from this one.

    Outputs written before the explicit job key recorded `repr(OrientConfig)` as the orientation's identity: such
    a record is compared with that same string of this job's settings, so old outputs still resume. Likewise a
    fingerprint without `FINGERPRINT_PREFIX` is compared with `legacy_fingerprint()` (computed only then).
    """
    changed = []
    for key in (k for k in job if k not in JOB_INFO_KEYS):
        before, now = previous.get(key), job[key]
        if key == "orient" and isinstance(before, str):
            from cxrage_ray.orient.rotation_list import legacy_orient_repr

            now = legacy_orient_repr(orient)
        if (key == "manifest_fingerprint" and isinstance(before, str) and legacy_fingerprint is not None
                and not before.startswith(FINGERPRINT_PREFIX)):
            now = legacy_fingerprint()
        if before != now:
            changed.append(key)
    return sorted(changed)


def claim_output(job: dict[str, Any], cfg: ScoreConfig, legacy_fingerprint: Callable[[], str] | None = None) -> None:
    """Record `job` in OUTPUT/_cxrage/job.json. An OUTPUT holding a different job's rows is refused, or its parts
    deleted with --overwrite; the records of an older layout are moved into `_cxrage/` first."""
    move_legacy_records(cfg.output, cfg.storage)
    previous = read_json(cfg.output, "job.json", cfg.storage)
    changed = differences(previous, job, cfg.orient, legacy_fingerprint) if previous is not None else []
    if changed and committed_parts(cfg.output, cfg.storage):  # a record without rows binds nothing
        if not cfg.overwrite:
            raise InputError(
                f"{cfg.output} holds results of a different job (differs in: {', '.join(changed)}); "
                "choose another OUTPUT or pass --overwrite to discard them"
            )
        fs, path = filesystem_for(f"{cfg.output.rstrip('/')}/{PARTS_DIR}", cfg.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    write_json(cfg.output, "job.json", job, cfg.storage)


def drop_retried_errors(cfg: ScoreConfig) -> int:
    """--retry-errors / --retry-kinds: rewrite the parts without those error rows, so they are scored again."""
    if cfg.retry_errors is None:
        return 0
    dropped = drop_error_rows(cfg.output, cfg.storage, cfg.retry_errors)
    log.warning("--retry-errors: %d error rows%s will be scored again", dropped,
                f" ({', '.join(cfg.retry_errors)})" if cfg.retry_errors else "")
    return dropped


def settle_earlier_runs(cfg: ScoreConfig, spill: Spill | None) -> None:
    """Delete the blocks an earlier run wrote but never committed (their films are scored again), and commit the
    parts an earlier run kept in the local spill because OUTPUT refused them."""
    cleared = clear_pending(cfg.output, cfg.storage)
    if cleared:
        log.info("%d uncommitted block(s) of an earlier run deleted; their films are scored again", cleared)
    if spill is not None and spill.restore(lambda name, data: commit_part(cfg.output, name, data, cfg.storage)):
        log.warning("rows an earlier run could not write to OUTPUT were committed from %s", spill.folder)


def finished_row_ids(rows: int, cfg: ScoreConfig) -> np.ndarray:
    """The row_ids (sorted int64, each below `rows`) OUTPUT's committed parts hold; only their row_id column is
    read."""
    done = completed_row_id_array(cfg.output, cfg.storage)
    done = done[done < rows]
    if len(done):
        log.info("resuming: %d of %d rows already scored", len(done), rows)
    return done
