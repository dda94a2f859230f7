"""Predict stage: seed-chain images -> CXR-Age, batched, on CPU or GPU. No Ray imports.

In:  a list of uint8 images (H, W, C), C in {1, 3} — the 8-bit pictures the original fed to fastai.
Out: `Prediction` arrays: `raw` (combined standardised output, float64), `raw_sd` (TTA spread in raw units,
     NaN without TTA) and `cxr_age` (years, float64).

The fastai transform runs here, on the inference device, so the CPU stage ships compact uint8 images
(~0.25 MB) instead of five float32 views (3 MB) through the object store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cxrage_ray.config import Device, Precision, views_per_film
from cxrage_ray.config import PredictorConfig  # defined beside the other job settings, without torch
from cxrage_ray.model.network import build_model, calibrate
from cxrage_ray.preprocess.fastai import SIZE, batch_tta_views, combine_tta

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prediction:
    raw: np.ndarray
    raw_sd: np.ndarray
    cxr_age: np.ndarray


def resolve_device(device: Device) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


class AgePredictor:
    """The CXR-Age model with its TTA, ready to score batches of seed-chain images.

    Args:
        state_dict: a verified CXR-Age state dict (see `cxrage_ray.model.checkpoint.load_state_dict`).
        config: device, precision, TTA and batch settings.

    On a GPU the pictures go through pinned staging buffers (copied straight into them, no intermediate
    stack) with non-blocking copies, and each forward pass is launched as soon as a batch of views is
    ready, so the host stages the next pictures while the GPU runs; the network runs with its batch norms
    folded into the convolutions and, by default, `torch.compile`d (eager when compiling fails). On the CPU
    the network is fp32 with channels_last weights and inputs and its batch norms folded too (~1.35x the plain
    NCHW model's speed here, its ages within 1e-3 years); `precision="bf16"` on a CPU runs OpenVINO's bf16
    plan instead (`cxrage_ray.predict.engines`; ~2.4x torch's CPU autocast), which needs the `openvino` extra.

    Example:
        >>> predictor = AgePredictor(load_state_dict("PLCO_Fine_Tuned_120419.pth"), PredictorConfig())
        >>> predictor.predict([image_u8]).cxr_age
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], config: PredictorConfig = PredictorConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.precision, self.device)
        on_gpu = self.device.type == "cuda"
        threads = config.num_threads or os.cpu_count() or 1
        if not on_gpu:
            torch.set_num_threads(threads)
        else:  # one shape per batch size: cuDNN's per-shape autotuning pays once (a process-wide torch setting)
            torch.backends.cudnn.benchmark = True
        # channels_last on the CPU too: oneDNN's convolutions run ~1.3x faster on NHWC here, the same function up
        # to float rounding (benchmarks/cpu_engines.py)
        model = build_model(state_dict).to(self.device).to(memory_format=torch.channels_last)
        #: the network as loaded (saliency differentiates through it)
        self.model = model.eval()
        # folded batch norms: ~15% of the GPU's time, and ~1.07x channels_last's speed on the CPU (cpu_engines.py)
        fast = (fold_batchnorm(self.model).to(memory_format=torch.channels_last)
                if _enabled(config.fold_batchnorm, True) else self.model)
        #: "torch", or "openvino" where a CPU runs bf16 (~2.4x torch's CPU autocast here, cpu_engines.py)
        self.engine = "openvino" if not on_gpu and self.dtype == torch.bfloat16 else "torch"
        if self.engine == "openvino":
            from cxrage_ray.predict.engines import cpu_bf16_engine

            fast = cpu_bf16_engine(self.model, threads)
        self.compiled = _enabled(config.compile, on_gpu) and self.engine == "torch"
        self._network = torch.compile(fast, dynamic=False) if self.compiled else fast
        self._eager = fast
        self._staging = PinnedStaging() if on_gpu else None

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> Prediction:
        """Score images (uint8 (H, W[, C]) arrays in host memory, or tensors on any device); returns
        arrays aligned with `images`."""
        if len(images) == 0:
            empty = np.zeros(0)
            return Prediction(raw=empty, raw_sd=empty, cxr_age=empty)
        n_views = views_per_film(self.config.tta)
        size = self.config.batch_size
        total = len(images) * n_views
        # one batch shape (a compiled network needs it; `fixed_shape` makes outputs independent of batching):
        # the queue is padded to whole batches
        padded = -(-total // size) * size if self.compiled or self.config.fixed_shape else total
        # channels_last from the start, so each forward pass's slice is already in the network's layout (no copy)
        queue = torch.zeros(padded, 3, SIZE, SIZE, device=self.device).contiguous(memory_format=torch.channels_last)
        order: list[int] = []
        outputs: list[torch.Tensor] = []
        filled = done = 0
        # the transform is batched per picture shape (archives have many); the forward passes are not:
        # views join one queue and every forward pass is a full `batch_size`, launched as soon as it is
        # full, so staging the next pictures overlaps the GPU's work on this batch
        per_chunk = max(1, size // n_views // 2)
        for positions in same_shape_chunks(images, per_chunk):
            x = self._stage(images, positions)
            queue[filled : filled + len(positions) * n_views] = batch_tta_views(x, self.config.tta).flatten(0, 1)
            filled += len(positions) * n_views
            order += positions
            while filled - done >= size:
                outputs.append(self._forward(queue[done : done + size]))
                done += size
        while done < total:
            outputs.append(self._forward(queue[done : done + size])[: total - done])
            done += size
        per_film = torch.cat(outputs).view(len(images), n_views)  # in queue order; each row is one film's
        if self.config.tta == "seed":
            final, sd = combine_tta(per_film)
        else:
            final, sd = per_film[:, 0], torch.full_like(per_film[:, 0], float("nan"))
        # one read-back for the whole batch (a host sync on a GPU), put in the callers' order on the host
        queued = torch.stack([final, sd]).double().cpu().numpy()
        raw, raw_sd = np.empty(len(images)), np.empty(len(images))
        raw[order], raw_sd[order] = queued[0], queued[1]
        return Prediction(raw=raw, raw_sd=raw_sd, cxr_age=calibrate(raw))

    def _stage(self, images: Sequence[np.ndarray | torch.Tensor], positions: list[int]) -> torch.Tensor:
        """Same-shaped pictures -> float (k, C, H, W) in [0, 1] on the device."""
        first = images[positions[0]]
        if isinstance(first, torch.Tensor):
            pixels = torch.stack([as_hwc_tensor(images[i]) for i in positions]).to(self.device)
        elif self._staging is not None:
            pixels = self._staging.upload([as_hwc(images[i]) for i in positions], self.device)
        else:
            pixels = torch.empty((len(positions),) + as_hwc(first).shape, dtype=torch.uint8)
            batch = pixels.numpy()
            for k, i in enumerate(positions):  # straight into the batch: no intermediate np.stack
                batch[k] = as_hwc(images[i])
        return pixels.permute(0, 3, 1, 2).float().div_(255)

    @torch.inference_mode()
    def _forward(self, views: torch.Tensor) -> torch.Tensor:
        if self.engine == "openvino":  # bf16 inside its own plan; no torch autocast around it
            return self._network(views)[:, 0]
        views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            try:
                return self._network(views).float()[:, 0]
            except Exception as exc:
                if self._network is self._eager:
                    raise
                # compilation failures surface on the first call; scoring must not depend on them
                log.warning("torch.compile failed (%s: %s); running the network eagerly",
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                self._network, self.compiled = self._eager, False
                return self._network(views).float()[:, 0]


class PinnedStaging:
    """Page-locked host buffers that pictures are copied into before a non-blocking upload.

    Two buffers per batch shape take turns; a buffer is refilled only after the GPU has finished
    copying it (a CUDA event per buffer), so the host fills one while the other is in flight.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._turn: dict[tuple[int, ...], int] = {}

    def upload(self, pictures: list[np.ndarray], device: torch.device) -> torch.Tensor:
        shape = (len(pictures),) + pictures[0].shape
        if shape not in self._buffers:
            if len(self._buffers) > 32:  # many shapes in an archive: keep the pinned memory bounded
                self._buffers.clear()
                self._turn.clear()
            self._buffers[shape] = [(torch.empty(shape, dtype=torch.uint8).pin_memory(), None) for _ in range(2)]
            self._turn[shape] = 0
        turn = self._turn[shape]
        self._turn[shape] = 1 - turn
        buffer, copied = self._buffers[shape][turn]
        if copied is not None:
            copied.synchronize()
        host = buffer.numpy()
        for k, picture in enumerate(pictures):
            host[k] = picture
        on_device = buffer.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._buffers[shape][turn] = (buffer, event)
        return on_device


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of the CXR-Age network with every conv -> batch-norm pair of the ResNet body folded
    into the convolution (the same function up to float rounding; ~15% of the GPU time was batch norm)."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    body = folded[0]
    body[0], body[1] = fuse_conv_bn_eval(body[0], body[1]), torch.nn.Identity()
    for layer in list(body.children())[4:]:
        for block in layer:
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), torch.nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), torch.nn.Identity()
            if block.downsample is not None:
                block.downsample = torch.nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return folded


def _enabled(setting: str, auto: bool) -> bool:
    return setting == "on" or (setting == "auto" and auto)


def as_hwc(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, C]) picture, got {image.dtype} {image.shape}")
    return image[:, :, None] if image.ndim == 2 else image


def as_hwc_tensor(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.dim() not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, C]) picture, got {image.dtype} {tuple(image.shape)}")
    return image[:, :, None] if image.dim() == 2 else image


def same_shape_chunks(images: Sequence[np.ndarray | torch.Tensor], size: int) -> list[list[int]]:
    """Positions grouped by picture shape (so each group is one batched transform), at most `size` each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        shape = tuple(image.shape) if image.ndim == 3 else tuple(image.shape) + (1,)
        groups.setdefault(shape, []).append(i)
    return [pos[k : k + size] for pos in groups.values() for k in range(0, len(pos), size)]
