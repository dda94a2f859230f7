"""The orientation network in numpy (`ArrayNetwork`) against the torch module it was trained as."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cxrage_ray.errors import WeightsError
from cxrage_ray.orient.array_network import ArrayNetwork, check_shapes
from cxrage_ray.orient.classifier import OrientationClassifier
from cxrage_ray.orient.network import build_network


def _trained_like(size: int, downsample: str, seed: int) -> torch.nn.Module:
    """A network with random weights and batch-norm statistics far from the identity (as training leaves them)."""
    torch.manual_seed(seed)
    net = build_network(size=size, downsample=downsample)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def real_films(cxr_sample) -> dict[str, np.ndarray]:
    """Seed-chain pictures of a dozen real films (frontal and lateral, as the sample's order has them)."""
    from cxrage_ray.decode.image import decode_image
    from cxrage_ray.preprocess.seed_chain import seed_chain

    files = sorted((cxr_sample / "images").iterdir())[::20][:12]
    return {f.name: seed_chain(decode_image(f.read_bytes(), f.name)) for f in files}


def _arrays(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in net.state_dict().items()}


@pytest.mark.parametrize(("size", "downsample"), [(64, "pool"), (96, "stride"), (128, "stride")])
def test_the_numpy_network_gives_the_torch_modules_logits(size: int, downsample: str) -> None:
    net = _trained_like(size, downsample, seed=size)
    x = np.random.default_rng(size).standard_normal((12, 1, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    got = ArrayNetwork.from_state(_arrays(net), downsample=downsample)(x)
    assert got.shape == (12, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * float(np.abs(expected).max()))


def test_the_shipped_classifier_decides_as_its_torch_module(real_films) -> None:
    """The committed weights through numpy (what `load` builds) and through the torch module trained: the same
    probabilities to ~1e-6 on real films lying every way, so the same turns and flags."""
    from safetensors.torch import load_file

    from cxrage_ray.model.packaged import packaged_file

    shipped = OrientationClassifier.load()
    assert isinstance(shipped.network, ArrayNetwork)
    arch = {"size": 96, "width": 8, "hidden": 64, "stages": 3, "downsample": "stride"}
    assert shipped.size == arch["size"]
    net = build_network(**arch)
    net.load_state_dict(load_file(str(packaged_file("orientation.safetensors"))))
    as_torch = OrientationClassifier(net, size=shipped.size, mirror_tta=shipped.mirror_tta)
    pictures = [np.ascontiguousarray(np.rot90(pic, k=-k)) for k, pic in enumerate(real_films.values())]
    ours, theirs = shipped.predict(pictures), as_torch.predict(pictures)
    for a, b in zip(ours, theirs):
        assert a.rotation == b.rotation
        np.testing.assert_allclose(a.rotation_probs, b.rotation_probs, atol=1e-5)
        assert abs(a.lateral_prob - b.lateral_prob) < 1e-5


def test_the_prepare_side_of_orientation_never_imports_torch(tmp_path) -> None:
    """A prepare worker classifies films without torch (its import cost each worker ~2.5 s of a core, issue 22)."""
    code = (
        "import sys, numpy as np\n"
        "from cxrage_ray.orient.stage import orient\n"
        "from cxrage_ray.config import OrientConfig\n"
        "pic = (np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 251).astype(np.uint8)\n"
        "result = orient(pic, image_id='x', uri='x.png', meta={}, chronological_age=50.0,"
        " config=OrientConfig(mode='auto'))\n"
        "assert result.image is not None\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_weights_of_another_shape_are_refused(tmp_path) -> None:
    net = ArrayNetwork.from_state(_arrays(_trained_like(96, "stride", seed=0)), downsample="stride")
    check_shapes(net, width=8, hidden=64, size=96, stages=3)
    with pytest.raises(ValueError, match="dense"):
        check_shapes(net, width=8, hidden=32, size=96, stages=3)
    with pytest.raises(ValueError, match="convs"):
        check_shapes(net, width=4, hidden=64, size=96, stages=3)
    with pytest.raises(ValueError, match="divisible"):
        check_shapes(net, width=8, hidden=64, size=100, stages=3)
    with pytest.raises(ValueError, match="downsample"):
        ArrayNetwork.from_state(_arrays(_trained_like(64, "pool", seed=0)), downsample="avg")
    # a weights file whose metadata names another architecture is a WeightsError naming the file
    from safetensors.numpy import save_file

    path = tmp_path / "orientation.safetensors"
    save_file(_arrays(_trained_like(96, "stride", seed=1)), str(path),
              metadata={"architecture": '{"size": 96, "width": 8, "hidden": 32, "stages": 3, "downsample": "stride"}'})
    with pytest.raises(WeightsError, match="does not match"):
        OrientationClassifier.load(path)
