"""The device itinerary's picture source: payload rows -> seed-chain pictures on the scoring actor's device.

In:  payload rows (`cxrage_ray.pipeline.payloads`): DICOM codestreams, or CPU-decoded pictures at their own depth.
Out: {row position: uint8 (H, W, C) tensor on the device}, for `cxrage_ray.predict.scoring.ScoreActor`: batch
     decode (nvImageCodec on a GPU, `cxrage_ray.decode.gpu`; per-file CPU fallback) -> dcmj2pnm mapping -> seed
     chain (`cxrage_ray.preprocess.tensor`) -> orientation, the picture staying on the device. Sets each row's
     `decode_device` ("gpu"/"cpu") and its orientation columns (`cxrage_ray.pipeline.rows.apply_orientation`,
     the rule the CPU itinerary applies too).

Runs without Ray, and on a CPU (for tests and `cxrage preprocess --engine tensor`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from cxrage_ray.config import OrientConfig
from cxrage_ray.contract import PAYLOAD_COLUMNS
from cxrage_ray.pipeline.payloads import frame_from_row
from cxrage_ray.pipeline.rows import apply_orientation
from cxrage_ray.predict.scoring import mark_error

#: (Q16 pixels (H, W, C) int32, Q16 alpha (H, W) int32 or None), on the device.
Q16Picture = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class DevicePictures:
    """What the scoring actor needs to make pictures from payloads (shipped to it; `start` loads the decoders).

    Args:
        orient: the job's `OrientConfig`, or None.
        gpu_decode: use nvImageCodec when it and a GPU are present (else every frame decodes on the CPU).
    """

    orient: OrientConfig | None = None
    gpu_decode: bool = True
    consumed: ClassVar[tuple[str, ...]] = tuple(PAYLOAD_COLUMNS)

    def start(self, device: torch.device | None) -> PayloadDecoder:
        return PayloadDecoder(device or torch.device("cpu"), self.orient, self.gpu_decode)


class PayloadDecoder:
    """`DevicePictures` started on one device: one frame decoder and one tensor seed chain."""

    consumed: ClassVar[tuple[str, ...]] = tuple(PAYLOAD_COLUMNS)

    def __init__(self, device: torch.device, orient: OrientConfig | None = None, gpu_decode: bool = True):
        from cxrage_ray.decode.gpu import FrameDecoder
        from cxrage_ray.preprocess.tensor import TensorSeedChain

        self.device = device
        self.decoder = FrameDecoder(device, use_nvimgcodec=gpu_decode)
        self.chain = TensorSeedChain(device)
        self.orient = orient

    def start(self, device: Any) -> PayloadDecoder:
        return self

    def pictures(self, batch: pd.DataFrame) -> dict[int, torch.Tensor]:
        q16 = self.decode(batch)
        pictures: dict[int, torch.Tensor] = {}
        for i, (pixels, alpha) in q16.items():
            try:
                pictures[i] = self.chain(pixels, alpha)
            except Exception as exc:  # one film's failure must not cost its neighbours
                mark_error(batch, i, exc)
        if self.orient is not None:
            pictures = self._oriented(batch, pictures, q16)
        return pictures

    def decode(self, batch: pd.DataFrame) -> dict[int, Q16Picture]:
        """Payloads of the ok rows -> Q16 tensors (+ alpha) on the device; sets `decode_device` per row."""
        from cxrage_ray.preprocess.tensor import dicom_q16_tensor

        batch["decode_device"] = None
        status, kind = batch["status"].to_numpy(), batch["payload_kind"].to_numpy()
        ok = [i for i in range(len(batch)) if status[i] == "ok"]
        coded = [i for i in ok if kind[i] == "codestream"]
        frames = [frame_from_row(batch["payload"].iat[i], batch["payload_header"].iat[i]) for i in coded]
        where = batch.columns.get_loc("decode_device")
        out: dict[int, Q16Picture] = {}
        for i, frame, stored in zip(coded, frames, self.decoder.decode(frames)):
            if isinstance(stored, BaseException):
                mark_error(batch, i, stored)
                continue
            batch.iat[i, where] = stored.device
            out[i] = (dicom_q16_tensor(stored.values, frame.params), None)
        for i in ok:
            if kind[i] != "codestream":
                out[i] = self._picture_payload(batch, i)
                batch.iat[i, where] = "cpu"
        return out

    def _picture_payload(self, batch: pd.DataFrame, i: int) -> Q16Picture:
        """A CPU-decoded picture payload (grey8 or q16 bytes) -> Q16 tensors on the device."""
        shape = tuple(json.loads(batch["payload_header"].iat[i])["shape"])
        kind = batch["payload_kind"].iat[i]
        body = np.frombuffer(batch["payload"].iat[i], dtype=np.uint8 if kind == "grey8" else np.uint16)
        pixels = torch.from_numpy(body.reshape(shape).astype(np.int32)).to(self.device)
        alpha_bytes = batch["alpha"].iat[i]
        alpha = None
        if alpha_bytes:
            alpha_np = np.frombuffer(alpha_bytes, dtype=np.uint16).reshape(shape[:2]).astype(np.int32)
            alpha = torch.from_numpy(alpha_np).to(self.device)
        return (pixels * 257 if kind == "grey8" else pixels), alpha

    def _oriented(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor], q16: dict[int, Q16Picture]
                  ) -> dict[int, torch.Tensor]:
        """Orientation on the batch's pictures (the classifier batched); a turned film is corrected before the
        seed chain and the chain rerun, as the CPU itinerary does."""
        from cxrage_ray.orient.stage import orient_batch

        positions = list(pictures)
        ages = [batch["chronological_age"].iat[i] for i in positions]
        results = orient_batch(
            [pictures[i].cpu().numpy() for i in positions],  # 512 px uint8: the classifier's thumbnails are tiny
            image_ids=[str(batch["image_id"].iat[i]) for i in positions],
            uris=[str(batch["uri"].iat[i]) for i in positions],
            metas=[json.loads(batch["meta_json"].iat[i] or "{}") for i in positions],
            chronological_ages=[None if pd.isna(a) else float(a) for a in ages],
            config=self.orient,
        )
        rows = {i: {"qc": list(batch["qc"].iat[i])} for i in positions}
        kept: dict[int, torch.Tensor] = {}
        for i, result in zip(positions, results):
            try:
                apply_orientation(rows[i], result)
            except Exception as exc:  # FlaggedSkipped (--skip-flagged)
                mark_error(batch, i, exc)
                continue
            if not result.corrects:
                kept[i] = pictures[i]
            else:
                pixels, alpha = q16[i]
                kept[i] = self.chain(turn(pixels, result.applied, result.mirrored),
                                     None if alpha is None else turn(alpha, result.applied, result.mirrored))
        for i, row in rows.items():
            for name in ("orientation", "rotation_source"):
                batch.iat[i, batch.columns.get_loc(name)] = row[name]
        qc = list(batch["qc"])
        for i, row in rows.items():
            qc[i] = row["qc"]
        batch["qc"] = qc
        return kept


def turn(array: torch.Tensor, applied: int, mirrored: bool) -> torch.Tensor:
    """`cxrage_ray.orient.stage.correct_orientation` on a (H, W[, C]) tensor."""
    corrected = torch.rot90(array, k=applied // 90, dims=(0, 1))
    if mirrored:
        corrected = torch.flip(corrected, dims=(1,))
    return corrected.contiguous()
