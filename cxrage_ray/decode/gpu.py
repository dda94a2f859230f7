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

JPEG frames decode on the CPU by default, also on a GPU node: nvJPEG's GPU IDCT is not the islow IDCT of
libjpeg(-turbo) that the exact path and dcmj2pnm use, so its pixels may differ by a level. They take
nvImageCodec's CPU back end (libjpeg-turbo, equal to the exact path on the real films) in one batch call, else
pydicom, and their rows say `decode_device = "cpu"`. `gpu_jpeg=True` opts into nvJPEG where a user measured and
accepts the difference (`benchmarks/gpu_pipeline.py` prints it); never a silent difference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cxrage_ray.decode.dicom import EncodedFrame, decode_codestream_cpu
from cxrage_ray.decode.nvimgcodec import load_nvimgcodec

log = logging.getLogger(__name__)

GPU_CODECS = frozenset({"j2k", "jpeg"})


@dataclass(slots=True)
class StoredFrame:
    """A decoded frame: stored values (int32 tensor), where it was decoded ("gpu" or "cpu") and by what
    ("nvimgcodec", or "pydicom" for the exact CPU path)."""

    values: torch.Tensor
    device: str
    decoder: str = "pydicom"


class FrameDecoder:
    """Decodes batches of `EncodedFrame`s on `device`: nvImageCodec where it applies, else pydicom on the CPU.

    Args:
        device: where the stored values end up (the device the seed chain and the model run on).
        use_nvimgcodec: batch-decode with nvImageCodec on the GPU when `device` is a CUDA device and it is
            installed (otherwise every frame takes the CPU path).
        nvimgcodec_on_cpu: use nvImageCodec's CPU back ends instead (no GPU needed; what the tests run, since
            they exercise the same batch API, results and refusals as the GPU back ends).
        gpu_jpeg: decode JPEG with nvJPEG on the GPU too (see the module docstring: not the exact IDCT).
    """

    def __init__(self, device: torch.device, use_nvimgcodec: bool = True, nvimgcodec_on_cpu: bool = False,
                 gpu_jpeg: bool = False):
        self.device = device
        self._decoder = self._cpu_decoder = None
        self._on_gpu = device.type == "cuda" and not nvimgcodec_on_cpu
        self._jpeg_on_cpu = self._on_gpu and not gpu_jpeg
        codec = load_nvimgcodec() if use_nvimgcodec and (self._on_gpu or nvimgcodec_on_cpu) else None
        if codec is not None:
            try:
                cpu_only = dict(device_id=codec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                backends=[codec.Backend(codec.BackendKind.CPU_ONLY)])
                if self._on_gpu:
                    self._decoder = codec.Decoder(device_id=device.index or 0)
                    if self._jpeg_on_cpu:
                        self._cpu_decoder = codec.Decoder(**cpu_only)
                else:
                    self._decoder = codec.Decoder(**cpu_only)
                self._params = codec.DecodeParams(color_spec=codec.ColorSpec.UNCHANGED, allow_any_depth=True)
            except Exception as exc:
                log.warning("nvImageCodec could not start (%s): decoding on the CPU", type(exc).__name__)
                self._decoder = self._cpu_decoder = None

    @property
    def uses_nvimgcodec(self) -> bool:
        return self._decoder is not None

    def route(self, frame: EncodedFrame) -> str:
        """Which path decodes `frame`: "gpu" (nvImageCodec on the device), "codec-cpu" (nvImageCodec's CPU back
        end, for JPEG on a GPU node) or "cpu" (pydicom + pylibjpeg, the exact path)."""
        return frame_route(frame, codec=self._decoder is not None, on_gpu=self._on_gpu,
                           jpeg_on_cpu=self._jpeg_on_cpu, cpu_codec=self._cpu_decoder is not None)

    def decode(self, frames: Sequence[EncodedFrame]) -> list[StoredFrame | BaseException]:
        """Decode each frame; a frame that no path can decode is returned as its exception (in place)."""
        results: list[StoredFrame | BaseException | None] = [None] * len(frames)
        routes: list[str | None] = []
        for i, frame in enumerate(frames):  # a frame whose header the rule cannot read fails alone
            try:
                routes.append(self.route(frame))
            except Exception as exc:
                routes.append(None)
                results[i] = exc
        for route in ("gpu", "codec-cpu"):
            positions = [i for i, r in enumerate(routes) if r == route]
            if not positions:
                continue
            on_gpu = route == "gpu"
            decoder = self._decoder if on_gpu or not self._on_gpu else self._cpu_decoder
            for i, values in zip(positions, self._decode_batch([frames[i] for i in positions], decoder, on_gpu)):
                if values is not None:
                    results[i] = StoredFrame(values, "gpu" if on_gpu else "cpu", "nvimgcodec")
        on_host: dict[int, np.ndarray] = {}
        for i, frame in enumerate(frames):
            if results[i] is None:
                try:
                    on_host[i] = decode_codestream_cpu(frame).astype(np.int32)
                except Exception as exc:  # the caller turns it into the row's error
                    results[i] = exc
        for i, values in zip(on_host, uploaded_together(list(on_host.values()), self.device)):
            results[i] = StoredFrame(values, "cpu")
        return results  # type: ignore[return-value]

    def _decode_batch(self, frames: Sequence[EncodedFrame], decoder: Any, on_gpu: bool) -> list[torch.Tensor | None]:
        """nvImageCodec on a batch; None where it refused a stream or returned something unexpected."""
        try:
            images = decoder.decode([f.codestream for f in frames], params=self._params)
        except Exception as exc:  # a whole-batch failure: every frame goes to the CPU path
            log.warning("nvImageCodec batch decode failed (%s): CPU fallback for %d frames",
                        type(exc).__name__, len(frames))
            return [None] * len(frames)
        if on_gpu:  # stays on the GPU (__cuda_array_interface__)
            return [None if image is None else _stored_values(torch.as_tensor(image, device=self.device), frame)
                    for frame, image in zip(frames, images)]
        # decoded on the host (JPEG on a GPU node, for exactness): moved to the device together
        arrays = [None if image is None else _grey(np.asarray(image.cpu())) for image in images]
        kept = [k for k, array in enumerate(arrays) if array is not None and array.shape == (frames[k].rows,
                                                                                            frames[k].columns)]
        moved = dict(zip(kept, uploaded_together([arrays[k] for k in kept], self.device)))
        return [None if k not in moved else
                moved[k] if _whole_container(arrays[k], frame) else  # its samples are its values: no mask
                sign_extend(moved[k], frame.params.bits_stored, frame.params.signed)
                for k, frame in enumerate(frames)]


