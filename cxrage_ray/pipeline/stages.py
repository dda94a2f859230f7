"""Batch-level wrappers that let Ray Data run the pure stages (read, decode, preprocess, orient, predict).

Each wrapper takes and returns a pandas DataFrame of rows and never raises for a bad file: a row that
fails becomes `status="error"` with `error="<Kind>: message"`, and every input row yields one output row.

- `PrepareSettings` + `prepare_batch`: CPU stage. uri -> bytes -> DecodedImage -> seed chain -> orientation,
  emitting the 8-bit picture as compact bytes (`pixels`, `height`, `width`, `channels`) plus metadata.
- `PredictStage`: the inference actor wrapping `AgePredictor`; drops the pixels and adds the scores.
- `CeilingStandIn`: benchmark-only; bytes instead of pictures and a trivial model, to measure what the pipeline
  alone can carry (`benchmarks/pipeline_ceiling.py`).

A row the manifest marked (`cxrage_ray.manifest.build.PROBLEM_COLUMN`: empty uri, duplicate image_id) is not
fetched: it becomes a `ManifestError` row. Prepared rows also carry `RETRIES_COLUMN`, the storage retries
their read took by kind (JSON), which the driver sums into summary.json; it is not an output column.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from cxrage_ray.config import PrepareSettings, SaliencySettings
from cxrage_ray.decode.image import DecodedImage, decode_image, is_dicom
from cxrage_ray.errors import CxrAgeError, DecodeError, FlaggedSkipped, ManifestError, error_text
from cxrage_ray.manifest.build import PROBLEM_COLUMN
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import RetryCounts, read_bytes

log = logging.getLogger(__name__)

PIXEL_COLUMNS = ["pixels", "height", "width", "channels"]
#: Per prepared row: the storage retries its read took, as JSON ``{"SlowDown": 2}`` (``{}`` for none).
RETRIES_COLUMN = "read_retries"
META_COLUMNS = ["modality", "view_position", "body_part", "patient_sex", "study_date", "frames", "patient_id_hash"]


def picture_from_bytes(data: bytes, name: str, settings: PrepareSettings) -> tuple[np.ndarray, DecodedImage | None]:
    """bytes -> (uint8 picture the model's transform reads: (H, W) grey or (H, W, C), the decoded film it came from).

    The decoded film is None for `--preprocess none` raster inputs, which are the picture already.
    """
    if settings.preprocess == "none" and not is_dicom(data, name):
        # the original tool's inputs: fastai's open_image = PIL open + convert('RGB')
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.mode == "L":  # grey: fastai's RGB copy has R = G = B = L, which the model's views
                    return np.asarray(im), None  # replicate from one channel (a third of the bytes to ship)
                return np.asarray(im.convert("RGB")), None
        except Exception as exc:  # Pillow raises many types for bad bytes
            raise DecodeError(f"not a readable image: {exc}") from exc
    decoded = decode_image(data, name, settings.decode)
    return _picture(decoded, settings), decoded


def _picture(decoded: DecodedImage, settings: PrepareSettings) -> np.ndarray:
    from cxrage_ray.preprocess.seed_chain import seed_chain

    if settings.preprocess == "none":  # a DICOM fed as-is: its 8-bit dcmj2pnm picture
        return decoded.eight_bit()
    return seed_chain(decoded)


def _chronological_age(meta: dict[str, Any], row: Mapping[str, Any], age_column: str | None) -> float | None:
    age = meta.get("chronological_age")
    if age is None and age_column and age_column in row and row[age_column] is not None:
        try:
            age = float(row[age_column])
        except (TypeError, ValueError):
            age = None
    return None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age)


def _plausible_age(meta: dict[str, Any], row: Mapping[str, Any], settings: PrepareSettings) -> tuple[float | None, bool]:
    """The row's chronological age, None when outside 0-110 years, and whether it was (flag `age_implausible`)."""
    from cxrage_ray.orient.stage import plausible_age

    return plausible_age(_chronological_age(meta, row, settings.age_column))


def fetch_row(row: Mapping[str, Any], storage: StorageConfig) -> tuple[bytes | BaseException, RetryCounts]:
    """A manifest row's bytes, or the exception that stands for them, and the retries the read took.

    A row the manifest marked with a problem is not read: its `ManifestError` is returned instead.
    Exceptions are returned, not raised: the prepare functions turn them into the row's error.
    """
    retries = RetryCounts()
    problem = row.get(PROBLEM_COLUMN)
    if isinstance(problem, str) and problem:  # null (pd.NA / None) for a good row
        return ManifestError(problem), retries
    try:
        return read_bytes(str(row["uri"]), storage, retries), retries
    except Exception as exc:
        return exc, retries


def retry_counts(table: Any) -> RetryCounts:
    """Retries by kind over a batch of rows (pyarrow Table or pandas DataFrame) carrying `RETRIES_COLUMN`;
    an empty count when the column is absent."""
    names = table.column_names if hasattr(table, "column_names") else list(table.columns)
    total = RetryCounts()
    if RETRIES_COLUMN not in names:
        return total
    values = table.column(RETRIES_COLUMN).to_pylist() if hasattr(table, "column_names") else table[RETRIES_COLUMN]
    for value in values:
        if isinstance(value, str) and value not in ("", "{}"):
            total.update({str(k): int(v) for k, v in json.loads(value).items()})
    return total


def empty_prepared_row() -> dict[str, Any]:
    """A prepared row with every column and no picture yet: every key is present in every row, with one type per
    column, so Ray never falls back to pickled objects."""
    return {"status": "ok", "error": None, "pixels": b"", "height": 0, "width": 0, "channels": 0,
            "orientation": None, "rotation_source": None, "qc": [], "chronological_age": None,
            **dict.fromkeys(META_COLUMNS)}


def prepare_row(row: Mapping[str, Any], settings: PrepareSettings, fetched: bytes | BaseException | None = None
                ) -> dict[str, Any]:
    """One manifest row -> one prepared row (never raises). `fetched`: the row's bytes, if already read."""
    out = empty_prepared_row()
    meta: dict[str, Any] = {}
    try:
        data = fetch_row(row, settings.storage)[0] if fetched is None else fetched
        if isinstance(data, BaseException):
            raise data
        picture, decoded = picture_from_bytes(data, str(row["uri"]), settings)
        meta = decoded.meta if decoded is not None else {}
        out["chronological_age"], implausible = _plausible_age(meta, row, settings)
        if settings.orient is not None:
            picture = _apply_orientation(picture, decoded, row, out, settings)
        if implausible:
            out["qc"] = [*out["qc"], "age_implausible"]
        if picture.ndim == 2:
            picture = picture[:, :, None]
        out.update(
            pixels=np.ascontiguousarray(picture).tobytes(),
            height=picture.shape[0],
            width=picture.shape[1],
            channels=picture.shape[2],
        )
    except CxrAgeError as exc:
        out.update(status="error", error=error_text(exc))
    except Exception as exc:  # a bug or an unexpected library failure: keep the row, keep going
        log.warning("unexpected %s while preparing row %s", type(exc).__name__, row.get("row_id"))
        out.update(status="error", error=error_text(exc))
    if out["chronological_age"] is None:  # the film failed before its age was read: the manifest's, if any
        out["chronological_age"] = _plausible_age(meta, row, settings)[0]
    for key in META_COLUMNS:
        out[key] = meta.get(key)
    return out


def _apply_orientation(picture: np.ndarray, decoded: DecodedImage | None, row: Mapping[str, Any], out: dict[str, Any],
                       settings: PrepareSettings) -> np.ndarray:
    """Detect on the seed-chain picture; correct the decoded film and rerun the chain (rare: turned films).

    Correcting before the chain, as issue 5 asks, makes a corrected film's picture identical to its upright
    original's (the chain's trim and separable resize are not rotation-symmetric).
    """
    from cxrage_ray.orient.stage import correct_orientation, orient

    meta = decoded.meta if decoded is not None else {}
    result = orient(picture, image_id=str(row["image_id"]), uri=str(row["uri"]), meta=meta,
                    chronological_age=out.get("chronological_age"), config=settings.orient)
    out.update(orientation=result.orientation, rotation_source=result.rotation_source, qc=list(result.qc))
    if result.skip:
        raise FlaggedSkipped(f"not scored because of --skip-flagged (qc: {', '.join(result.qc)})")
    if not result.corrects or decoded is None:
        return result.image
    upright = DecodedImage(
        pixels=correct_orientation(decoded.pixels, result.applied, result.mirrored),
        alpha=None if decoded.alpha is None else correct_orientation(decoded.alpha, result.applied, result.mirrored),
        meta=decoded.meta,
    )
    return _picture(upright, settings)


def prepare_batch(batch: pd.DataFrame, settings: PrepareSettings) -> pd.DataFrame:
    """Ray Data CPU stage: manifest rows -> prepared rows (same order, same count).

    The batch's bytes are fetched concurrently first (object-store reads are latency-bound: many in flight
    keep the CPU busy), then decoded one by one on this task's CPU.
    """
    return prepare_rows(batch, settings, prepare_row)


def prepare_rows(batch: pd.DataFrame, settings: PrepareSettings,
                 prepare_one: Callable[[Mapping[str, Any], PrepareSettings, bytes | BaseException], dict[str, Any]]
                 ) -> pd.DataFrame:
    """Fetch a batch's bytes concurrently, then `prepare_one` each row on this CPU; the batch's own columns
    come first, replaced where `prepare_one` returns a column of the same name (same order, same count).

    Rows are handed over as plain dicts: `iterrows` built a pandas Series per row, which cost as much as reading
    the file on light work (issue 15)."""
    rows = batch.to_dict("records")
    fetched = list(_fetch_pool(settings.fetch_threads).map(lambda row: fetch_row(row, settings.storage), rows))
    prepared = pd.DataFrame([prepare_one(row, settings, data) for row, (data, _) in zip(rows, fetched)],
                            index=batch.index)
    prepared[RETRIES_COLUMN] = [json.dumps(dict(retries), sort_keys=True) for _, retries in fetched]
    return pd.concat([batch.drop(columns=[c for c in prepared.columns if c in batch.columns]), prepared], axis=1)


@functools.lru_cache(maxsize=4)
def _fetch_pool(threads: int) -> ThreadPoolExecutor:
    """This worker process's fetch threads, kept across batches: starting 16 threads per batch cost ~1 ms per
    film on a busy 2-core machine (issue 15); idle threads cost nothing."""
    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cxrage-fetch")


@dataclass(frozen=True)
class CeilingStandIn:
    """Benchmark-only: run the pipeline with prepare reduced to reading bytes and the model to a constant.

    Everything else is the real `cxrage score` pipeline (Ray Data, the concurrent fetch in `prepare_rows`, the
    predictor actor's batch handling in `score_prepared`, the Parquet writer), so films/s measures what the
    pipeline itself can carry. Only `cxrage_ray.pipeline.itinerary.score(..., stand_in=...)` accepts one; the CLI never
    builds it and no flag, config file or environment variable selects it (tests/test_benchmarks.py checks).

    Args:
        score: the raw output every film gets (any constant: the ages mean nothing).
    """

    score: float = 0.0


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

    def __init__(self, stand_in: CeilingStandIn):
        self.score = stand_in.score

    def predict(self, images: list[np.ndarray]) -> StandInPrediction:
        raw = np.full(len(images), self.score, dtype=np.float64)
        return StandInPrediction(raw=raw, raw_sd=np.full(len(images), np.nan), cxr_age=raw.copy())


def unpack_picture(row: Mapping[str, Any]) -> np.ndarray:
    """A prepared row's uint8 (H, W, C) picture, from its `PIXEL_COLUMNS` (a view of the bytes, no copy)."""
    return picture_from(row["pixels"], row["height"], row["width"], row["channels"])


def picture_from(pixels: bytes, height: int, width: int, channels: int) -> np.ndarray:
    return np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), int(channels))


