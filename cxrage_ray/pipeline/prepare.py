"""Prepare stage of the CPU itinerary: manifest rows -> prepared rows holding the picture the model reads.

In:  a pandas batch of manifest rows (`row_id`, `image_id`, `uri`, the manifest's own columns) and the job's
     `PrepareSettings`.
Out: the same rows, in the same order, with the prepared-row columns (`cxrage_ray.contract.empty_prepared_row`):
     the 8-bit picture as compact bytes (`PIXEL_COLUMNS`), age, QC, metadata and orientation — fetch -> decode ->
     seed chain -> orientation. Never raises for a bad file: a row that fails gets `status="error"` and
     `error="<Kind>: message"`; a row the manifest marked (`PROBLEM_COLUMN`) is not fetched.

`prepare_rows` (fetch a batch concurrently, then prepare each row on this CPU) is shared with the device
itinerary's prepare stage (`cxrage_ray.pipeline.payloads`) and the benchmark stand-in.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.config import PrepareSettings, StorageConfig
from cxrage_ray.contract import PROBLEM_COLUMN, RETRIES_COLUMN, empty_prepared_row
from cxrage_ray.decode.image import decode_image, is_dicom
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import CxrAgeError, DecodeError, ManifestError, error_text
from cxrage_ray.pipeline.rows import apply_orientation, finish_row
from cxrage_ray.pacs.read import read_bytes
from cxrage_ray.storage.retries import RetryCounts

log = logging.getLogger(__name__)

#: One row's preparation: (manifest row, settings, its fetched bytes or the exception that stands for them).
PrepareOne = Callable[[Mapping[str, Any], PrepareSettings, "bytes | BaseException"], dict[str, Any]]


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
        finish_row(out, meta, row, settings.age_column)  # before orientation: `paediatric` reads the age
        if settings.orient is not None:
            picture = _oriented(picture, decoded, row, out, settings)
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
    if out["status"] == "error":  # a film that failed before its age was read still gets the manifest's
        finish_row(out, meta, row, settings.age_column)
    return out


def _oriented(picture: np.ndarray, decoded: DecodedImage | None, row: Mapping[str, Any], out: dict[str, Any],
              settings: PrepareSettings) -> np.ndarray:
    """Detect on the seed-chain picture; correct the decoded film and rerun the chain (rare: turned films).

    Correcting before the chain, as issue 5 asks, makes a corrected film's picture identical to its upright
    original's (the chain's trim and separable resize are not rotation-symmetric).
    """
    from cxrage_ray.orient.stage import correct_orientation, orient

    meta = decoded.meta if decoded is not None else {}
    result = orient(picture, image_id=str(row["image_id"]), uri=str(row["uri"]), meta=meta,
                    chronological_age=out.get("chronological_age"), config=settings.orient)
    apply_orientation(out, result)
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


def prepare_rows(batch: pd.DataFrame, settings: PrepareSettings, prepare_one: PrepareOne) -> pd.DataFrame:
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
