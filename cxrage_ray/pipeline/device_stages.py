"""The device itinerary's stages (`--gpu-preprocess on`): CPUs fetch and parse, the GPU actor does the rest.

    manifest rows -> prepare_encoded_batch (CPU task)   fetch bytes; DICOM: parse the header and cut out frame 1's
                                                         JPEG 2000 / JPEG codestream (no decoding); other DICOM
                                                         codecs and raster files: decoded on the CPU (PNG inflate
                                                         has no GPU decoder) and shipped at their own depth
                  -> DeviceScoreStage (GPU actor)       batch decode (nvImageCodec; per-file CPU fallback) ->
                                                         dcmj2pnm mapping -> seed chain (tensor code) -> orientation
                                                         -> AgePredictor, the picture staying on the device

Rows carry what the CPU stage (`cxrage_ray.pipeline.stages.prepare_batch`) gives, with the pixels replaced by a payload:
`payload` (bytes), `payload_kind` ("codestream" | "grey8" | "q16"), `payload_header` (JSON: shape, or the
frame's header facts and mapping parameters), `alpha` (uint16 bytes or empty), `meta_json` (the decoder's
metadata, for orientation hints; no patient identifiers). The scored rows add `decode_device` ("gpu"/"cpu")
and `preprocess_engine` ("tensor"). Everything here runs without Ray (and on a CPU, for tests).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from cxrage_ray.decode.image import DecodedImage, is_dicom
from cxrage_ray.decode.dicom import EncodedFrame, GreyscaleParams
from cxrage_ray.errors import CxrAgeError, FlaggedSkipped, error_text
from cxrage_ray.config import PrepareSettings, SaliencySettings
from cxrage_ray.pipeline.stages import META_COLUMNS, PIXEL_COLUMNS, _chronological_age, prepare_rows

log = logging.getLogger(__name__)

PAYLOAD_COLUMNS = ["payload", "payload_kind", "payload_header", "alpha", "meta_json"]


# ----------------------------------------------------------------------------------- CPU side


def encode_row(data: bytes, name: str, settings: PrepareSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """One file's bytes -> (payload columns, decoder metadata). Raises `CxrAgeError` for a bad file."""
    if is_dicom(data, name):
        from cxrage_ray.decode.dicom import decode_dicom, encoded_first_frame

        frame = encoded_first_frame(data, settings.decode)
        if frame.codec in ("j2k", "jpeg") and frame.samples == 1:
            return {"payload": frame.codestream, "payload_kind": "codestream",
                    "payload_header": frame_header_json(frame), "alpha": b""}, frame.meta
        decoded = decode_dicom(data, settings.decode)  # JPEG-LS, RLE, lossless JPEG, native: CPU codecs
        return _picture_payload(decoded), decoded.meta
    from cxrage_ray.decode.image import decode_image

    decoded = decode_image(data, name, settings.decode)  # raster, or an ACR-NEMA file found by content
    return _picture_payload(decoded), decoded.meta


def _picture_payload(decoded: DecodedImage) -> dict[str, Any]:
    """A decoded Q16 picture at its own depth: 8-bit sources (every value a multiple of 257) as uint8."""
    pixels = decoded.pixels
    eight_bit = pixels.dtype == np.uint8 or not np.any(pixels % 257)
    body = decoded.eight_bit() if eight_bit else pixels.astype(np.uint16)
    alpha = b"" if decoded.alpha is None else np.ascontiguousarray(decoded.alpha, dtype=np.uint16).tobytes()
    return {"payload": np.ascontiguousarray(body).tobytes(), "payload_kind": "grey8" if eight_bit else "q16",
            "payload_header": json.dumps({"shape": list(pixels.shape)}), "alpha": alpha}


def frame_header_json(frame: EncodedFrame) -> str:
    params = asdict(frame.params)
    if params["lut_data"] is not None:
        params["lut_data"] = [int(v) for v in params["lut_data"]]
    return json.dumps({"codec": frame.codec, "transfer_syntax": frame.transfer_syntax, "rows": frame.rows,
                       "columns": frame.columns, "samples": frame.samples, "bits_allocated": frame.bits_allocated,
                       "photometric": frame.photometric, "planar_configuration": frame.planar_configuration,
                       "params": params})


def frame_from_row(codestream: bytes, header_json: str) -> EncodedFrame:
    header = json.loads(header_json)
    params = dict(header.pop("params"))
    if params["lut_data"] is not None:
        params["lut_data"] = np.asarray(params["lut_data"], dtype=np.uint16)
    return EncodedFrame(codestream=codestream, params=GreyscaleParams(**params), meta={}, **header)


