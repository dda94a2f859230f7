"""Builds realistic scored OUTPUT folders (what `cxrage score` writes) for tests of readers such as the report.

In:  a folder and a `Cohort` description (size, seed, which columns carry age/sex, the true hazard effect).
Out: OUTPUT/parts/part-*.parquet with the output-contract columns plus carried manifest columns
     (`age`, `sex`, `followup_years`, `died`), OUTPUT/summary.json, and decoys a reader must ignore
     (`_tmp/` and hidden folders holding Parquet with absurd ages, non-Parquet files).

The cohort is simulated so the outcome analysis has a known answer: survival times are exponential with
hazard proportional to exp(beta * CXR-Age), beta = log(hr_per_5y) / 5, censored uniformly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

WEIGHTS_SHA = "0b5a0dbcb91709420c261c749bb9e8f9a8f9287617c2713b86a183c8dbfb7aa7"
ERROR_KINDS = ("DecodeError", "ReadError", "EmptyFileError", "UnsupportedModalityError")
QC_FLAGS = ("low_contrast", "rotated", "inverted")
TIME_COL, EVENT_COL = "followup_years", "died"

#: Output-contract columns as the sink types them, then the carried manifest columns.
SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("cxr_age", pa.float64()), ("raw", pa.float64()), ("raw_sd", pa.float64()),
    ("chronological_age", pa.float64()), ("cxr_age_gap", pa.float64()), ("weights_sha256", pa.string()),
    ("preprocess", pa.string()), ("tta", pa.string()), ("orientation", pa.int64()),
    ("rotation_source", pa.string()), ("qc", pa.list_(pa.string())), ("view_position", pa.string()),
    ("patient_sex", pa.string()),
    ("age", pa.float64()), ("sex", pa.string()), (TIME_COL, pa.float64()), (EVENT_COL, pa.int64()),
])


@dataclass(frozen=True)
class Cohort:
    """What to simulate.

    Args:
        n: rows (inputs), including error rows.
        seed: random seed.
        error_fraction: share of rows that are error rows (kinds cycle through ERROR_KINDS).
        hr_per_5y: true hazard ratio per 5 years of CXR-Age.
        age_in: "chronological_age" (pipeline column filled, manifest `age` too) or "age" (manifest only;
            the pipeline's `chronological_age` is null).
        sex_in: "patient_sex" (pipeline column) or "sex" (manifest column only).
        parts: number of Parquet part files.
    """

    n: int = 600
    seed: int = 0
    error_fraction: float = 0.06
    hr_per_5y: float = 1.6
    age_in: str = "chronological_age"
    sex_in: str = "patient_sex"
    parts: int = 3


def simulate(cohort: Cohort) -> pd.DataFrame:
    """The rows of a scored output (contract columns + manifest columns) as a DataFrame."""
    rng = np.random.default_rng(cohort.seed)
    n = cohort.n
    age = rng.uniform(45, 85, n).round(1)
    sex = rng.choice(["M", "F"], n)
    view = rng.choice(["PA", "AP", "LL"], n, p=[0.6, 0.3, 0.1])
    cxr_age = age + 2.0 * (sex == "M") + 3.0 * (view == "AP") + rng.normal(0, 5, n)
    error = rng.random(n) < cohort.error_fraction
    kinds = np.array(ERROR_KINDS)[np.arange(n) % len(ERROR_KINDS)]

    beta = np.log(cohort.hr_per_5y) / 5.0
    hazard = 0.03 * np.exp(beta * (cxr_age - 65.0))
    death = rng.exponential(1.0 / hazard)
    censor = rng.uniform(2.0, 12.0, n)
    time = np.minimum(death, censor).round(3)
    died = (death <= censor).astype(np.int64)

    qc = [[f for f in QC_FLAGS if rng.random() < 0.08] for _ in range(n)]
    uri = [f"/archive/cxr/{i:05d}.png" for i in range(n)]
    ok = ~error
    frame = pd.DataFrame({
        "row_id": np.arange(n, dtype=np.int64),
        "image_id": [f"{i:05d}" for i in range(n)],
        "uri": uri,
        "status": np.where(ok, "ok", "error"),
        "error": [None if o else f"{k}: cannot process {u}" for o, k, u in zip(ok, kinds, uri)],
        "cxr_age": np.where(ok, cxr_age, np.nan),
        "raw": np.where(ok, (cxr_age - 62.0) / 8.0, np.nan),
        "raw_sd": np.where(ok, rng.uniform(0.05, 0.3, n), np.nan),
        "chronological_age": age if cohort.age_in == "chronological_age" else np.full(n, np.nan),
        "weights_sha256": WEIGHTS_SHA,
        "preprocess": "seed",
        "tta": "seed",
        "orientation": np.where(ok, 0, -1),
        "rotation_source": np.where(ok, "none", None),
        "qc": qc,
        "view_position": view,
        "patient_sex": sex if cohort.sex_in == "patient_sex" else np.full(n, None),
        "age": age,
        "sex": sex if cohort.sex_in == "sex" else np.full(n, None),
        TIME_COL: time,
        EVENT_COL: died,
    })
    frame["cxr_age_gap"] = frame["cxr_age"] - frame["chronological_age"]
    # error rows keep their manifest columns (carried through) but no pipeline-derived values
    frame.loc[error, ["view_position", "qc"]] = None
    return frame


def write_scored_output(root: Path, cohort: Cohort = Cohort(), *, summary: bool = True,
                        decoys: bool = True) -> pd.DataFrame:
    """Write a scored OUTPUT folder at `root`; returns the rows written (excluding decoys)."""
    frame = simulate(cohort)
    parts = root / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), cohort.parts)):
        table = pa.Table.from_pandas(frame.iloc[chunk], schema=SCHEMA, preserve_index=False)
        pq.write_table(table, parts / f"part-{cohort.seed:04x}-{i:05d}.parquet", compression="zstd")
    if decoys:
        junk = frame.head(5).assign(cxr_age=999.0, status="ok", error=None)
        for folder in ("_tmp", ".staging"):
            (root / folder).mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pandas(junk, schema=SCHEMA, preserve_index=False),
                           root / folder / "part-unfinished.parquet")
        (parts / "README.txt").write_text("not parquet\n")
        (root / "job.json").write_text(json.dumps({"input": "/archive/manifest.csv"}))
    if summary:
        n_ok = int((frame["status"] == "ok").sum())
        (root / "summary.json").write_text(json.dumps({
            "input": "/archive/manifest.csv", "output": str(root), "rows_total": len(frame),
            "rows_ok": n_ok, "rows_error": len(frame) - n_ok, "rows_scored_this_run": len(frame),
            "elapsed_s": 12.5, "images_per_s": round(len(frame) / 12.5, 3), "complete": True,
            "weights_sha256": WEIGHTS_SHA,
            "settings": {"preprocess": "seed", "tta": "seed", "device": "cpu", "precision": "fp32"},
            "versions": {"cxrage_ray": "0.1.0", "torch": "2.14.1", "ray": "2.60.0", "python": "3.11.2"},
        }))
    return frame
