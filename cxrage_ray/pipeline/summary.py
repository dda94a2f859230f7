"""The job's summary: what OUTPUT holds after a run, written to OUTPUT/_cxrage/summary.json.

In:  the `ScoreConfig`, the manifest's row count, the weights' sha256, this run's count and time, OUTPUT's committed parts.
Out: a JSON-ready dict: rows total/written/ok/error, errors by kind, the first error rows by film name, QC flags,
     parts, speed, settings, versions.
"""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import cxrage_ray
from cxrage_ray.config import ScoreConfig
from cxrage_ray.errors import error_kind
from cxrage_ray.runtime.console import ERRORS_NAMED, named_errors
from cxrage_ray.write.parts import committed_parts, read_output


def summarise(cfg: ScoreConfig, rows_total: int, sha: str, scored: int, elapsed: float) -> dict[str, Any]:
    output = read_output(cfg.output, cfg.storage)
    first_errors = output.filter(pc.equal(output["status"], "error")).slice(0, ERRORS_NAMED)
    table = output.select(["row_id", "status", "error", "qc"]).to_pandas()
    errors = table.loc[table["status"] == "error", "error"].fillna("Error: ?")
    kinds = Counter(errors.map(error_kind))
    flags = Counter(flag for qc in table["qc"] if qc is not None for flag in qc)
    import numpy
    import ray

    return {
        "input": cfg.input,
        "output": cfg.output,
        "rows_total": rows_total,
        "rows_written": len(table),
        "rows_unique": int(table["row_id"].nunique()),
        "rows_ok": int((table["status"] == "ok").sum()),
        "rows_error": int((table["status"] == "error").sum()),
        "errors_by_kind": dict(sorted(kinds.items())),
        "first_errors": named_errors(first_errors.select(["row_id", "image_id", "uri", "error"]).to_pylist()),
        "qc_flags": dict(sorted(flags.items())),
        "complete": int(table["row_id"].nunique()) == rows_total,
        # every part listed here is whole: parts only appear by atomic rename / single PUT
        "parts": sorted(u.rsplit("/", 1)[-1] for u in committed_parts(cfg.output, cfg.storage)),
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
