"""Saliency (spec §6): input gradients against hand/finite-difference values, Grad-CAM on a planted feature,
the original's blend pixel by pixel, x86 wrap-around, and that saliency leaves the scores unchanged."""

from __future__ import annotations

import copy
import io
import math
import platform

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrage_ray.model.demo import demo_state_dict
from cxrage_ray.model.network import build_model
from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
from cxrage_ray.preprocess.fastai import tta_views
from cxrage_ray.predict.saliency import (
    SaliencyMaker,
    blend_like_original,
    gradcam,
    hot_lut,
    input_gradient_saliency,
    saliency_png,
    uint8_like_x86,
)


def _hot_by_hand(k: int) -> tuple[int, int, int]:
    """matplotlib's 'hot' segment data (red 0.0416 -> 1 on [0, .365079], green on [.365079, .746032], blue on
    [.746032, 1]) at k/255, times 255, truncated — written out independently of matplotlib."""
    x = k / 255
    r = min(1.0, 0.0416 + (1 - 0.0416) * x / 0.365079)
    g = min(1.0, max(0.0, (x - 0.365079) / (0.746032 - 0.365079)))
    b = max(0.0, (x - 0.746032) / (1 - 0.746032))
    return int(r * 255), int(g * 255), int(b * 255)


def _blend_by_hand(xray: int, heat: int) -> int:
    return math.trunc(xray + 0.5 * (heat - xray))  # PIL ImagingBlend: (UINT8)(in1 + alpha * (in2 - in1))


@pytest.fixture(scope="module")
def state_dict():
    return demo_state_dict(seed=1)


@pytest.fixture(scope="module")
def model(state_dict):
    return build_model(state_dict).eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(11)
    smooth = np.linspace(0, 255, 300 * 260).reshape(300, 260).astype(np.uint8)
    return [
        rng.integers(0, 256, (256, 256), dtype=np.uint8),
        np.dstack([smooth, smooth[::-1], smooth]),
        rng.integers(0, 256, (256, 256), dtype=np.uint8),
    ]


# --- vanilla input-gradient saliency ---------------------------------------------------------------------


def test_grad_equals_hand_computed_gradient_on_tiny_model():
    # y = sum_p b_p relu(sum_c a_c x_cp): dy/dx_cp = b_p [z_p > 0] a_c, a single float32 product per entry.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 1, 1, bias=False)
    lin = nn.Linear(4 * 5, 1)
    tiny = nn.Sequential(nn.Sequential(conv, nn.ReLU()), nn.Sequential(nn.Flatten(), lin)).eval()
    x = torch.randn(2, 3, 4, 5)
    sal = input_gradient_saliency(tiny, x)

    a = conv.weight.detach().numpy().reshape(3)
    b = lin.weight.detach().numpy().reshape(4, 5)
    z = np.einsum("c,nchw->nhw", a, x.numpy())
    expected = np.abs(a[None, :, None, None] * (b * (z > 0))[:, None]).max(axis=1)
    assert sal.shape == (2, 4, 5) and sal.dtype == np.float32
    np.testing.assert_array_equal(sal, expected.astype(np.float32))
    assert (sal == 0).any() and (sal > 0).any()  # the ReLU gate did cut some pixels


def test_grad_matches_finite_differences_on_real_model(model64):
    m64 = model64
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sal = input_gradient_saliency(m64, x)
    eps = 1e-6
    pixels = [(5, 7), (30, 41)]
    probes = []  # +eps and -eps at each (channel, pixel), all in one eval-mode batch
    for i, j in pixels:
        for c in range(3):
            for sign in (1, -1):
                probe = x[0].clone()
                probe[c, i, j] += sign * eps
                probes.append(probe)
    with torch.no_grad():
        y = m64(torch.stack(probes))[:, 0].view(len(pixels), 3, 2)
    fd = ((y[..., 0] - y[..., 1]) / (2 * eps)).abs().amax(dim=1)
    for (i, j), expected in zip(pixels, fd.tolist()):
        assert sal[0, i, j] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_batched_grad_equals_per_image_backward(model, model64):
    views = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    batched = input_gradient_saliency(model, views)
    assert batched.shape == (3, 112, 112) and batched.dtype == np.float32
    for k in range(len(views)):
        x = views[k : k + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x)[0, 0], x)
        own = g.abs().amax(dim=1)[0].numpy()
        np.testing.assert_allclose(batched[k], own, rtol=1e-5, atol=1e-6 * own.max())
    # fp32 (the product's precision) agrees with the float64 map. (At tiny sizes such as 48 px a near-tie
    # in a max-pool can flip between precisions, so this is checked here rather than in the test above.)
    np.testing.assert_allclose(batched, input_gradient_saliency(model64, views.double()), atol=1e-4 * batched.max())


