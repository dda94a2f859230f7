"""The job's summary: what OUTPUT holds after a run, written to OUTPUT/_cxrage/summary.json.

In:  the `ScoreConfig`, the manifest's row count, the weights' sha256, this run's count and time, the records in
     the footers of OUTPUT's committed parts (`cxrage_ray.write.records`).
Out: a JSON-ready dict: rows total/written/ok/error, errors by kind, the first error rows by film name, QC flags,
     parts, speed, settings, versions.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Any

import pyarrow as pa

import cxrage_ray
from cxrage_ray.config import ScoreConfig
from cxrage_ray.runtime.console import named_errors
from cxrage_ray.write.parts import part_records
from cxrage_ray.write.records import PartRecord


def summarise(cfg: ScoreConfig, rows_total: int, sha: str, scored: int, elapsed: float,
              rows_unique: int) -> dict[str, Any]:
    """summary.json from the committed parts' records (their footers, `part_records`), not their rows.

    `rows_unique`: the distinct row_ids OUTPUT held when the run began (resume read them) plus the rows this run
    committed: those are rows no part held before (the manifest stream left them out), each in one part
    (`cxrage_ray.write.pending`)."""
    parts = part_records(cfg.output, cfg.storage)
    total = PartRecord()
    for _, record in parts:
        total = total.merged(record)
    import numpy
    import ray

    return {
        "input": cfg.input,
        "output": cfg.output,
        "rows_total": rows_total,
        "rows_written": total.rows,
        "rows_unique": rows_unique,
        "rows_ok": total.ok,
        "rows_error": total.errors,
        "errors_by_kind": total.errors_by_kind,
        "first_errors": named_errors(total.first_errors),
        "qc_flags": total.qc_flags,
        "complete": rows_unique == rows_total and total.rows == rows_total,
        # every part listed here is whole: parts only appear by atomic rename / single PUT
        "parts": sorted(name for name, _ in parts),
        "rows_scored_this_run": scored,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(scored / elapsed, 3) if elapsed > 0 else None,
        "weights_sha256": sha,
        "settings": {"preprocess": cfg.preprocess, "tta": cfg.predictor.tta, "decode": cfg.decode.mode,
                     "device": cfg.predictor.device, "precision": cfg.predictor.precision},
        "ray": asdict(cfg.ray),
        "versions": {"cxrage_ray": cxrage_ray.__version__, "torch": _version("torch"), "ray": ray.__version__,
                     "numpy": numpy.__version__, "pyarrow": pa.__version__, "python": platform.python_version()},
    }


def _version(package: str) -> str:
    """An installed package's version without importing it (the driver of an embedded job may never import
    torch, `cxrage_ray.model.weights_file`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
