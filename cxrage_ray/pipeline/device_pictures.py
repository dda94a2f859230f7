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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

#: Codestreams per nvImageCodec call: small enough that the next chunk's decode overlaps most of a batch's
#: chain, mapping and orientation; large enough for the GPU decoder's batching (227 films/s at 96 on an H200 for
#: 2k J2K, environment.md). To be tuned by the GPU kit's first run.
DECODE_CHUNK = 32
#: (Q16 pixels (H, W, C) int32, Q16 alpha (H, W) int32 or None), on the device.
Q16Picture = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class DevicePictures:
    """What the scoring actor needs to make pictures from payloads (shipped to it; `start` loads the decoders).

    Args:
        orient: the job's `OrientConfig`, or None.
        gpu_decode: use nvImageCodec when it and a GPU are present (else every frame decodes on the CPU).
        gpu_jpeg: JPEG too on nvJPEG's GPU IDCT, not the exact one (`cxrage_ray.decode.gpu`; benchmarks only).
    """

    orient: OrientConfig | None = None
    gpu_decode: bool = True
    gpu_jpeg: bool = False
    consumed: ClassVar[tuple[str, ...]] = tuple(PAYLOAD_COLUMNS)

    def start(self, device: torch.device | None) -> PayloadDecoder:
        return PayloadDecoder(device or torch.device("cpu"), self.orient, self.gpu_decode, self.gpu_jpeg)


class PayloadDecoder:
    """`DevicePictures` started on one device: one frame decoder and one tensor seed chain."""

    consumed: ClassVar[tuple[str, ...]] = tuple(PAYLOAD_COLUMNS)

    def __init__(self, device: torch.device, orient: OrientConfig | None = None, gpu_decode: bool = True,
                 gpu_jpeg: bool = False):
        from cxrage_ray.decode.gpu import FrameDecoder
        from cxrage_ray.preprocess.tensor import TensorSeedChain

        self.device = device
        self.decoder = FrameDecoder(device, use_nvimgcodec=gpu_decode, gpu_jpeg=gpu_jpeg)
        self.chain = TensorSeedChain(device)
        self.orient = orient
        self.decode_chunk = DECODE_CHUNK

    def start(self, device: Any) -> PayloadDecoder:
        return self

    def pictures(self, batch: pd.DataFrame) -> dict[int, torch.Tensor]:
        q16: dict[int, Q16Picture] = {}
        pictures: dict[int, torch.Tensor] = {}
        for chunk in self.decoded_chunks(batch):  # the next chunk decodes while this one goes through the chain
            q16.update(chunk)
            for i, (pixels, alpha) in chunk.items():
                try:
                    pictures[i] = self.chain(pixels, alpha)
                except Exception as exc:  # one film's failure must not cost its neighbours
                    mark_error(batch, i, exc)
        if self.orient is not None:
            pictures = self._oriented(batch, pictures, q16)
        return pictures

    def decode(self, batch: pd.DataFrame) -> dict[int, Q16Picture]:
        """Payloads of the ok rows -> Q16 tensors (+ alpha) on the device; sets `decode_device` per row."""
        out: dict[int, Q16Picture] = {}
        for chunk in self.decoded_chunks(batch):
            out.update(chunk)
        return out

    def decoded_chunks(self, batch: pd.DataFrame) -> Iterator[dict[int, Q16Picture]]:
        """`decode`, a chunk at a time: first the CPU-decoded pictures (uploaded while the first codestream chunk
        decodes), then `decode_chunk` codestreams at a time, chunk k+1 decoding on a thread while the caller
        works on chunk k (nvImageCodec and the codecs release the GIL). Only this thread writes to `batch`."""
        from cxrage_ray.preprocess.tensor import dicom_q16_tensor

        batch["decode_device"] = None
        status, kind = batch["status"].to_numpy(), batch["payload_kind"].to_numpy()
        ok = [i for i in range(len(batch)) if status[i] == "ok"]
        coded = [i for i in ok if kind[i] == "codestream"]
        frames = [frame_from_row(batch["payload"].iat[i], batch["payload_header"].iat[i]) for i in coded]
        where = batch.columns.get_loc("decode_device")
        starts = range(0, len(coded), self.decode_chunk)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frame-decode") as pool:
            pending = [pool.submit(self.decoder.decode, frames[k:k + self.decode_chunk]) for k in starts[:1]]
            yield {i: self._picture_payload(batch, i) for i in ok if kind[i] != "codestream"}
            for i in ok:
                if kind[i] != "codestream":
                    batch.iat[i, where] = "cpu"
            for k in starts:
                stored_chunk = pending.pop().result()
                if k + self.decode_chunk < len(coded):
                    nxt = k + self.decode_chunk
                    pending.append(pool.submit(self.decoder.decode, frames[nxt:nxt + self.decode_chunk]))
                out: dict[int, Q16Picture] = {}
                for i, frame, stored in zip(coded[k:], frames[k:], stored_chunk):
                    if isinstance(stored, BaseException):
                        mark_error(batch, i, stored)
                        continue
                    batch.iat[i, where] = stored.device
                    out[i] = (dicom_q16_tensor(stored.values, frame.params), None)
                yield out

    def _picture_payload(self, batch: pd.DataFrame, i: int) -> Q16Picture:
        """A CPU-decoded picture payload (grey8 or q16 bytes) -> Q16 tensors on the device."""
        shape = tuple(json.loads(batch["payload_header"].iat[i])["shape"])
        kind = batch["payload_kind"].iat[i]
        body = np.frombuffer(batch["payload"].iat[i], dtype=np.uint8 if kind == "grey8" else np.uint16)
        pixels = self._upload(body.reshape(shape))
        alpha_bytes = batch["alpha"].iat[i]
        alpha = None
        if alpha_bytes:
            alpha = self._upload(np.frombuffer(alpha_bytes, dtype=np.uint16).reshape(shape[:2]))
        return (pixels * 257 if kind == "grey8" else pixels), alpha

    def _upload(self, samples: np.ndarray) -> torch.Tensor:
        """uint8/uint16 samples -> int32 on the device, moved at their own depth (1-2 bytes a sample, not the 4 of
        int32) and widened there; on a GPU from page-locked memory without blocking the host."""
        narrow = samples.view(np.int16) if samples.dtype == np.uint16 else samples  # torch's widest-supported
        host = torch.from_numpy(narrow.copy())  # the payload buffer is read-only
        if self.device.type == "cuda":
            host = host.pin_memory()
        moved = host.to(self.device, non_blocking=True).to(torch.int32)
        return moved & 0xFFFF if samples.dtype == np.uint16 else moved

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