# --- Grad-CAM --------------------------------------------------------------------------------------------


def test_gradcam_highlights_planted_feature_and_equals_hand_cam():
    # body: two 32x32/stride-32 "detectors" (cell brightness, and its negative) -> (N, 2, 7, 7); head: avg + linear.
    conv = nn.Conv2d(3, 2, 32, stride=32, bias=False)
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        conv.weight[0] = 1 / (3 * 32 * 32)
        conv.weight[1] = -1 / (3 * 32 * 32)
        lin.weight[:] = torch.tensor([[1.0, 0.5]])
        lin.bias.zero_()
    net = nn.Sequential(nn.Sequential(conv), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)).eval()
    x = torch.zeros(2, 3, 224, 224)
    x[0, :, 64:96, 160:192] = 10.0  # cell (2, 5)
    x[1, :, 192:224, 0:32] = 4.0  # cell (6, 0)
    cam = gradcam(net, x)
    assert cam.shape == (2, 224, 224) and cam.dtype == np.float32
    assert cam.min() >= 0 and np.allclose(cam.max(axis=(1, 2)), 1.0)
    r, c = np.unravel_index(cam[0].argmax(), cam[0].shape)
    assert 64 <= r < 96 and 160 <= c < 192
    r, c = np.unravel_index(cam[1].argmax(), cam[1].shape)
    assert 192 <= r < 224 and 0 <= c < 32
    assert cam[0, :32, :32].max() == 0 and cam[1, :32, 192:].max() == 0

    # by hand: alpha = (1, 0.5) / 49, A = (v, -v) in the planted cell -> cam = relu(v/49 - v/98) there
    for k, (cell, v) in enumerate([((2, 5), 10.0), ((6, 0), 4.0)]):
        small = torch.zeros(1, 1, 7, 7)
        small[0, 0, cell[0], cell[1]] = v / 49 - 0.5 * v / 49
        up = nn.functional.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(cam[k], (up / up.max()).numpy(), atol=1e-6)


def test_gradcam_on_real_model_is_batched_and_normalised(model, pictures):
    views = torch.cat([tta_views(p, "none") for p in pictures[:2]])
    cam = gradcam(model, views)
    assert cam.shape == (2, 224, 224) and cam.dtype == np.float32
    assert cam.min() >= 0 and np.allclose(cam.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(cam[1], gradcam(model, views[1:2])[0], atol=1e-5)


# --- the original's blend ----------------------------------------------------------------------------------


def test_hot_lut_matches_hand_computed_colours():
    lut = hot_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    for k in (0, 40, 100, 150, 200, 230, 254, 255):
        assert tuple(lut[k]) == _hot_by_hand(k)


@pytest.mark.parametrize("k", [0, 40, 150, 255])
def test_uniform_saliency_blend_equals_hand_pixel(k):
    grey = np.full((37, 53), 100, dtype=np.uint8)
    sal = np.full((224, 224), (k + 0.5) / 255 if k < 255 else 1.0, dtype=np.float32)  # uint8(s*255) == k
    out = blend_like_original(sal, grey)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    expected = [_blend_by_hand(100, h) for h in _hot_by_hand(k)]
    assert (out == np.array(expected, dtype=np.uint8)).all()


def test_blend_of_colour_film_equals_hand_pixel():
    film = np.empty((20, 30, 3), dtype=np.uint8)
    film[:] = (7, 120, 251)
    out = blend_like_original(np.full((224, 224), 40.5 / 255, np.float32), film)
    expected = [_blend_by_hand(v, h) for v, h in zip((7, 120, 251), _hot_by_hand(40))]
    assert (out == np.array(expected, dtype=np.uint8)).all()


def test_to_tensor_round_trip_is_identity_for_8_bit_values():
    v = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(v.float().div(255).mul(255).byte(), v)  # the claim made in blend_like_original


def test_uint8_like_x86_wraps():
    values = np.array([0.5, 0.99, 255.9, 256, 300.2, 382.5, -3.5, 1e10, np.nan, np.inf], np.float32)
    np.testing.assert_array_equal(uint8_like_x86(values), [0, 0, 255, 0, 44, 126, 253, 0, 0, 0])


def test_blend_wraps_large_gradients_like_the_original():
    grey = np.full((10, 12), 60, dtype=np.uint8)
    out = blend_like_original(np.full((224, 224), 2.0, np.float32), grey)  # 510 -> 510 mod 256 = 254
    expected = [_blend_by_hand(60, h) for h in _hot_by_hand(254)]
    assert (out == np.array(expected, dtype=np.uint8)).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="np.uint8 wrap is x86 behaviour")
