"""AgePredictor against the model composed by hand, and its batching/precision behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import random_state_dict
from cxrage_ray.model.network import build_model, calibrate
from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
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
    # channels_last on the CPU (issue 22): the hand-composed NCHW model up to float rounding
    np.testing.assert_allclose(pred.raw, final.double().numpy(), atol=1e-4)
    np.testing.assert_allclose(pred.raw_sd, sd.double().numpy(), atol=1e-4)
    np.testing.assert_array_equal(pred.cxr_age, calibrate(pred.raw))
    assert pred.raw.dtype == np.float64 and pred.cxr_age.dtype == np.float64
    assert np.all(pred.raw_sd > 0)


def test_batch_size_does_not_change_results(state_dict, pictures):
    a = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=1)).predict(pictures)
    b = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=64)).predict(pictures)
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-5)


def test_a_films_age_does_not_depend_on_the_films_batched_with_it(state_dict, pictures):
    """Fixed-shape passes (the default): a film alone, or among others in another order, gets bitwise the same
    output, so a job's ages do not depend on how its films were grouped into batches (issue 23)."""
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=16))
    together = predictor.predict(pictures)
    for i, picture in enumerate(pictures):
        alone = predictor.predict([picture])
        assert alone.raw[0] == together.raw[i] and alone.cxr_age[0] == together.cxr_age[i]
    reordered = predictor.predict(pictures[::-1] + pictures[:1])
    np.testing.assert_array_equal(reordered.raw[:3], together.raw[::-1])
    # without it, a lone film's 5-view pass rounds differently from the 15 views' padded pass
    unpadded = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=16, fixed_shape=False))
    alone = [unpadded.predict([p]).raw[0] for p in pictures]
    assert not np.array_equal(alone, together.raw)
    np.testing.assert_allclose(alone, together.raw, atol=1e-5)


def test_tta_none_is_the_centre_view(state_dict, pictures):
    pred = AgePredictor(state_dict, PredictorConfig(device="cpu", tta="none")).predict(pictures)
    model = build_model(state_dict)
    with torch.no_grad():
        centre = torch.stack([model(tta_views(p, "none"))[0, 0] for p in pictures])
    np.testing.assert_allclose(pred.raw, centre.double().numpy(), atol=1e-4)
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


def test_fp32_on_cpu_scores_the_plain_model_within_1e_3_years():
    """The CPU's fast path (channels_last weights and inputs, issue 22) is the plain NCHW model up to float
    rounding: ages within 1e-3 years (demo weights: raw outputs in the trained model's range, where an age means
    something; the seeded random weights put raw near 10 and ages in the thousands) and smooth radiograph-like
    pictures (raw near 1, ages 75-79)."""
    from cxrage_ray.model.demo import demo_state_dict

    state_dict = demo_state_dict(seed=1)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:480]
    pictures = [(120 + 80 * np.sin(x / (30 + k)) * np.cos(y / (41 + k)) + rng.normal(0, 6, x.shape))
                .clip(0, 255).astype(np.uint8) for k in range(3)]
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=5))
    assert not predictor.compiled and predictor.engine == "torch"
    assert predictor.model[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    pred = predictor.predict(pictures)
    model = build_model(state_dict)
    with torch.no_grad():
        outs = torch.stack([model(tta_views(p))[:, 0] for p in pictures])
    final, _ = combine_tta(outs)
    np.testing.assert_allclose(pred.raw, final.double().numpy(), atol=1e-4)
    assert np.all((pred.cxr_age > 40) & (pred.cxr_age < 90))  # the range the tolerance is meant for
    np.testing.assert_allclose(pred.cxr_age, calibrate(final.double().numpy()), atol=1e-3)


def test_tensor_pictures_score_like_host_pictures(state_dict, pictures):
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=10))
    host = predictor.predict(pictures)
    tensors = predictor.predict([torch.from_numpy(np.ascontiguousarray(p)) for p in pictures])
    np.testing.assert_array_equal(host.raw, tensors.raw)


def test_folded_batchnorm_is_the_same_function(state_dict, pictures):
    plain = AgePredictor(state_dict, PredictorConfig(device="cpu", fold_batchnorm="off"))
    folded = AgePredictor(state_dict, PredictorConfig(device="cpu"))  # folded by default, CPU too (issue 22)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded._network.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())  # saliency keeps the original
    a, b = plain.predict(pictures), folded.predict(pictures)
    assert not np.array_equal(a.raw, b.raw)  # really a different computation
    np.testing.assert_allclose(b.raw, a.raw, atol=1e-4)


def test_compile_failure_falls_back_to_eager_with_a_warning(state_dict, pictures, monkeypatch, caplog):
    """A compiler that cannot build here (no toolchain, an unsupported GPU) must cost speed, not scores."""

    def failing_compile(module, **kwargs):
        def compiled(x):
            raise RuntimeError("inductor: C++ compiler not found")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", compile="on"))
    assert predictor.compiled
    with caplog.at_level("WARNING"):
        pred = predictor.predict(pictures)
    assert not predictor.compiled and "torch.compile failed" in caplog.text
    reference = AgePredictor(state_dict, PredictorConfig(device="cpu")).predict(pictures)
    np.testing.assert_allclose(pred.raw, reference.raw, atol=1e-5)  # padded batch: float-level only


def test_compiled_batches_are_padded_to_one_shape(state_dict, pictures, monkeypatch):
    seen: list[tuple[int, ...]] = []

    def recording_compile(module, **kwargs):
        def compiled(x):
            seen.append(tuple(x.shape))
            return module(x)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    predictor = AgePredictor(state_dict, PredictorConfig(device="cpu", compile="on", batch_size=4))
    pred = predictor.predict(pictures)  # 15 views -> 4 batches of 4, the last padded
    assert seen == [(4, 3, 224, 224)] * 4
    reference = AgePredictor(state_dict, PredictorConfig(device="cpu", batch_size=4)).predict(pictures)
    np.testing.assert_allclose(pred.raw, reference.raw, atol=1e-6)