def prepare_encoded_row(row: Mapping[str, Any], settings: PrepareSettings, fetched: bytes | BaseException) -> dict[str, Any]:
    """One manifest row -> payload row (never raises)."""
    out: dict[str, Any] = {"status": "ok", "error": None, "payload": b"", "payload_kind": "", "payload_header": "",
                           "alpha": b"", "meta_json": "{}"}
    meta: dict[str, Any] = {}
    try:
        if isinstance(fetched, BaseException):
            raise fetched
        payload, meta = encode_row(fetched, str(row["uri"]), settings)
        out.update(payload, meta_json=json.dumps(meta, default=str))
    except CxrAgeError as exc:
        out.update(status="error", error=error_text(exc))
    except Exception as exc:  # an unexpected library failure: keep the row, keep going
        log.warning("unexpected %s while preparing row %s", type(exc).__name__, row.get("row_id"))
        out.update(status="error", error=error_text(exc))
    out["chronological_age"] = _chronological_age(meta, row, settings.age_column)
    for key in META_COLUMNS:
        out[key] = meta.get(key)
    return out


def prepare_encoded_batch(batch: pd.DataFrame, settings: PrepareSettings) -> pd.DataFrame:
    """Ray Data CPU stage of the device itinerary: manifest rows -> payload rows (same order, same count)."""
    return prepare_rows(batch, settings, prepare_encoded_row)


# -------------------------------------------------------------------------------- device side


