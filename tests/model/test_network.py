"""CXRAgeNet's module tree against seed spec §2 / Appendix A, its forward pass, and the calibration."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from checkpoints import random_state_dict
from torch import nn

from cxrage_ray.errors import WeightsError
from cxrage_ray.model.network import AGE_MEAN, AGE_SD, CXRAgeNet, build_model, calibrate, expected_shapes

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, n: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{s}", () if s == "num_batches_tracked" else (n,)) for s in BN_SUFFIXES]


def appendix_a() -> list[tuple[str, tuple[int, ...]]]:
    """The 237 (key, shape) pairs written out from the spec's description, independently of torchvision."""
    keys = [("0.0.weight", (64, 3, 7, 7)), *_bn("0.1", 64)]
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=4):
        for b in range(blocks):
            p = f"0.{layer}.{b}"
            keys += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3)), *_bn(f"{p}.bn1", planes),
                     (f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes)]
            if b == 0 and layer > 4:
                keys += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1)), *_bn(f"{p}.downsample.1", planes)]
            inplanes = planes
    keys += [*_bn("1.2", 1024), ("1.4.weight", (512, 1024)), ("1.4.bias", (512,)), *_bn("1.6", 512),
             ("1.8.weight", (16, 512)), ("1.8.bias", (16,)), *_bn("1.10", 16),
             ("1.11.weight", (1, 16)), ("1.11.bias", (1,))]
    return keys


@pytest.fixture(scope="module")
def net() -> CXRAgeNet:
    return CXRAgeNet()


def test_state_dict_keys_order_and_shapes_match_appendix_a(net):
    sd = net.state_dict()
    assert len(sd) == 237
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == appendix_a()
    assert list(expected_shapes().items()) == appendix_a()
    spot = {"0.0.weight": (64, 3, 7, 7), "0.5.0.downsample.0.weight": (128, 64, 1, 1),
            "0.7.2.conv2.weight": (512, 512, 3, 3), "1.2.running_var": (1024,), "1.4.weight": (512, 1024),
            "1.8.weight": (16, 512), "1.10.num_batches_tracked": (), "1.11.weight": (1, 16), "1.11.bias": (1,)}
    for key, shape in spot.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["1.10.num_batches_tracked"].dtype == torch.int64
    assert sum(v.dtype == torch.int64 for v in sd.values()) == 39  # one per BatchNorm layer


def test_parameter_counts(net):
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 21_820_801
    assert sum(v.numel() for v in net.state_dict().values() if v.dtype == torch.float32) == 21_840_929


def test_state_dict_matches_spec_appendix_a_text(net, shared_dir):
    """When ../shared is present, compare with the spec's own table (not just our transcription of it)."""
    text = (shared_dir / "seed-spec.md").read_text(encoding="utf-8")
    appendix = text[text.index("## Appendix A"):text.index("## Appendix B")]
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \| \(([\d, ]*)\) \| (\w+) \|$", appendix, flags=re.M)
    table = [(k, tuple(int(x) for x in shape.replace(" ", "").split(",") if x)) for _, k, shape, _ in rows]
    assert len(table) == 237
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == table