class PredictStage:
    """Ray Data actor: prepared rows -> scored rows. Loads the model once per actor.

    Args:
        state_dict_ref: a one-element list holding the state dict (or an ObjectRef to it); wrapped in a
            list so Ray does not resolve it eagerly on the driver.
        predictor_config: `PredictorConfig`.
        labels: constant columns for every row (weights_sha256, preprocess, tta, decode).
        saliency: write a saliency map per scored film, computed in batches on the same model.
        stand_in: benchmark-only (`CeilingStandIn`): a constant instead of the model; never set by the CLI.
    """

    def __init__(self, state_dict_ref: list, predictor_config, labels: dict[str, str],
                 saliency: SaliencySettings | None = None, stand_in: CeilingStandIn | None = None):
        self.saliency = saliency
        self.saliency_maker = None
        if stand_in is not None:
            self.predictor = StandInPredictor(stand_in)
            self.labels = {**labels, "device": "stand-in"}
            return
        from cxrage_ray.predict.predictor import AgePredictor

        state_dict = state_dict_ref[0]
        if not isinstance(state_dict, dict):  # an ObjectRef on a cluster
            import ray

            state_dict = ray.get(state_dict)
        self.predictor = AgePredictor(state_dict, predictor_config)
        precision = str(self.predictor.dtype).removeprefix("torch.")
        # where the numbers came from: GPU autocast and CPU fp32 agree only to ~1e-3 raw
        self.labels = {**labels, "device": f"{self.predictor.device.type}/{precision}"}
        if saliency is not None:
            from cxrage_ray.predict.saliency import SaliencyMaker

            self.saliency_maker = SaliencyMaker(self.predictor.model, saliency.method)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scored = score_prepared(batch, self.predictor, self.labels, drop_pixels=False)
        if self.saliency is not None:
            write_saliency(scored, self.saliency_maker, self.saliency)
        return scored.drop(columns=PIXEL_COLUMNS)


