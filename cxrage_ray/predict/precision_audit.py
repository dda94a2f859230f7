"""The precision audit: with mixed precision, a deterministic sample of films is also scored in fp32.

In:  a scored batch (rows with `row_id`, `status`, `cxr_age`), the pictures it was scored from, and an fp32
     reference predictor (`AgePredictor` with precision fp32, same weights and TTA).
Out: the batch's `PRECISION_DELTA_COLUMN` (cxr_age mixed minus cxr_age fp32, years; NaN for films not audited);
     on the driver, `AuditTally` turns those column values into summary.json's `precision_audit`.

Which films: every film whose row id hashes (blake2b, stable across processes and runs) into 1 of 256 buckets,
plus the first `AUDIT_FIRST` ok films each scoring actor sees, so a run of any size compares at least that many
(with streaming batches the actor cannot know in advance how many films it will get). So a user learns what
mixed precision costs on *their* weights and films, at ~1/256 of an fp32 run's extra work.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.contract import PRECISION_DELTA_COLUMN

log = logging.getLogger(__name__)

#: 1 film in AUDIT_EVERY (by row-id hash) is audited, plus the first AUDIT_FIRST films of each actor.
AUDIT_EVERY, AUDIT_FIRST = 256, 8


def sampled(row_id: Any) -> bool:
    """Whether a row id falls in the audited 1-in-`AUDIT_EVERY` bucket (the same answer in every process)."""
    digest = hashlib.blake2b(str(row_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % AUDIT_EVERY == 0


@dataclass
class PrecisionAuditor:
    """Per scoring actor: picks the audited films of each batch and scores them again with `reference` (fp32)."""

    reference: Any
    first: int = AUDIT_FIRST
    seen: int = field(default=0)

    def audit(self, batch: pd.DataFrame, pictures: dict[int, Any]) -> None:
        """Fill `PRECISION_DELTA_COLUMN` for the batch (scored already: its `cxr_age` is the mixed-precision age)."""
        batch[PRECISION_DELTA_COLUMN] = np.nan
        status = batch["status"].to_numpy()
        ages = batch["cxr_age"].to_numpy(dtype=float)
        row_ids = batch["row_id"].to_numpy() if "row_id" in batch.columns else np.arange(len(batch))
        chosen = []
        for i in sorted(pictures):
            if status[i] != "ok" or not math.isfinite(ages[i]):
                continue
            if self.seen < self.first or sampled(row_ids[i]):
                chosen.append(i)
            self.seen += 1
        if not chosen:
            return
        try:
            fp32 = self.reference.predict([pictures[i] for i in chosen]).cxr_age
        except Exception as exc:  # the audit must never cost a film its score
            log.warning("precision audit skipped for %d film(s): %s", len(chosen), type(exc).__name__)
            return
        column = batch.columns.get_loc(PRECISION_DELTA_COLUMN)
        batch.iloc[chosen, column] = ages[chosen] - fp32


class AuditTally:
    """On the driver: the audit deltas of every scored batch of the run, and summary.json's `precision_audit`."""

    def __init__(self) -> None:
        self.deltas: list[float] = []
        self.precisions: set[str] = set()

    def add(self, table: Any) -> None:
        """Take a batch of scored rows (pyarrow Table or pandas DataFrame); no-op without the audit column."""
        self.take(*audited_films(table))

    def take(self, deltas: list[float], precisions: set[str] | list[str]) -> None:
        """Take deltas already read from a batch (`audited_films`, e.g. in a part's writer)."""
        self.deltas += list(deltas)
        self.precisions.update(precisions)

    def summary(self) -> dict[str, Any] | None:
        """Films compared, max and mean |Δ cxr_age| (years), the precision; None when nothing was audited (fp32)."""
        if not self.deltas:
            return None
        magnitudes = np.abs(np.asarray(self.deltas, dtype=float))
        return {"films": int(magnitudes.size), "max_abs_delta_years": round(float(magnitudes.max()), 6),
                "mean_abs_delta_years": round(float(magnitudes.mean()), 6),
                "precision": ", ".join(sorted(self.precisions)) or "unknown"}


def audited_films(table: Any) -> tuple[list[float], set[str]]:
    """The audit deltas (years) of a batch of scored rows and the precisions that really ran for them ("bfloat16",
    "float16"); ([], set()) without the audit column (fp32)."""
    names = table.column_names if hasattr(table, "column_names") else list(table.columns)
    if PRECISION_DELTA_COLUMN not in names:
        return [], set()
    wanted = [PRECISION_DELTA_COLUMN] + (["device"] if "device" in names else [])
    frame = table.select(wanted).to_pandas() if hasattr(table, "column_names") else table[wanted]
    deltas = pd.to_numeric(frame[PRECISION_DELTA_COLUMN], errors="coerce")
    audited = np.isfinite(deltas.to_numpy(dtype=float))
    precisions: set[str] = set()
    if "device" in frame.columns:  # "cpu/bfloat16", "cuda/float16": the precision that really ran
        precisions = {str(d).rsplit("/", 1)[-1] for d in frame.loc[audited, "device"].dropna()}
    return deltas[audited].tolist(), precisions
