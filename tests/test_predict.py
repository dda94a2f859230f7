"""AgePredictor against the model composed by hand, and its batching/precision behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import random_state_dict
from cxrage_ray.model import build_model, calibrate
from cxrage_ray.predict import AgePredictor, PredictorConfig
from cxrage_ray.preprocess.fastai import combine_tta, tta_views


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(seed=3)


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(7)
    smooth = np.linspace(0, 255, 512 * 600).reshape(512, 600).astype(np.uint8)
    return [
        rng.integers(0, 256, (512, 512), dtype=np.uint8),
        np.dstack([smooth, smooth[::-1], smooth]),
        rng.integers(0, 256, (700, 512, 1), dtype=np.uint8),
    ]


def test_predict_equals_hand_composition(state_dict, pictures):
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=4))
    pred = predictor.predict(pictures)
    model = build_model(state_dict)
    with torch.no_grad():
        outs = torch.stack([model(tta_views(p))[:, 0] for p in pictures])
    final, sd = combine_tta(outs)
    np.testing.assert_allclose(pred.raw, final.double().numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.raw_sd, sd.double().numpy(), atol=1e-5)
    np.testing.assert_array_equal(pred.cxr_age, calibrate(pred.raw))
    assert pred.raw.dtype == np.float64 and pred.cxr_age.dtype == np.float64
    assert np.all(pred.raw_sd > 0)


def test_batch_size_does_not_change_results(state_dict, pictures):
    a = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=1)).predict(pictures)
    b = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=64)).predict(pictures)
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-5)


def test_tta_none_is_the_centre_view(state_dict, pictures):
    pred = AgePredictor(state_dict, PredictorConfig(device="cpu", tta="none")).predict(pictures)
    model = build_model(state_dict)
    with torch.no_grad():
        centre = torch.stack([model(tta_views(p, "none"))[0, 0] for p in pictures])
    np.testing.assert_allclose(pred.raw, centre.double().numpy(), atol=1e-5)
    assert np.all(np.isnan(pred.raw_sd))


def test_bf16_autocast_on_cpu_is_close(state_dict, pictures):
    fp32 = AgePredictor(state_dict, PredictorConfig(device="cpu")).predict(pictures)
    bf16 = AgePredictor(state_dict, PredictorConfig(device="cpu", precision="bf16")).predict(pictures)
    assert not np.array_equal(fp32.raw, bf16.raw)  # autocast really ran in bf16
    np.testing.assert_allclose(bf16.raw, fp32.raw, rtol=0.02, atol=0.05)


def test_empty_input(state_dict):
    pred = AgePredictor(state_dict, PredictorConfig(device="cpu")).predict([])
    assert pred.raw.shape == (0,)


def test_cuda_request_without_gpu_fails_clearly(state_dict):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        AgePredictor(state_dict, PredictorConfig(device="cuda"))
