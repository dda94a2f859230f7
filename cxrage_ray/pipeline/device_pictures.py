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

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from cxrage_ray.config import DecodeOptions, OrientConfig
from cxrage_ray.contract import PAYLOAD_COLUMNS
from cxrage_ray.decode.dicom import EncodedFrame
from cxrage_ray.decode.gpu import StoredFrame, uploaded_together
from cxrage_ray.errors import CxrAgeError, DecodeError, DecompressionBombError
from cxrage_ray.pipeline.payloads import frame_from_row
from cxrage_ray.pipeline.rows import apply_orientation
from cxrage_ray.predict.scoring import mark_error

log = logging.getLogger(__name__)

#: Codestreams per nvImageCodec call: small enough that the next chunk's decode overlaps the rest of a batch's
#: chain, mapping and orientation; large enough for the GPU decoder's batching (227 films/s at 96 on an H200 for
#: 2k J2K, environment.md), and few enough per batch that each chunk's read-backs (its mapping's ranges, its
#: chain's trim boxes and levels) stay within a batch's sync budget (two chunks of a 128-film GPU batch;
#: benchmarks/device_launches.py). To be tuned by the GPU kit's first run.
DECODE_CHUNK = 64
#: The most pixels a payload may declare: the decoders' default limit (`DecodeOptions.max_pixels`), which the
#: prepare tasks already enforced; a larger header was damaged on the way.
MAX_DEVICE_PIXELS = DecodeOptions().max_pixels
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
        """{row position: seed-chain picture on the device} for the ok rows; every film that fails at any step
        (payload parse, upload, mapping, chain, orientation, re-chain) becomes its own error row."""
        q16: dict[int, Q16Picture] = {}
        pictures: dict[int, torch.Tensor] = {}
        for chunk in self.decoded_chunks(batch):  # the next chunk decodes while this one goes through the chain
            q16.update(chunk)
            pictures.update(self._chained(batch, chunk))
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
        """`decode`, a chunk at a time: first the CPU-decoded pictures (uploaded together while the first codestream
        chunk decodes), then `decode_chunk` codestreams at a time, chunk k+1 decoding on a thread while the caller
        works on chunk k (nvImageCodec and the codecs release the GIL), each chunk mapped as one batch. Only this
        thread writes to `batch`."""
        from cxrage_ray.preprocess.tensor_dicom import dicom_q16_batch

        batch["decode_device"] = None
        status, kind = batch["status"].to_numpy(), batch["payload_kind"].to_numpy()
        ok = [i for i in range(len(batch)) if status[i] == "ok"]
        frames: dict[int, EncodedFrame] = {}
        for i in (i for i in ok if kind[i] == "codestream"):
            with film_isolated(batch, i):
                frames[i] = parsed_frame(batch["payload"].iat[i], batch["payload_header"].iat[i])
        coded = list(frames)
        where = batch.columns.get_loc("decode_device")
        starts = range(0, len(coded), self.decode_chunk)

        def decode(k: int) -> list[StoredFrame | BaseException]:
            return self.decoder.decode([frames[i] for i in coded[k:k + self.decode_chunk]])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="frame-decode") as pool:
            pending = [pool.submit(decode, k) for k in starts[:1]]
            uploaded = self._picture_payloads(batch, [i for i in ok if kind[i] != "codestream"])
            for i in uploaded:
                batch.iat[i, where] = "cpu"
            yield uploaded
            for k in starts:
                stored_chunk = pending.pop().result()
                if k + self.decode_chunk < len(coded):
                    pending.append(pool.submit(decode, k + self.decode_chunk))
                decoded: dict[int, StoredFrame] = {}
                for i, stored in zip(coded[k:], stored_chunk):
                    with film_isolated(batch, i):
                        if isinstance(stored, BaseException):
                            raise stored
                        batch.iat[i, where] = stored.device
                        decoded[i] = stored
                mapped = dicom_q16_batch([(stored.values, frames[i].params) for i, stored in decoded.items()])
                out: dict[int, Q16Picture] = {}
                for i, q16 in zip(decoded, mapped):
                    with film_isolated(batch, i):
                        if isinstance(q16, BaseException):
                            raise q16
                        out[i] = (q16, None)
                yield out

    def _chained(self, batch: pd.DataFrame, chunk: dict[int, Q16Picture]) -> dict[int, torch.Tensor]:
        """The seed chain on a chunk's pictures; a film the chain refuses becomes an error row."""
        out: dict[int, torch.Tensor] = {}
        for i, picture in zip(chunk, self.chain.batch(list(chunk.values()))):  # the whole chunk at once
            with film_isolated(batch, i):
                if isinstance(picture, BaseException):
                    raise picture
                out[i] = picture
        return out

    def _picture_payloads(self, batch: pd.DataFrame, positions: list[int]) -> dict[int, Q16Picture]:
        """CPU-decoded picture payloads (grey8 or q16 bytes, alpha) -> Q16 tensors (+ alpha) on the device.

        The payloads travel at their own depth (1-2 bytes a sample, not the 4 of int32), packed into one host
        buffer per kind and moved in one upload each (page-locked and non-blocking on a GPU), then widened there
        in one pass per kind: the pictures are views of those buffers."""
        shapes: dict[int, tuple[int, ...]] = {}
        bodies: dict[str, dict[int, np.ndarray]] = {"grey8": {}, "q16": {}, "alpha": {}}
        for i in positions:
            with film_isolated(batch, i):
                kind = batch["payload_kind"].iat[i]
                shape = payload_shape(batch["payload_header"].iat[i])
                body = np.frombuffer(batch["payload"].iat[i], dtype=np.uint8 if kind == "grey8" else np.uint16)
                check_payload_size(body.size, shape, "picture")
                alpha = np.frombuffer(batch["alpha"].iat[i] or b"", dtype=np.uint16)
                if alpha.size:
                    check_payload_size(alpha.size, shape[:2], "alpha")
                    bodies["alpha"][i] = alpha.reshape(shape[:2])
                bodies["grey8" if kind == "grey8" else "q16"][i] = body.reshape(shape)
                shapes[i] = shape
        widened = {kind: dict(zip(arrays, uploaded_together(list(arrays.values()), self.device,
                                                            scale=257 if kind == "grey8" else 1)))
                   for kind, arrays in bodies.items()}  # 8-bit v as Q16 257 v
        return {i: (widened["grey8"].get(i, widened["q16"].get(i)), widened["alpha"].get(i)) for i in shapes}

    def _oriented(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor], q16: dict[int, Q16Picture]
                  ) -> dict[int, torch.Tensor]:
        """Orientation on the batch's pictures (the classifier batched); a turned film is corrected before the
        seed chain and the chain rerun, as the CPU itinerary does. A film whose orientation fails (or that
        `--skip-flagged` keeps unscored) becomes an error row."""
        positions = list(pictures)
        results = self._orient_results(batch, pictures, positions)
        rows = {i: {"qc": list(batch["qc"].iat[i])} for i in results}
        kept: dict[int, torch.Tensor] = {}
        turned: dict[int, Q16Picture] = {}
        for i, result in results.items():
            with film_isolated(batch, i):
                apply_orientation(rows[i], result)  # raises FlaggedSkipped under --skip-flagged
                if not result.corrects:
                    kept[i] = pictures[i]
                else:
                    pixels, alpha = q16[i]
                    turned[i] = (turn(pixels, result.applied, result.mirrored),
                                 None if alpha is None else turn(alpha, result.applied, result.mirrored))
        kept.update(self._chained(batch, turned))  # the turned films re-chained together
        for i, row in rows.items():
            for name in ("orientation", "rotation_source"):
                if name in row:
                    batch.iat[i, batch.columns.get_loc(name)] = row[name]
        qc = list(batch["qc"])
        for i, row in rows.items():
            qc[i] = row["qc"]
        batch["qc"] = qc
        return kept

    def _orient_results(self, batch: pd.DataFrame, pictures: dict[int, torch.Tensor], positions: list[int]
                        ) -> dict[int, Any]:
        """`orient_batch` over the pictures at `positions`; when the batch call fails, film by film, so only the
        film that fails becomes an error row."""
        from cxrage_ray.orient.stage import orient_batch

        def orient(chosen: list[int]) -> list[Any]:
            ages = [batch["chronological_age"].iat[i] for i in chosen]
            return orient_batch(
                on_host([pictures[i] for i in chosen]),  # the classifier and the QC run on the host, in numpy
                image_ids=[str(batch["image_id"].iat[i]) for i in chosen],
                uris=[str(batch["uri"].iat[i]) for i in chosen],
                metas=[json.loads(batch["meta_json"].iat[i] or "{}") for i in chosen],
                chronological_ages=[None if pd.isna(a) else float(a) for a in ages],
                config=self.orient,
            )

        try:
            return dict(zip(positions, orient(positions), strict=True))
        except Exception:
            results: dict[int, Any] = {}
            for i in positions:
                with film_isolated(batch, i):
                    results[i] = orient([i])[0]
            return results


