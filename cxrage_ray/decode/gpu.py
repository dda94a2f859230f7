"""GPU decode: DICOM frame codestreams -> stored values on the GPU, in batches, with nvImageCodec.

In:  `EncodedFrame`s (`cxrage_ray.decode.dicom.encoded_first_frame`: header parsed on a CPU, frame 1's
     JPEG 2000 / HTJ2K / JPEG codestream cut out, nothing decoded).
Out: one `StoredFrame` per input, in order: the stored values as an int32 tensor (H, W) (sign-extended to
     BitsStored) or (H, W, 3), on the decoder's device, and where it was decoded (`"gpu"` / `"cpu"`).

nvImageCodec (`pip install cxrage-ray[gpu]`: nvidia-nvimgcodec-cu13 with the nvJPEG2000 and nvJPEG wheels)
decodes J2K/HTJ2K and JPEG on the GPU; lossless streams come out pixel-identical to OpenJPEG (measured on
12-, 15- and 16-bit films, environment.md). Whatever it cannot take — JPEG-LS, JPEG lossless, RLE, native
data, odd depths, a stream it refuses or a result of the wrong size — is decoded per file on the CPU with
the exact path (pydicom + pylibjpeg) and moved to the device, so a film is never lost or silently wrong;
`StoredFrame.device` records which path produced it (the `decode_device` output column).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cxrage_ray.decode.dicom import EncodedFrame, decode_codestream_cpu
from cxrage_ray.preprocess.tensor import sign_extend

log = logging.getLogger(__name__)

GPU_CODECS = frozenset({"j2k", "jpeg"})


@dataclass(slots=True)
class StoredFrame:
    """A decoded frame: stored values (int32 tensor) and the path that decoded it ("gpu" or "cpu")."""

    values: torch.Tensor
    device: str


def load_nvimgcodec() -> Any | None:
    """The `nvidia.nvimgcodec` module when it is installed and a CUDA device is usable, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from nvidia import nvimgcodec
    except Exception:  # not installed, or its CUDA libraries are missing
        return None
    return nvimgcodec


class FrameDecoder:
    """Decodes batches of `EncodedFrame`s on `device`: nvImageCodec where it applies, else the CPU.

    Args:
        device: where the stored values end up (the device the seed chain and the model run on).
        use_gpu: try nvImageCodec (ignored when it or a CUDA device is missing: everything goes to the CPU).
    """

    def __init__(self, device: torch.device, use_gpu: bool = True):
        self.device = device
        self._codec = load_nvimgcodec() if use_gpu and device.type == "cuda" else None
        self._decoder = None
        if self._codec is not None:
            try:
                self._decoder = self._codec.Decoder()
                self._params = self._codec.DecodeParams(color_spec=self._codec.ColorSpec.UNCHANGED,
                                                        allow_any_depth=True)
            except Exception as exc:
                log.warning("nvImageCodec could not start (%s): decoding on the CPU", type(exc).__name__)
                self._decoder = None

    @property
    def on_gpu(self) -> bool:
        return self._decoder is not None

    def decode(self, frames: Sequence[EncodedFrame]) -> list[StoredFrame | BaseException]:
        """Decode each frame; a frame that no path can decode is returned as its exception (in place)."""
        results: list[StoredFrame | BaseException | None] = [None] * len(frames)
        gpu_positions = [i for i, f in enumerate(frames) if self.on_gpu and gpu_decodable(f)]
        if gpu_positions:
            for i, values in zip(gpu_positions, self._decode_gpu([frames[i] for i in gpu_positions])):
                if values is not None:
                    results[i] = StoredFrame(values, "gpu")
        for i, frame in enumerate(frames):
            if results[i] is None:
                try:
                    stored = decode_codestream_cpu(frame)
                    results[i] = StoredFrame(torch.from_numpy(stored.astype(np.int32)).to(self.device), "cpu")
                except Exception as exc:  # the caller turns it into the row's error
                    results[i] = exc
        return results  # type: ignore[return-value]

    def _decode_gpu(self, frames: Sequence[EncodedFrame]) -> list[torch.Tensor | None]:
        """nvImageCodec on a batch; None where it refused a stream or returned something unexpected."""
        try:
            images = self._decoder.decode([f.codestream for f in frames], params=self._params)
        except Exception as exc:  # a whole-batch failure: every frame goes to the CPU path
            log.warning("nvImageCodec batch decode failed (%s): CPU fallback for %d frames",
                        type(exc).__name__, len(frames))
            return [None] * len(frames)
        out: list[torch.Tensor | None] = []
        for frame, image in zip(frames, images):
            out.append(None if image is None else _stored_values(torch.as_tensor(image, device=self.device), frame))
        return out


def gpu_decodable(frame: EncodedFrame) -> bool:
    """nvImageCodec's share: J2K/HTJ2K and JPEG streams of 1 or 3 samples, up to 16 bits."""
    return (frame.codec in GPU_CODECS and bool(frame.codestream) and frame.samples in (1, 3)
            and 1 <= frame.params.bits_stored <= 16)


def _stored_values(image: torch.Tensor, frame: EncodedFrame) -> torch.Tensor | None:
    """A decoded image (H, W[, C]) -> stored values like pydicom's, or None when its shape is not the header's."""
    if image.dim() == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    expected = (frame.rows, frame.columns) if frame.samples == 1 else (frame.rows, frame.columns, 3)
    if tuple(image.shape) != expected:
        return None  # e.g. a codestream whose size disagrees with the header: the CPU path reports it
    if frame.samples == 3:
        return image.to(torch.int32)
    return sign_extend(image, frame.params.bits_stored, frame.params.signed)
