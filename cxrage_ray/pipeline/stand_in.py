"""Benchmark-only: the pipeline with prepare reduced to reading bytes and the model to a constant.

In:  manifest rows (`read_bytes_batch`) / prepared rows (`StandInPredictor`).
Out: rows with the prepared-row columns whose `pixels` are the file's bytes, unread; a constant score per film.

Everything else is the real `cxrage score` pipeline (Ray Data, the concurrent fetch in `prepare_rows`, the
scoring actor's batch handling, the Parquet writer), so films/s measures what the pipeline itself can carry. It is
put into a plan by `with_stand_in`, which the benchmark passes to `itinerary.run_job` as its plan hook; `score`
never takes one, the CLI never builds it and no flag, config file or environment variable selects it
(tests/test_benchmarks.py checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.config import PrepareSettings
from cxrage_ray.contract import empty_prepared_row
from cxrage_ray.errors import error_text
from cxrage_ray.pipeline.prepare import fetch_row, prepare_rows


@dataclass(frozen=True)
class CeilingStandIn:
    """Benchmark-only stand-in for the model (see the module docstring).

    Args:
        score: the raw output every film gets (any constant: the ages mean nothing).
    """

    score: float = 0.0

    def predictor(self) -> StandInPredictor:
        return StandInPredictor(self)


def with_stand_in(plan: Any) -> Any:
    """The plan (`cxrage_ray.pipeline.plan.Plan`) with `CeilingStandIn` in place of the prepare stage and the model:
    the plan hook `benchmarks/pipeline_ceiling.py` passes to `itinerary.run_job`."""
    from dataclasses import replace

    if plan.itinerary.path != "cpu":
        raise ValueError("the benchmark stand-in runs on the CPU itinerary only (--gpu-preprocess off)")
    return replace(plan, prepare=read_bytes_batch, stand_in=CeilingStandIn())


def read_bytes_batch(batch: pd.DataFrame, settings: PrepareSettings) -> pd.DataFrame:
    """`CeilingStandIn`'s CPU stage: manifest rows -> rows whose `pixels` are the file's bytes, unread."""
    return prepare_rows(batch, settings, _bytes_row)


def _bytes_row(row: Mapping[str, Any], settings: PrepareSettings, fetched: bytes | BaseException | None = None
               ) -> dict[str, Any]:
    """One row of `read_bytes_batch`: the columns `prepare_row` gives, the bytes as a 1-pixel-high picture."""
    data = fetch_row(row, settings.storage)[0] if fetched is None else fetched
    out = empty_prepared_row()
    if isinstance(data, BaseException):
        out.update(status="error", error=error_text(data))
    else:
        out.update(pixels=data, height=1, width=len(data), channels=1)
    return out


@dataclass(frozen=True)
class StandInPrediction:
    raw: np.ndarray
    raw_sd: np.ndarray
    cxr_age: np.ndarray


class StandInPredictor:
    """`CeilingStandIn`'s model: the same `predict` interface as `AgePredictor`, a constant per film, no torch."""

    device = None

    def __init__(self, stand_in: CeilingStandIn):
        self.score = stand_in.score

    def predict(self, images: list[np.ndarray]) -> StandInPrediction:
        raw = np.full(len(images), self.score, dtype=np.float64)
        return StandInPrediction(raw=raw, raw_sd=np.full(len(images), np.nan), cxr_age=raw.copy())
