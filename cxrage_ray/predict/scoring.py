"""The scoring actor of both itineraries: prepared rows -> scored rows, one model per actor.

In:  a pandas batch of prepared rows (`cxrage_ray.contract`) and a `PictureSource` that turns them into pictures:
     `PreparedPictures` for pictures the CPU stage made (`PIXEL_COLUMNS`), or the device itinerary's source
     (`cxrage_ray.pipeline.device_pictures.DevicePictures`: payloads decoded and preprocessed on the GPU).
Out: the same rows with `SCORE_COLUMNS`, the job's constant labels and (optionally) `saliency_uri`; the source's
     input columns dropped. A film that fails is an error row; a failing batch is retried film by film so one bad
     film costs no other its score.

One actor for both sources, so everything after the picture (scoring, retry, age gap, labels, saliency) is the
same code whichever way the films came.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd

from cxrage_ray.config import SaliencySettings
from cxrage_ray.contract import PIXEL_COLUMNS, SCORE_COLUMNS
from cxrage_ray.errors import error_text
from cxrage_ray.model.weights_file import WeightsFile

log = logging.getLogger(__name__)


class PictureSource(Protocol):
    """Where a scoring actor's pictures come from.

    `consumed`: the input columns the source reads (dropped from the scored rows). `start` is called once in the
    actor, with the model's device, and returns the source ready to use (decoders loaded). `pictures` returns
    {row position: uint8 (H, W, C) picture, numpy or a tensor on the device} for the rows it could make a picture
    of, marking the others as error rows (`mark_error`).
    """

    consumed: Sequence[str]

    def start(self, device: Any) -> PictureSource: ...

    def pictures(self, batch: pd.DataFrame) -> dict[int, Any]: ...


class PreparedPictures:
    """Pictures the CPU stage prepared: the `PIXEL_COLUMNS` of each ok row (views of the bytes, no copy)."""

    consumed: Sequence[str] = tuple(PIXEL_COLUMNS)

    def start(self, device: Any) -> PreparedPictures:
        return self

    def pictures(self, batch: pd.DataFrame) -> dict[int, np.ndarray]:
        # from the columns' arrays: a Series per row (`batch.iloc[i]`) cost more than a light film's decode
        pixels, height, width, channels = (batch[name].to_numpy() for name in PIXEL_COLUMNS)
        ok = np.flatnonzero((batch["status"] == "ok").to_numpy())
        return {int(i): picture_from(pixels[i], height[i], width[i], channels[i]) for i in ok}


def picture_from(pixels: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """A prepared picture's uint8 (H, W, C) array from its `PIXEL_COLUMNS` values (a view of the bytes)."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), int(channels))


def unpack_picture(row: Any) -> np.ndarray:
    """A prepared row's uint8 (H, W, C) picture (a row mapping or Series holding `PIXEL_COLUMNS`)."""
    return picture_from(row["pixels"], row["height"], row["width"], row["channels"])


def mark_error(batch: pd.DataFrame, position: int, exc: BaseException) -> None:
    """Make the row at `position` an error row ("<Kind>: message")."""
    batch.iloc[position, batch.columns.get_loc("status")] = "error"
    batch.iloc[position, batch.columns.get_loc("error")] = error_text(exc)


class ScoreActor:
    """Ray Data actor (or a plain object, without Ray): prepared rows -> scored rows (see the module docstring).

    Args:
        state_dict_ref: a one-element list holding the state dict, an ObjectRef to it, or the `WeightsFile` to
            read it from (the embedded Ray); wrapped in a list so
            Ray does not resolve it eagerly on the driver.
        predictor_config: `PredictorConfig`.
        labels: constant columns for every row (weights_sha256, weights_name, preprocess, tta, decode, ...).
        source: where the pictures come from; `PreparedPictures` by default.
        saliency: write a saliency map per scored film, computed in batches on the same model.
        stand_in: benchmark-only (`cxrage_ray.pipeline.stand_in.CeilingStandIn`): its `predictor()` replaces the
            model; never set by the CLI.
        write: where the actor writes its scored rows (`cxrage_ray.write.pending`): it then returns one block
            record per batch instead of the rows, so no row goes through the driver; None: the rows themselves.
    """

    def __init__(self, state_dict_ref: list, predictor_config: Any, labels: dict[str, str],
                 source: PictureSource | None = None, saliency: SaliencySettings | None = None,
                 stand_in: Any = None, write: Any = None):
        self.write = write
        self.saliency = saliency
        self.saliency_maker = None
        self.auditor = None
        if stand_in is not None:
            self.predictor = stand_in.predictor()
            self.labels = {**labels, "device": "stand-in"}
        else:
            import torch

            from cxrage_ray.predict.predictor import AgePredictor

            state_dict = _resolved(state_dict_ref[0])
            self.predictor = AgePredictor(state_dict, predictor_config)
            precision = str(self.predictor.dtype).removeprefix("torch.")
            # where the numbers came from: GPU autocast and CPU fp32 agree only to ~1e-3 raw
            self.labels = {**labels, "device": f"{self.predictor.device.type}/{precision}"}
            if self.predictor.dtype != torch.float32:
                from dataclasses import replace

                from cxrage_ray.predict.precision_audit import PrecisionAuditor

                # mixed precision: a sample of films is scored again in fp32 (summary.json's precision_audit);
                # eager and unpadded, as the reference scores a few films only: their own views, not a full pass
                reference = AgePredictor(state_dict, replace(predictor_config, precision="fp32", compile="off",
                                                             fixed_shape=False))
                self.auditor = PrecisionAuditor(reference)
        self.source = (source or PreparedPictures()).start(getattr(self.predictor, "device", None))
        if saliency is not None:
            from cxrage_ray.predict.saliency import SaliencyMaker

            self.saliency_maker = SaliencyMaker(self.predictor.model, saliency.method)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        for name in SCORE_COLUMNS:
            batch[name] = np.nan
        batch, pictures = source_pictures(self.source, batch)
        score_pictures(batch, pictures, self.predictor)
        if self.auditor is not None:
            self.auditor.audit(batch, pictures)
        finish_scores(batch, self.labels)
        if self.saliency is not None:
            write_saliency(batch, pictures, self.saliency_maker, self.saliency)
        scored = batch.drop(columns=[c for c in self.source.consumed if c in batch.columns])
        if self.write is None:
            return scored
        from cxrage_ray.write.pending import write_pending

        return pd.DataFrame([write_pending(scored, self.write).as_row()])