class DeviceScoreStage:
    """Ray Data actor of the device itinerary: payload rows -> scored rows, one model and decoder per actor.

    Args:
        state_dict_ref: a one-element list holding the state dict (or an ObjectRef to it).
        predictor_config: `PredictorConfig`.
        labels: constant columns for every row (weights_sha256, preprocess, tta, decode).
        orient: the job's `OrientConfig`, or None.
        saliency: write a saliency map per scored film.
        gpu_decode: use nvImageCodec when it and a GPU are present (else every frame decodes on the CPU).
    """

    def __init__(self, state_dict_ref: list, predictor_config, labels: dict[str, str], orient=None,
                 saliency: SaliencySettings | None = None, gpu_decode: bool = True):
        from cxrage_ray.decode.gpu import FrameDecoder
        from cxrage_ray.predict.predictor import AgePredictor
        from cxrage_ray.preprocess.tensor import TensorSeedChain

        state_dict = state_dict_ref[0]
        if not isinstance(state_dict, dict):  # an ObjectRef on a cluster
            import ray

            state_dict = ray.get(state_dict)
        self.predictor = AgePredictor(state_dict, predictor_config)
        device = self.predictor.device
        self.decoder = FrameDecoder(device, use_nvimgcodec=gpu_decode)
        self.chain = TensorSeedChain(device)
        self.orient = orient
        precision = str(self.predictor.dtype).removeprefix("torch.")
        self.labels = {**labels, "device": f"{device.type}/{precision}", "preprocess_engine": "tensor"}
        self.saliency = saliency
        self.saliency_maker = None
        if saliency is not None:
            from cxrage_ray.predict.saliency import SaliencyMaker

            self.saliency_maker = SaliencyMaker(self.predictor.model, saliency.method)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True).copy()
        for name in ("cxr_age", "raw", "raw_sd", "cxr_age_gap"):
            batch[name] = np.nan
        for name in ("orientation", "rotation_source", "decode_device"):
            batch[name] = None
        self._qc: dict[int, list[str]] = {}
        q16 = self._decode(batch)
        pictures: dict[int, torch.Tensor] = {}
        for i, (pixels, alpha) in q16.items():
            try:
                pictures[i] = self.chain(pixels, alpha)
            except Exception as exc:  # one film's failure must not cost its neighbours
                _fail(batch, i, exc)
        if self.orient is not None:
            pictures = self._orient(batch, pictures, q16)
        self._score(batch, pictures)
        batch["qc"] = [self._qc.get(i, []) for i in range(len(batch))]
        age = pd.to_numeric(batch["chronological_age"], errors="coerce")
        batch["cxr_age_gap"] = batch["cxr_age"] - age
        for key, value in self.labels.items():
            batch[key] = value
        if self.saliency is not None:
            from cxrage_ray.pipeline.stages import write_saliency

            self._attach_pixels(batch, pictures)
            write_saliency(batch, self.saliency_maker, self.saliency)
            batch = batch.drop(columns=PIXEL_COLUMNS)
        return batch.drop(columns=PAYLOAD_COLUMNS)

    def _decode(self, batch: pd.DataFrame) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Payloads of the ok rows -> Q16 (H, W, C) int32 tensors (+ alpha) on the device."""
        from cxrage_ray.preprocess.tensor import dicom_q16_tensor

        device = self.predictor.device
        ok = [i for i in range(len(batch)) if batch.at[i, "status"] == "ok"]
        coded = [i for i in ok if batch.at[i, "payload_kind"] == "codestream"]
        frames = [frame_from_row(batch.at[i, "payload"], batch.at[i, "payload_header"]) for i in coded]
        out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for i, frame, stored in zip(coded, frames, self.decoder.decode(frames)):
            if isinstance(stored, BaseException):
                _fail(batch, i, stored)
                continue
            batch.at[i, "decode_device"] = stored.device
            out[i] = (dicom_q16_tensor(stored.values, frame.params), None)
        for i in ok:
            if i in coded:
                continue
            shape = tuple(json.loads(batch.at[i, "payload_header"])["shape"])
            kind = batch.at[i, "payload_kind"]
            body = np.frombuffer(batch.at[i, "payload"], dtype=np.uint8 if kind == "grey8" else np.uint16)
            pixels = torch.from_numpy(body.reshape(shape).astype(np.int32)).to(device)
            alpha_bytes = batch.at[i, "alpha"]
            alpha = None
            if alpha_bytes:
                alpha_np = np.frombuffer(alpha_bytes, dtype=np.uint16).reshape(shape[:2]).astype(np.int32)
                alpha = torch.from_numpy(alpha_np).to(device)
            batch.at[i, "decode_device"] = "cpu"
            out[i] = (pixels * 257 if kind == "grey8" else pixels, alpha)
        return out

    def _orient(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor],
                q16: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[int, torch.Tensor]:
        """Orientation on the batch's pictures (the classifier batched, as `orient_batch` runs it); a turned
        film is corrected before the seed chain and the chain rerun, as the CPU itinerary does."""
        from cxrage_ray.orient.stage import orient_batch

        positions = list(pictures)
        ages = [batch.at[i, "chronological_age"] for i in positions]
        results = orient_batch(
            [pictures[i].cpu().numpy() for i in positions],  # 512 px uint8: the classifier's thumbnails are tiny
            image_ids=[str(batch.at[i, "image_id"]) for i in positions],
            uris=[str(batch.at[i, "uri"]) for i in positions],
            metas=[json.loads(batch.at[i, "meta_json"] or "{}") for i in positions],
            chronological_ages=[None if pd.isna(a) else float(a) for a in ages],
            config=self.orient,
        )
        kept: dict[int, torch.Tensor] = {}
        for i, result in zip(positions, results):
            batch.at[i, "orientation"] = result.orientation
            batch.at[i, "rotation_source"] = result.rotation_source
            self._qc[i] = list(result.qc)
            if result.skip:
                _fail(batch, i, FlaggedSkipped(f"not scored because of --skip-flagged (qc: {', '.join(result.qc)})"))
            elif not result.corrects:
                kept[i] = pictures[i]
            else:
                pixels, alpha = q16[i]
                kept[i] = self.chain(turn(pixels, result.applied, result.mirrored),
                                     None if alpha is None else turn(alpha, result.applied, result.mirrored))
        return kept

    def _score(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor]) -> None:
        """Score the prepared pictures; a failing batch is retried film by film to isolate the bad one."""
        positions = list(pictures)
        try:
            self._score_rows(batch, positions, pictures)
        except Exception:
            for i in positions:
                try:
                    self._score_rows(batch, [i], pictures)
                except Exception as exc:
                    _fail(batch, i, exc)

    def _score_rows(self, batch: pd.DataFrame, positions: list[int], pictures: dict[int, torch.Tensor]) -> None:
        if not positions:
            return
        pred = self.predictor.predict([pictures[i] for i in positions])
        for name in ("raw", "raw_sd", "cxr_age"):
            batch.loc[positions, name] = getattr(pred, name)

    def _attach_pixels(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor]) -> None:
        """The `pixels` columns `write_saliency` reads, for the scored rows."""
        batch["pixels"], batch["height"], batch["width"], batch["channels"] = b"", 0, 0, 0
        for i, picture in pictures.items():
            host = picture.cpu().numpy()
            batch.at[i, "pixels"] = host.tobytes()
            batch.at[i, "height"], batch.at[i, "width"], batch.at[i, "channels"] = host.shape


def turn(array: torch.Tensor, applied: int, mirrored: bool) -> torch.Tensor:
    """`cxrage_ray.orient.stage.correct_orientation` on a (H, W[, C]) tensor."""
    corrected = torch.rot90(array, k=applied // 90, dims=(0, 1))
    if mirrored:
        corrected = torch.flip(corrected, dims=(1,))
    return corrected.contiguous()


def _fail(batch: pd.DataFrame, i: int, exc: BaseException) -> None:
    batch.at[i, "status"] = "error"
    batch.at[i, "error"] = error_text(exc)
