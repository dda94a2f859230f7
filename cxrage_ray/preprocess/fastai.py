"""fastai v1's inference transform and the CXR-Age TTA views, in plain torch (spec §3-§5).

In:  an 8-bit image (H, W, C) with C in {1, 3} (what fastai's `open_image` read from the seed-chain PNG).
Out: normalised float32 views (V, 3, 224, 224): the centre view, then (with TTA) the four zoom-1.35 corner
     views in the original's order TL, BL, TR, BR.

This reproduces fastai 1.0.61 bit-exactly for the deterministic transforms: short side -> 224 through an
`affine_grid` + bilinear `grid_sample` (align_corners=True, reflection padding), preceded by an area
pre-filter when downscaling by more than 2x ("hack to get smoother downwards resampling"), then
`crop_pad`, then ImageNet normalisation. The original's random rotate/lighting draws are not reproduced
(spec §5: they made its outputs single random draws).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrage_ray.config import TTAMode

SIZE = 224
TTA_ZOOM = 1.35
TTA_BETA = 0.4  # weight of the centre pass in the final prediction (run_model.py `beta`)
TTA_AVG_WEIGHT = 0.6  # written as the literal the original used, not 1 - beta
#: (row_pct, col_pct) of the original's passes i = 0..3: row = i & 1, col = i & 2 -> TL, BL, TR, BR.
TTA_CORNERS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def to_unit_tensor(image_u8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [0, 1], as `pil2tensor(...)/255` computes it.

    Grey images keep one channel here (every later step is per-channel, so the result equals
    PIL's `convert('RGB')` replication bit for bit); `normalize` expands them to three.
    """
    if image_u8.ndim == 2:
        image_u8 = image_u8[:, :, None]
    if image_u8.dtype != np.uint8 or image_u8.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {image_u8.dtype} {image_u8.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).to(device)
    return x.permute(2, 0, 1).float().div_(255)


def fastai_view(
    x: torch.Tensor, size: int = SIZE, zoom: float | None = None, row_pct: float = 0.5, col_pct: float = 0.5
) -> torch.Tensor:
    """Un-normalised view(s) of x: fastai's resize + optional zoom + crop_pad.

    Args:
        x: (C, H, W) or a batch (N, C, H, W) of same-sized images, float in [0, 1].

    Returns:
        (C, size, size) or (N, C, size, size). Every operation is per image and per channel, so a batch
        gives exactly the per-image results.
    """
    if x.dim() == 3:
        return fastai_view(x[None], size, zoom, row_pct, col_pct)[0]
    n, _, h, w = x.shape
    ratio = min(h / size, w / size)
    ht, wt = int(round(h / ratio)), int(round(w / ratio))  # Python round: half to even, as fastai
    if (ht, wt) != (h, w) or zoom is not None:
        grid = view_grid(ht, wt, zoom, row_pct, col_pct, x.device)
        d = min(h / ht, w / wt) / 2  # half the downscale factor
        src = x
        if d > 1 and d > _zoom_in_factor(grid, zoom, row_pct, col_pct, d):  # fastai's area pre-filter
            src = F.adaptive_avg_pool2d(x, (math.floor(h * (1 / d)), math.floor(w * (1 / d))))
        x = F.grid_sample(src, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="reflection",
                          align_corners=True)
    if tuple(x.shape[2:]) != (size, size):
        x = _crop_pad(x, size, row_pct, col_pct)
    return x


@functools.lru_cache(maxsize=256)  # a batch's pictures share few shapes; archives have many: bounded
def view_grid(ht: int, wt: int, zoom: float | None, row_pct: float, col_pct: float, device: torch.device
              ) -> torch.Tensor:
    """fastai's sampling grid (1, ht, wt, 2) for a resize to (ht, wt), zoomed about the corner `row_pct, col_pct`
    when `zoom` is given; cached, so each view's grid is built once, not per batch (five kernel launches each on a
    GPU); callers never write to it."""
    grid = _resize_grid(ht, wt, device)
    if zoom is not None:
        s = 1 - 1 / zoom
        m = torch.tensor(
            [[1 / zoom, 0.0, s * (2 * col_pct - 1)], [0.0, 1 / zoom, s * (2 * row_pct - 1)]], device=device
        ).float()
        grid = torch.addmm(m[:, 2], grid.view(-1, 2), m[:, :2].t()).view(1, ht, wt, 2)
    return grid