def _resolved(state_dict: Any) -> dict:
    """The state dict itself, a `WeightsFile` on this machine (the embedded Ray), or an ObjectRef to it."""
    if isinstance(state_dict, dict):
        return state_dict
    if isinstance(state_dict, WeightsFile):
        return state_dict.load()
    import ray  # an ObjectRef on a cluster

    return ray.get(state_dict)


def source_pictures(source: PictureSource, batch: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, Any]]:
    """The source's pictures for the batch; when the batch call itself fails (what no per-film step caught), the
    films are tried one by one from the batch as it came, so one bad film is one error row, never a failed task
    that Ray retries whole and then fails the job with (a rerun would meet the same batch again)."""
    original = batch.copy()
    try:
        return batch, source.pictures(batch)
    except Exception as exc:
        log.warning("a batch of %d film(s) failed as a whole (%s); trying them film by film", len(batch),
                    type(exc).__name__)
    singles, pictures = [], {}
    for i in range(len(original)):
        one = original.iloc[[i]].reset_index(drop=True)
        if one["status"].iat[0] == "ok":
            try:
                found = source.pictures(one)
                if 0 in found:
                    pictures[i] = found[0]
            except Exception as exc:
                mark_error(one, 0, exc)
        singles.append(one)
    return pd.concat(singles, ignore_index=True), pictures


def score_pictures(batch: pd.DataFrame, pictures: dict[int, Any], predictor: Any) -> None:
    """Score the pictures into the batch's `raw`, `raw_sd`, `cxr_age`; a failing batch is retried film by film to
    isolate the bad one, which becomes an error row."""
    positions = [i for i in pictures if batch.iat[i, batch.columns.get_loc("status")] == "ok"]
    try:
        _score(batch, positions, pictures, predictor)
    except Exception:
        for i in positions:
            try:
                _score(batch, [i], pictures, predictor)
            except Exception as exc:
                mark_error(batch, i, exc)


def _score(batch: pd.DataFrame, positions: list[int], pictures: dict[int, Any], predictor: Any) -> None:
    if not positions:
        return
    pred = predictor.predict([pictures[i] for i in positions])
    for name in ("raw", "raw_sd", "cxr_age"):
        batch.iloc[positions, batch.columns.get_loc(name)] = getattr(pred, name)


def finish_scores(batch: pd.DataFrame, labels: dict[str, str]) -> None:
    """The age gap (CXR-Age minus the row's plausible chronological age) and the constant labels."""
    age = pd.to_numeric(batch.get("chronological_age"), errors="coerce")
    if age is not None:
        batch["cxr_age_gap"] = batch["cxr_age"] - age
    for key, value in labels.items():
        batch[key] = value


def score_prepared(batch: pd.DataFrame, predictor: Any, labels: dict[str, str]) -> pd.DataFrame:
    """Score a batch of CPU-prepared rows in this process (the server's path); the pixel columns are kept."""
    batch = batch.reset_index(drop=True).copy()
    for name in SCORE_COLUMNS:
        batch[name] = np.nan
    score_pictures(batch, PreparedPictures().pictures(batch), predictor)
    finish_scores(batch, labels)
    return batch


def write_saliency(batch: pd.DataFrame, pictures: dict[int, Any], maker: Any, settings: SaliencySettings) -> None:
    """Blend and write `DIR/<image_id stem>.png` for the scored rows; sets `saliency_uri` (null if it failed).

    Runs after scoring, on the same model in eval mode, so the scores of the run are unchanged.
    """
    from cxrage_ray.contract import png_name
    from cxrage_ray.storage.files import write_bytes

    batch["saliency_uri"] = None
    ok = [i for i in pictures if batch.iat[i, batch.columns.get_loc("status")] == "ok"]
    if not ok:
        return
    pngs = maker([_on_host(pictures[i]) for i in ok])
    column = batch.columns.get_loc("saliency_uri")
    for i, png in zip(ok, pngs):
        uri = f"{settings.directory.rstrip('/')}/{png_name(str(batch.iloc[i]['image_id']))}"
        try:
            write_bytes(uri, png, settings.storage)
            batch.iloc[i, column] = uri
        except Exception as exc:  # a map that cannot be written must not cost the row its score
            log.warning("saliency map for row %s not written: %s", batch.iloc[i]["row_id"], type(exc).__name__)


def _on_host(picture: Any) -> np.ndarray:
    """A picture as a numpy array (a device tensor copied to the host: the blend is made on the CPU)."""
    return picture if isinstance(picture, np.ndarray) else picture.cpu().numpy()