def write_saliency(batch: pd.DataFrame, maker, settings: SaliencySettings) -> None:
    """Blend and write `DIR/<image_id stem>.png` for the ok rows; sets `saliency_uri` (null if it failed).

    Runs after scoring, on the same model in eval mode, so the scores of the run are unchanged.
    """
    from cxrage_ray.preprocess.export import png_name
    from cxrage_ray.storage.files import write_bytes

    batch["saliency_uri"] = None
    ok = np.flatnonzero((batch["status"] == "ok").to_numpy())
    if len(ok) == 0:
        return
    pngs = maker([unpack_picture(batch.iloc[i]) for i in ok])
    column = batch.columns.get_loc("saliency_uri")
    for i, png in zip(ok, pngs):
        uri = f"{settings.directory.rstrip('/')}/{png_name(str(batch.iloc[i]['image_id']))}"
        try:
            write_bytes(uri, png, settings.storage)
            batch.iloc[i, column] = uri
        except Exception as exc:  # a map that cannot be written must not cost the row its score
            log.warning("saliency map for row %s not written: %s", batch.iloc[i]["row_id"], type(exc).__name__)


def score_prepared(batch: pd.DataFrame, predictor, labels: dict[str, str], drop_pixels: bool = True) -> pd.DataFrame:
    """Score the ok rows of a prepared batch; a failing batch is retried row by row to isolate the bad one."""
    batch = batch.copy()
    for name in ("cxr_age", "raw", "raw_sd", "cxr_age_gap"):
        batch[name] = np.nan
    ok = np.flatnonzero((batch["status"] == "ok").to_numpy())
    try:
        _score_rows(batch, ok, predictor)
    except Exception:
        for i in ok:
            try:
                _score_rows(batch, np.array([i]), predictor)
            except Exception as exc:
                batch.iloc[i, batch.columns.get_loc("status")] = "error"
                batch.iloc[i, batch.columns.get_loc("error")] = error_text(exc)
    age = pd.to_numeric(batch.get("chronological_age"), errors="coerce")
    if age is not None:
        batch["cxr_age_gap"] = batch["cxr_age"] - age
    for key, value in labels.items():
        batch[key] = value
    return batch.drop(columns=PIXEL_COLUMNS) if drop_pixels else batch


def _score_rows(batch: pd.DataFrame, positions: np.ndarray, predictor) -> None:
    if len(positions) == 0:
        return
    # from the columns' arrays: a Series per row (`batch.iloc[i]`) cost more than a light film's decode
    pixels, height, width, channels = (batch[name].to_numpy() for name in PIXEL_COLUMNS)
    pictures = [picture_from(pixels[i], height[i], width[i], channels[i]) for i in positions]
    pred = predictor.predict(pictures)
    for name in ("raw", "raw_sd", "cxr_age"):
        batch.iloc[positions, batch.columns.get_loc(name)] = getattr(pred, name)