def _zoom_in_factor(grid: torch.Tensor, zoom: float | None, row_pct: float, col_pct: float, d: float) -> float:
    """fastai's `1 / (grid.max() - grid.min()) * 2`, which only decides `d > z` (the area pre-filter).

    The grid spans [-1, 1] shrunk by 1/zoom and shifted per axis, so z is known on the host to well within 1e-6;
    the device is asked (a host sync, as fastai did) only when `d` is that close to it, so the decision, and with
    it the view, is always fastai's own."""
    if zoom is None:
        z = 1.0
    else:
        shift = (1 - 1 / zoom) * abs((2 * col_pct - 1) - (2 * row_pct - 1))
        z = 2 / (2 / zoom + shift)
    if abs(d - z) > 1e-4 and min(grid.shape[1:3]) > 1:  # a one-pixel side's grid is [-1] only, not [-1, 1]
        return z
    return 1 / (grid.max() - grid.min()).item() * 2


def _resize_grid(ht: int, wt: int, device: torch.device) -> torch.Tensor:
    """fastai's `_affine_grid`: x along width, y along height, in [-1, 1] (float32)."""
    gy = torch.linspace(-1, 1, ht, device=device) if ht > 1 else torch.tensor([-1.0], device=device)
    gx = torch.linspace(-1, 1, wt, device=device) if wt > 1 else torch.tensor([-1.0], device=device)
    grid = torch.empty(1, ht, wt, 2, device=device)
    grid[..., 0] = gx[None, :].expand(ht, wt)
    grid[..., 1] = gy[:, None].expand(ht, wt)
    return grid


def _crop_pad(x: torch.Tensor, size: int, row_pct: float, col_pct: float) -> torch.Tensor:
    """fastai's `_crop_pad_default` on the last two dims, for images at least `size` on both sides."""
    h, w = x.shape[-2:]
    if min(h, w) < size:  # cannot happen after the resize; refuse rather than silently differ
        raise ValueError(f"image {(h, w)} smaller than the {size} crop")
    rp = row_pct - 1e-7 if row_pct == 1 else row_pct
    cp = col_pct - 1e-7 if col_pct == 1 else col_pct
    r = int((h - size + 1) * rp)
    c = int((w - size + 1) * cp)
    return x[..., r : r + size, c : c + size].contiguous()


def normalize(views: torch.Tensor) -> torch.Tensor:
    """(V, C, H, W) in [0, 1] -> ImageNet-normalised (V, 3, H, W); grey (C=1) is replicated first."""
    if views.shape[1] == 1:
        views = views.expand(-1, 3, -1, -1)
    mean, std = _imagenet_stats(views.device)
    return (views - mean) / std


@functools.lru_cache(maxsize=8)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (3, 1, 1) tensors on `device`, moved there once (a blocking upload per call
    was a host sync per picture shape on a GPU)."""
    return IMAGENET_MEAN.to(device)[:, None, None], IMAGENET_STD.to(device)[:, None, None]


def tta_views(image_u8: np.ndarray, tta: TTAMode = "seed", device: torch.device | str = "cpu") -> torch.Tensor:
    """The model inputs for one image: (1 or 5, 3, 224, 224) normalised float32 (centre first)."""
    return batch_tta_views(to_unit_tensor(image_u8, device)[None], tta)[0]


def batch_tta_views(x: torch.Tensor, tta: TTAMode = "seed") -> torch.Tensor:
    """Same-sized images (N, C, H, W) in [0, 1] -> (N, V, 3, 224, 224), V = 5 with TTA else 1."""
    views = [fastai_view(x)]
    if tta == "seed":
        views += [fastai_view(x, zoom=TTA_ZOOM, row_pct=r, col_pct=c) for r, c in TTA_CORNERS]
    n, v = x.shape[0], len(views)
    stacked = torch.stack(views, dim=1)  # (N, V, C, 224, 224)
    return normalize(stacked.flatten(0, 1)).view(n, v, 3, SIZE, SIZE)


def combine_tta(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) raw outputs [centre, TL, BL, TR, BR] -> (final, sd) as the original's `_TTA` (float32).

    The original ran each corner twice (8 passes, the flip commented out); with deterministic passes the
    duplicates are identical, so we stack each corner twice to reproduce its mean and its unbiased (n-1 = 7)
    standard deviation exactly.
    """
    if outputs.shape[0] == 0:
        return outputs[:, 0], outputs[:, 0]
    centre, corners = outputs[:, 0], outputs[:, 1:5]
    passes = torch.cat([corners, corners], dim=1)
    avg = passes.mean(dim=1)
    sd = passes.std(dim=1)
    return centre * TTA_BETA + avg * TTA_AVG_WEIGHT, sd