def test_module_tree(net):
    head = net[1]
    assert len(net) == 2 and len(net[0]) == 8 and len(head) == 12
    assert [type(m).__name__ for m in head] == [
        "AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout",
        "Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert head[3].p == 0.25 and head[7].p == 0.5
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_body_is_torchvisions_resnet34_value_for_value():
    """The body is written out (importing torchvision cost ~1 s per process); against torchvision itself: the same
    modules, the same seeded initial values (demo weights depend on them), and the same forward pass."""
    import torchvision

    from cxrage_ray.model.network import _body

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ours = _body()
        torch.manual_seed(3)
        theirs = nn.Sequential(*list(torchvision.models.resnet34(weights=None).children())[:-2])
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert float(ours_sd["4.1.conv2.weight"].std()) > 0  # the values compared are random draws, not zeros
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_building_the_model_imports_no_compiler_machinery():
    """In a fresh interpreter, `build_model` (and the checkpoint check) stay clear of torchvision, torch._dynamo and
    torch's symbolic shapes: importing them cost every predictor actor ~2.5 s on 2 cores (issue 15)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from cxrage_ray.model.network import CXRAgeNet, build_model, check_state_dict\n"
        "state_dict = CXRAgeNet().state_dict()\n"
        "check_state_dict(state_dict)\n"
        "model = build_model(state_dict)\n"
        "assert all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items())\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'torch.fx.experimental.symbolic_shapes')\n"
        "             if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_forward_equals_hand_composed_forward():
    model = build_model(random_state_dict(seed=5))
    assert not model.training
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 0.5
    head = model[1]
    with torch.no_grad():
        out = model(x)
        f = model[0](x)
        assert f.shape == (3, 512, 7, 7)
        pooled = torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], 1)  # MAX first, then AVG

        def bn(m, v):
            return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

        h = bn(head[2], pooled)
        h = torch.relu(h @ head[4].weight.T + head[4].bias)
        h = bn(head[6], h)
        h = torch.relu(h @ head[8].weight.T + head[8].bias)
        h = bn(head[10], h)
        expected = h @ head[11].weight.T + head[11].bias
    assert out.shape == (3, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # swapping max and avg changes the result: the order is real, not a coincidence of the weights
    swapped = torch.cat([pooled[:, 512:], pooled[:, :512]], 1)
    with torch.no_grad():
        assert not torch.allclose(head[2:](swapped), out, atol=1e-3)


def test_random_weights_give_realistic_raw_outputs():
    model = build_model(random_state_dict(seed=5))
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
                                             size=224, mode="bilinear", align_corners=False)
    with torch.no_grad():
        raw = model((smooth - 0.45) / 0.226)[:, 0]
    assert raw.abs().max() < 3 and raw.std() > 1e-3


def test_build_model_rejects_wrong_shapes():
    sd = random_state_dict(seed=5)
    sd["1.11.weight"] = torch.zeros(2, 16)
    with pytest.raises(WeightsError, match=r"1\.11\.weight: \(2, 16\) \(expected \(1, 16\)\)"):
        build_model(sd)
    del sd["1.11.weight"]
    sd["fc.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys: 1\.11\.weight.*unexpected keys: fc\.weight"):
        build_model(sd)


def test_calibrate_hand_computed_values():
    # raw 0 -> arr = mean: 6.75523*63.8723890235948 - 0.03771*63.8723890235948**2 - 213.77257
    assert calibrate(0.0) == pytest.approx(63.85529728284, abs=1e-9)
    # raw 1 -> arr = 71.90581351498868
    assert calibrate(1.0) == pytest.approx(6.75523 * 71.90581351498868 - 0.03771 * 71.90581351498868**2 - 213.77257,
                                           abs=1e-12)
    assert calibrate(1.0) == pytest.approx(76.99021932027, abs=1e-9)
    assert calibrate(-1.0) == pytest.approx(45.85307698419, abs=1e-9)
    values = calibrate(np.array([0.0, 1.0, -1.0], dtype=np.float32))
    assert values.dtype == np.float64 and values.shape == (3,)
    np.testing.assert_allclose(values, [63.85529728284, 76.99021932027, 45.85307698419], atol=1e-9)
    assert AGE_SD == 8.03342449139388 and AGE_MEAN == 63.8723890235948


def test_calibrate_vertex_is_the_maximum():
    arr_vertex = 6.75523 / (2 * 0.03771)  # 89.5681...
    raw_vertex = (arr_vertex - AGE_MEAN) / AGE_SD
    peak = calibrate(raw_vertex)
    assert arr_vertex == pytest.approx(89.568, abs=1e-3)
    assert peak == pytest.approx(88.75416264983, abs=1e-9)  # 6.75523**2 / (4 * 0.03771) - 213.77257
    assert calibrate(raw_vertex - 0.1) < peak and calibrate(raw_vertex + 0.1) < peak
    # increasing below the vertex, decreasing above: the published outputs were inverted on the lower branch
    raws = np.linspace(-3, raw_vertex, 50)
    assert np.all(np.diff(calibrate(raws)) > 0)