@contextlib.contextmanager
def film_isolated(batch: pd.DataFrame, position: int) -> Iterator[None]:
    """Run one film's step: an exception makes that film an error row (its kind kept, "<Kind>: message") instead
    of escaping the batch, where Ray would retry the whole task and fail the job on one bad film."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, CxrAgeError):  # a bug or a library failure: say so, without patient data
            log.warning("unexpected %s on the device itinerary for row %s", type(exc).__name__,
                        batch["row_id"].iat[position] if "row_id" in batch.columns else position)
        mark_error(batch, position, exc)


def parsed_frame(codestream: bytes, header_json: str) -> EncodedFrame:
    """A payload row's encoded frame (`frame_from_row`), a header that does not parse being a `DecodeError`."""
    try:
        frame = frame_from_row(codestream, header_json)
        sizes = (frame.rows, frame.columns, frame.samples, frame.bits_allocated, frame.params.bits_stored)
        if not all(isinstance(v, int) for v in sizes):
            raise TypeError("a size field is not a whole number")
    except (ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"the frame's header did not survive the trip to the scoring actor ({type(exc).__name__})"
                          ) from None
    check_payload_size(0, (frame.rows, frame.columns), "frame", codestream=True)
    return frame


def payload_shape(header_json: str) -> tuple[int, ...]:
    """A picture payload's (H, W, C), a header that does not parse being a `DecodeError`."""
    try:
        shape = tuple(int(v) for v in json.loads(header_json)["shape"])
    except (ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"the picture's header did not survive the trip to the scoring actor ({type(exc).__name__})"
                          ) from None
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise DecodeError(f"the picture's header gives the shape {shape}, not (H, W, 1|3)")
    return shape


