"""The fastai transform against spec §3.5's reference (verified bit-exact against fastai 1.0.61) and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrage_ray.preprocess.fastai import (
    TTA_CORNERS,
    _crop_pad,
    combine_tta,
    fastai_view,
    normalize,
    to_unit_tensor,
    tta_views,
)

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def reference_transform(x, size=224, zoom=None, row_pct=0.5, col_pct=0.5):
    """Spec §3.5, verbatim apart from layout."""
    C, H, W = x.shape
    ratio = min(H / size, W / size)
    Ht, Wt = int(round(H / ratio)), int(round(W / ratio))
    if (Ht, Wt) != (H, W) or zoom is not None:
        gy = torch.linspace(-1, 1, Ht) if Ht > 1 else torch.tensor([-1.0])
        gx = torch.linspace(-1, 1, Wt) if Wt > 1 else torch.tensor([-1.0])
        grid = torch.empty(1, Ht, Wt, 2)
        grid[..., 0] = gx[None, :].expand(Ht, Wt)
        grid[..., 1] = gy[:, None].expand(Ht, Wt)
        if zoom is not None:
            s = 1 - 1 / zoom
            m = torch.tensor([[1 / zoom, 0.0, s * (2 * col_pct - 1)], [0.0, 1 / zoom, s * (2 * row_pct - 1)]]).float()
            grid = torch.addmm(m[:, 2], grid.view(-1, 2), m[:, :2].t()).view(1, Ht, Wt, 2)
        z = 1 / (grid.max() - grid.min()).item() * 2
        d = min(H / Ht, W / Wt) / 2
        src = (
            F.adaptive_avg_pool2d(x[None], (math.floor(H * (1 / d)), math.floor(W * (1 / d))))[0]
            if (d > 1 and d > z)
            else x
        )
        x = F.grid_sample(src[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    if tuple(x.shape[1:]) != (size, size):
        rp = row_pct - 1e-7 if row_pct == 1 else row_pct
        cp = col_pct - 1e-7 if col_pct == 1 else col_pct
        r = int((x.shape[1] - size + 1) * rp)
        c = int((x.shape[2] - size + 1) * cp)
        x = x[:, r : r + size, c : c + size].contiguous()
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def reference_open(image_u8: np.ndarray) -> torch.Tensor:
    """fastai open_image: PIL convert('RGB') -> float32 / 255."""
    rgb = np.repeat(image_u8[:, :, None], 3, axis=2) if image_u8.ndim == 2 else image_u8
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1).contiguous().div_(255)


@pytest.mark.parametrize(
    "shape",
    [(512, 512), (512, 618, 3), (640, 512), (224, 224), (300, 251), (120, 90), (900, 512, 3), (1024, 1024)],
)
def test_views_equal_reference_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    views = tta_views(image, "seed")
    ref_x = reference_open(image)
    expected = [reference_transform(ref_x)] + [
        reference_transform(ref_x, zoom=1.35, row_pct=r, col_pct=c) for r, c in TTA_CORNERS
    ]
    assert views.shape == (5, 3, 224, 224)
    for got, want in zip(views, expected):
        assert torch.equal(got, want)
    assert torch.equal(tta_views(image, "none")[0], expected[0])


def test_area_prefilter_rule_applies_only_beyond_2x():
    # 512 -> 224: d = 512/224/2 = 1.14 > 1 = z, so the centre view is area-averaged to 448 first;
    # the zoom-1.35 corners have z = 1.35 > d and sample the full image directly.
    image = (np.arange(512 * 512) % 251).astype(np.uint8).reshape(512, 512)
    x = to_unit_tensor(image)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="xy"), -1)
    pooled = F.adaptive_avg_pool2d(x[None], (448, 448))
    manual = F.grid_sample(pooled, grid[None], mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    assert torch.equal(fastai_view(x), manual)
    direct = F.grid_sample(x[None], grid[None], mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    assert not torch.equal(fastai_view(x), direct)


def test_identity_when_already_224():
    image = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    x = to_unit_tensor(image)
    assert torch.equal(fastai_view(x), x)


def test_crop_pad_positions_by_hand():
    x = torch.arange(1 * 230 * 240, dtype=torch.float32).view(1, 230, 240)
    centre = _crop_pad(x, 224, 0.5, 0.5)  # row = int(7 * 0.5) = 3, col = int(17 * 0.5) = 8
    assert centre[0, 0, 0].item() == 3 * 240 + 8
    bottom_right = _crop_pad(x, 224, 1.0, 1.0)  # int(7 * (1 - 1e-7)) = 6, int(17 * (1 - 1e-7)) = 16
    assert bottom_right[0, 0, 0].item() == 6 * 240 + 16
    assert _crop_pad(x, 224, 0.0, 0.0)[0, 0, 0].item() == 0


def test_normalize_by_hand():
    grey = torch.full((1, 1, 2, 2), 0.5)
    out = normalize(grey)
    assert out.shape == (1, 3, 2, 2)
    expected = [(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-7)


def test_combine_tta_by_hand():
    outputs = torch.tensor([[1.0, 0.0, 1.0, 2.0, 3.0], [-0.5, 0.2, 0.2, 0.2, 0.2]])
    final, sd = combine_tta(outputs)
    # mean of corners 1.5 -> 0.4*1 + 0.6*1.5 = 1.3; unbiased sd of [0,1,2,3,0,1,2,3] = sqrt(10/7)
    assert final[0].item() == pytest.approx(1.3, abs=1e-6)
    assert sd[0].item() == pytest.approx(math.sqrt(10 / 7), abs=1e-6)
    assert final[1].item() == pytest.approx(-0.2 + 0.12, abs=1e-6)
    assert sd[1].item() == pytest.approx(0.0, abs=1e-7)


def test_rejects_bad_dtype():
    with pytest.raises(ValueError):
        to_unit_tensor(np.zeros((10, 10), dtype=np.uint16))


def test_batched_views_equal_single_views():
    from cxrage_ray.preprocess.fastai import batch_tta_views

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (530, 512, 3), dtype=np.uint8) for _ in range(3)]
    batch = torch.stack([to_unit_tensor(im) for im in images])
    views = batch_tta_views(batch, "seed")
    assert views.shape == (3, 5, 3, 224, 224)
    for i, im in enumerate(images):
        assert torch.equal(views[i], tta_views(im, "seed"))


@pytest.mark.parametrize("zoom, corner", [(None, (0.5, 0.5)), (1.35, (0.0, 0.0)), (1.35, (1.0, 0.0)),
                                          (1.35, (0.0, 1.0)), (1.35, (1.0, 1.0)), (2.0, (0.3, 0.9))])
def test_the_zoom_factor_is_known_on_the_host_as_fastai_computes_it(zoom, corner):
    """fastai read `1 / (grid.max() - grid.min()) * 2` back from the device for every view (a host sync per view
    on a GPU); the host's value is within 1e-6 of it, so the pre-filter decision it feeds is fastai's."""
    from cxrage_ray.preprocess.fastai import _zoom_in_factor, view_grid

    for ht, wt in ((224, 224), (224, 301), (389, 224), (224, 1170)):
        grid = view_grid(ht, wt, zoom, corner[0], corner[1], torch.device("cpu"))
        on_device = 1 / (grid.max() - grid.min()).item() * 2
        assert abs(_zoom_in_factor(grid, zoom, corner[0], corner[1], d=100.0) - on_device) < 1e-6
        assert _zoom_in_factor(grid, zoom, corner[0], corner[1], d=on_device) == on_device  # too close: asked
