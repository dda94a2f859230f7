"""Predict stage: seed-chain images -> CXR-Age, batched, on CPU or GPU. No Ray imports.

In:  a list of uint8 images (H, W, C), C in {1, 3} — the 8-bit pictures the original fed to fastai.
Out: `Prediction` arrays: `raw` (combined standardised output, float64), `raw_sd` (TTA spread in raw units,
     NaN without TTA) and `cxr_age` (years, float64).

The fastai transform runs here, on the inference device, so the CPU stage ships compact uint8 images
(~0.25 MB) instead of five float32 views (3 MB) through the object store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from cxrage_ray.model import build_model, calibrate
from cxrage_ray.preprocess.fastai import SIZE, TTAMode, batch_tta_views, combine_tta

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """How to run the model.

    Args:
        device: "auto" picks CUDA when available, else CPU.
        precision: "auto" is bf16 autocast on GPUs that support it (else fp16) and fp32 on CPU.
        tta: "seed" (centre + 4 corners, the original's composite) or "none" (centre only).
        batch_size: model views per forward pass (5 views per image with TTA); same-shaped pictures
            are transformed together on the inference device.
        num_threads: torch intra-op threads on CPU; 0 means all cores of this machine. Ray workers start
            with OMP_NUM_THREADS=1, so this must be set explicitly.
    """

    device: Device = "auto"
    precision: Precision = "auto"
    tta: TTAMode = "seed"
    batch_size: int = 64
    num_threads: int = 0


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
        state_dict: a verified CXR-Age state dict (see `cxrage_ray.checkpoint.load_state_dict`).
        config: device, precision, TTA and batch settings.

    Example:
        >>> predictor = AgePredictor(load_state_dict("PLCO_Fine_Tuned_120419.pth"), PredictorConfig())
        >>> predictor.predict([image_u8]).cxr_age
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], config: PredictorConfig = PredictorConfig()):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.precision, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        model = build_model(state_dict).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        """Score images; returns arrays aligned with `images`."""
        if not images:
            empty = np.zeros(0)
            return Prediction(raw=empty, raw_sd=empty, cxr_age=empty)
        n_views = 5 if self.config.tta == "seed" else 1
        views = torch.empty(len(images), n_views, 3, SIZE, SIZE, device=self.device)
        # the transform is batched per picture shape (archives have many); the forward passes are not:
        # all views join one queue so every forward pass is a full `batch_size`
        per_chunk = max(1, self.config.batch_size // n_views)
        for positions in same_shape_chunks(images, per_chunk):
            pixels = np.stack([as_hwc(images[i]) for i in positions])
            x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            views[positions] = batch_tta_views(x, self.config.tta)
        flat = views.flatten(0, 1)
        size = self.config.batch_size
        outputs = torch.cat([self._forward(flat[i : i + size]) for i in range(0, len(flat), size)])
        outputs = outputs.view(len(images), n_views)
        if self.config.tta == "seed":
            final, sd = combine_tta(outputs)
            raw_sd = sd.double().cpu().numpy()
        else:
            final = outputs[:, 0]
            raw_sd = np.full(len(images), np.nan)
        raw = final.double().cpu().numpy()
        return Prediction(raw=raw, raw_sd=raw_sd, cxr_age=calibrate(raw))

    @torch.inference_mode()
    def _forward(self, views: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(views).float()[:, 0]


def as_hwc(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, C]) picture, got {image.dtype} {image.shape}")
    return image[:, :, None] if image.ndim == 2 else image


def same_shape_chunks(images: Sequence[np.ndarray], size: int) -> list[list[int]]:
    """Positions grouped by picture shape (so each group is one batched transform), at most `size` each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(as_hwc(image).shape, []).append(i)
    return [pos[k : k + size] for pos in groups.values() for k in range(0, len(pos), size)]