def check_payload_size(samples: int, shape: tuple[int, ...], what: str, codestream: bool = False) -> None:
    """Refuse a payload whose header gives an absurd size, or a picture whose bytes do not fill its shape."""
    pixels = math.prod(shape[:2])
    if min(shape[:2], default=0) < 1 or pixels > MAX_DEVICE_PIXELS:
        raise DecompressionBombError(f"the {what}'s header gives an absurd size {shape[:2]}")
    if not codestream and samples != math.prod(shape):
        raise DecodeError(f"the {what} holds {samples} samples, its header says {shape}")


def on_host(pictures: list[torch.Tensor]) -> list[np.ndarray]:
    """Device pictures (H, W, C) -> numpy arrays, in one read-back: packed into one padded device buffer (a copy
    each) and moved together (on a GPU, one host sync for the batch instead of one per film)."""
    if not pictures:
        return []
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    channels = max(p.shape[2] for p in pictures)
    packed = torch.zeros((len(pictures), height, width, channels), dtype=torch.uint8, device=pictures[0].device)
    for k, picture in enumerate(pictures):
        packed[k, :picture.shape[0], :picture.shape[1], :picture.shape[2]] = picture
    host = packed.cpu().numpy()
    return [host[k, :p.shape[0], :p.shape[1], :p.shape[2]] for k, p in enumerate(pictures)]


def turn(array: torch.Tensor, applied: int, mirrored: bool) -> torch.Tensor:
    """`cxrage_ray.orient.stage.correct_orientation` on a (H, W[, C]) tensor."""
    corrected = torch.rot90(array, k=applied // 90, dims=(0, 1))
    if mirrored:
        corrected = torch.flip(corrected, dims=(1,))
    return corrected.contiguous()