def frame_route(frame: EncodedFrame, *, codec: bool, on_gpu: bool, jpeg_on_cpu: bool, cpu_codec: bool) -> str:
    """`FrameDecoder.route` as a rule: `codec` — nvImageCodec started; `on_gpu` — on its GPU back ends;
    `jpeg_on_cpu` — JPEG kept off nvJPEG; `cpu_codec` — its CPU back end started beside the GPU one."""
    if not codec or not gpu_decodable(frame):
        return "cpu"
    if on_gpu and jpeg_on_cpu and frame.codec == "jpeg":
        return "codec-cpu" if cpu_codec else "cpu"
    return "gpu" if on_gpu else "codec-cpu"


def gpu_decodable(frame: EncodedFrame) -> bool:
    """nvImageCodec's share: greyscale J2K/HTJ2K and JPEG streams up to 16 bits (colour DICOM, rare for chest
    films, stays on the CPU path, whose YBR handling is pydicom's)."""
    return (frame.codec in GPU_CODECS and bool(frame.codestream) and frame.samples == 1
            and 1 <= frame.params.bits_stored <= 16)


def _stored_values(image: torch.Tensor, frame: EncodedFrame) -> torch.Tensor | None:
    """A decoded grey image (H, W[, 1]) -> stored values like pydicom's, or None when its shape is not the header's."""
    if image.dim() == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if tuple(image.shape) != (frame.rows, frame.columns):
        return None  # e.g. a codestream whose size disagrees with the header: the CPU path reports it
    return sign_extend(image, frame.params.bits_stored, frame.params.signed)


def _whole_container(array: np.ndarray, frame: EncodedFrame) -> bool:
    """Unsigned samples that fill their container (8 bits in uint8, 16 in uint16): `sign_extend` would not change
    them."""
    return (not frame.params.signed and array.dtype.kind == "u"
            and frame.params.bits_stored >= 8 * array.dtype.itemsize)


def _grey(image: np.ndarray) -> np.ndarray:
    """A decoded grey image (H, W[, 1]) as (H, W)."""
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


def to_device(host: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on `device`: on a GPU from page-locked memory, without blocking the host (no host sync)."""
    tensor = torch.from_numpy(np.ascontiguousarray(host)) if isinstance(host, np.ndarray) else host
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def uploaded_together(arrays: Sequence[np.ndarray], device: torch.device, scale: int = 1) -> list[torch.Tensor]:
    """Host arrays (any integer dtype up to 16 bits unsigned, or int32) -> int32 tensors on `device`, times
    `scale`: packed into one host buffer at their own depth and moved in one copy (`to_device`), widened there in
    one pass; each result is a view of that buffer. On a GPU node this is one upload a chunk, not a blocking one a
    frame."""
    if not arrays:
        return []
    wide = any(a.dtype.itemsize > 2 or a.dtype.kind == "i" for a in arrays)
    dtype = np.int32 if wide else np.uint16 if any(a.dtype.itemsize == 2 for a in arrays) else np.uint8
    host = np.concatenate([np.ascontiguousarray(a, dtype=dtype).ravel() for a in arrays])
    flat = to_device(host.view(np.int16) if dtype == np.uint16 else host, device).to(torch.int32)
    if dtype == np.uint16:
        flat = flat & 0xFFFF  # int16 (torch's widest 16-bit type) back to its unsigned samples
    if scale != 1:
        flat = flat * scale
    starts = np.cumsum([0] + [a.size for a in arrays])
    return [flat[a:b].view(array.shape) for array, a, b in zip(arrays, starts[:-1], starts[1:])]


def sign_extend(stored: torch.Tensor, bits_stored: int, signed: bool) -> torch.Tensor:
    """Raw samples as a codec returns them (unsigned container) -> int32 values BitsStored wide."""
    x = stored.to(torch.int32) & ((1 << bits_stored) - 1)
    if signed:
        x = torch.where(x >= (1 << (bits_stored - 1)), x - (1 << bits_stored), x)
    return x