def test_blend_equals_literal_original_code():
    """blendImage as run_model.py wrote it (torchvision transforms, matplotlib cm, np.uint8 on x86)."""
    tv = pytest.importorskip("torchvision.transforms")
    import matplotlib

    rng = np.random.default_rng(5)
    heatmap = (rng.random((224, 224)) ** 3 * 1.6).astype(np.float32)  # some values >= 256 after *255
    film = rng.integers(0, 256, (300, 410), dtype=np.uint8)

    with np.errstate(invalid="ignore"):
        hm = np.uint8(heatmap * 255)
    hm = tv.ToPILImage()(hm).convert("L").resize((410, 300), Image.BILINEAR)
    heat = Image.fromarray(np.uint8(matplotlib.colormaps["hot"](np.array(hm)) * 255)).convert("RGB")
    xray = tv.ToPILImage()(tv.ToTensor()(Image.fromarray(film).convert("RGB")))
    expected = np.asarray(Image.blend(xray, heat, 0.5))

    np.testing.assert_array_equal(blend_like_original(heatmap, film), expected)
    png = saliency_png(heatmap, film)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)


# --- SaliencyMaker and the model's state -------------------------------------------------------------------


def test_saliency_maker_pngs_at_film_size(model, pictures):
    maps = SaliencyMaker(model, "grad", batch_size=2).maps(pictures)  # two shapes -> two batches
    assert [m.shape for m in maps] == [(224, 224)] * 3
    # grouped by shape and batched, yet each map is its own centre view's
    np.testing.assert_array_equal(maps[1], input_gradient_saliency(model, tta_views(pictures[1], "none"))[0])

    (png,) = SaliencyMaker(model, "gradcam")(pictures[1:2])
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape == (300, 260, 3)
    cam = gradcam(model, tta_views(pictures[1], "none"))[0]
    np.testing.assert_array_equal(img, blend_like_original(cam, pictures[1]))


def test_saliency_does_not_change_scores_or_model(state_dict, pictures):
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", tta="none", batch_size=4))
    before = predictor.predict(pictures[:2])
    params = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    with torch.inference_mode():  # as inside a predictor that scores under inference mode
        SaliencyMaker(predictor.model, "grad")(pictures[:2])
        SaliencyMaker(predictor.model, "gradcam")(pictures[:2])
    after = predictor.predict(pictures[:2])
    np.testing.assert_array_equal(after.raw, before.raw)
    np.testing.assert_array_equal(after.cxr_age, before.cxr_age)
    assert not predictor.model.training
    assert all(p.grad is None for p in predictor.model.parameters())
    assert all(torch.equal(v, params[k]) for k, v in predictor.model.state_dict().items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in predictor.model.modules())


def test_refuses_train_mode_and_unknown_method(state_dict):
    net = build_model(state_dict).train()
    with pytest.raises(ValueError, match="eval mode"):
        SaliencyMaker(net)
    with pytest.raises(ValueError, match="eval mode"):
        input_gradient_saliency(net, torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="method"):
        SaliencyMaker(net.eval(), "smoothgrad")  # type: ignore[arg-type]
