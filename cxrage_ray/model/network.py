"""The CXR-Age network (seed spec §2.1) and its age calibration (§1, §8).

In:  a 237-key state dict (see `cxrage_ray.model.checkpoint.load_state_dict`) and image batches.
Out: raw standardised outputs y (N, 1), and `calibrate(y)` -> CXR-Age in years (float64).

The module tree reproduces fastai 1.0.61's `cnn_learner(resnet34)` *after* run_model.py's head surgery,
index for index, so the published checkpoint loads with `strict=True` and no key renaming.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from cxrage_ray.errors import WeightsError

# De-standardisation of the network output (spec §8): training targets were z-scored ages.
AGE_SD = 8.03342449139388
AGE_MEAN = 63.8723890235948
# Quadratic recalibration from run_model.py; increasing below its vertex at arr = 89.568 years.
CALIB_A = 6.75523
CALIB_B = 0.03771
CALIB_C = 213.77257


class AdaptiveConcatPool2d(nn.Module):
    """fastai's concat pool: (N, C, H, W) -> (N, 2C, 1, 1), MAX-pooled channels first, then AVG."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(1)
        self.ap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class Flatten(nn.Module):
    """fastai's Flatten: (N, ...) -> (N, prod(...))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten, not fastai's view: identical values, and it also accepts channels_last inputs
        return torch.flatten(x, 1)


class BasicBlock(nn.Module):
    """torchvision's ResNet `BasicBlock`: two 3x3 convs plus the input, through a strided 1x1 conv + BN
    (`downsample`) where the shape changes. (N, inplanes, H, W) -> (N, planes, H / stride, W / stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, device: torch.device | str | None = None) -> None:
        super().__init__()
        # built before the convs, as torchvision's _make_layer does: the same order of draws from the RNG
        downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False, device=device),
                                    nn.BatchNorm2d(planes, device=device))
                      if stride != 1 or inplanes != planes else None)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False, device=device)
        self.bn1 = nn.BatchNorm2d(planes, device=device)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False, device=device)
        self.bn2 = nn.BatchNorm2d(planes, device=device)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


#: ResNet-34's stages: (channels, blocks, stride of the first block).
RESNET34_LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def _body(device: torch.device | str | None = None) -> nn.Sequential:
    """ResNet-34 without avgpool/fc (fastai `create_body`, cut=-2): conv1 bn1 relu maxpool layer1..4.

    The same modules, names, initialisation and order of random draws as `torchvision.models.resnet34()`
    (`tests/model/test_network.py` checks it value for value), written here because importing torchvision costs every
    process that builds the model ~1 s on a small CPU (issue 15), for these thirty lines.
    """
    stem = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False, device=device), nn.BatchNorm2d(64, device=device),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    layers, inplanes = [], 64
    for planes, blocks, stride in RESNET34_LAYERS:
        layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, device),
                                    *(BasicBlock(planes, planes, device=device) for _ in range(blocks - 1))))
        inplanes = planes
    nn.Linear(512, 1000, device=device)  # torchvision's fc, cut off: built all the same for its draws from the RNG
    body = nn.Sequential(*stem, *layers)
    if torch.device(device or "cpu").type == "meta":
        return body  # no values to set; and the init functions on meta tensors import torch._dynamo (~1.4 s)
    for module in body.modules():  # torchvision's ResNet init
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    return body


def _head(device: torch.device | str | None = None) -> nn.Sequential:
    """The head after run_model.py's surgery: indices 0-3 from fastai's head, 4-11 appended."""
    return nn.Sequential(
        AdaptiveConcatPool2d(),  # 0
        Flatten(),  # 1
        nn.BatchNorm1d(1024, device=device),  # 2
        nn.Dropout(0.25),  # 3
        nn.Linear(1024, 512, device=device),  # 4
        nn.ReLU(inplace=True),  # 5
        nn.BatchNorm1d(512, device=device),  # 6
        nn.Dropout(0.5),  # 7
        nn.Linear(512, 16, device=device),  # 8
        nn.ReLU(inplace=True),  # 9
        nn.BatchNorm1d(16, device=device),  # 10
        nn.Linear(16, 1, device=device),  # 11
    )


class CXRAgeNet(nn.Sequential):
    """CXR-Age: a ResNet-34 body and a regression head that estimate age from a chest radiograph.

    Raghu VK, Weiss J, Hoffmann U, Aerts HJWL, Lu MT. "Deep Learning to Estimate Biological Age From
    Chest Radiographs." JACC: Cardiovascular Imaging 2021;14(11):2226-2236. doi:10.1016/j.jcmg.2021.01.008.
    Upstream code and weights: https://github.com/vineet1992/CXR-Age (``PLCO_Fine_Tuned_120419.pth``).

    Input:
        float32 tensor (N, 3, 224, 224): an 8-bit RGB picture (the seed chain's PNG; grey replicated to
        3 channels) scaled to [0, 1] as linear values (no gamma change), resized/cropped by the fastai
        transform, then normalised with the ImageNet statistics mean (0.485, 0.456, 0.406) and
        std (0.229, 0.224, 0.225). See ``cxrage_ray.preprocess.fastai``.

    Output:
        float32 tensor (N, 1): the *raw standardised* age y (unitless z-score). Years come from
        ``calibrate(y)``: arr = y * AGE_SD + AGE_MEAN, then CXR-Age = 6.75523 arr - 0.03771 arr^2 - 213.77257.

    The module indices match fastai 1.0.61 (``0`` = body children conv1, bn1, relu, maxpool, layer1..4;
    ``1`` = head: concat pool, flatten, BN1d(1024), dropout, Linear(1024,512), ReLU, BN1d(512), dropout,
    Linear(512,16), ReLU, BN1d(16), Linear(16,1)), so ``state_dict()`` has the checkpoint's 237 keys.

    Example:
        >>> from cxrage_ray.model.checkpoint import load_state_dict
        >>> model = build_model(load_state_dict("PLCO_Fine_Tuned_120419.pth"))
        >>> with torch.no_grad():
        ...     raw = model(images)               # images: (N, 3, 224, 224) normalised as above
        >>> ages = calibrate(raw[:, 0].numpy())   # years, float64
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(_body(device), _head(device))


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    net = CXRAgeNet(device="meta")  # no allocation, no init cost
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def expected_shapes() -> OrderedDict[str, tuple[int, ...]]:
    """Every state_dict key of CXRAgeNet with its shape, in saved order (spec Appendix A)."""
    return OrderedDict(_expected_shapes())


def check_state_dict(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise `WeightsError` naming the differing keys/shapes unless `state_dict` is a CXR-Age one.

    Args:
        state_dict: key -> tensor mapping to check.
        source: what to call it in the message (e.g. the file path).
    """
    expected = expected_shapes()
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{source} is not a state dict (found {type(state_dict).__name__})")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in state_dict if k in expected and not isinstance(state_dict[k], torch.Tensor)]
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state_dict and k not in not_tensors and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong or not_tensors):
        return

    def _few(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_few(unexpected)}")
    if not_tensors:
        parts.append(f"not tensors: {_few(not_tensors)}")
    if wrong:
        parts.append(f"wrong shapes: {_few(wrong)}")
    raise WeightsError(
        f"{source} is not a CXR-Age checkpoint (ResNet-34 + CXR-Age head, 237 keys): " + "; ".join(parts)
        + ". Use the published PLCO_Fine_Tuned_120419.pth or a checkpoint converted from it."
    )


def build_model(state_dict: dict[str, torch.Tensor]) -> CXRAgeNet:
    """A CXRAgeNet on CPU holding `state_dict` (strict load), in eval mode.

    Raises:
        WeightsError: the state dict's keys or shapes are not CXR-Age's.
    """
    check_state_dict(state_dict)
    # Built on the meta device, then given copies of the checkpoint's tensors (in the model's own dtypes): every
    # value comes from the strict load, so the kaiming init (about a second on a small CPU) would be wasted. No
    # init on meta tensors and no `to_empty`: those go through torch's Python reference ops, whose first use
    # imports torch._dynamo (~1.4 s) and torch's symbolic shapes (~0.45 s), in every process that builds the model.
    model = CXRAgeNet(device="meta")
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    owned = {key: value.to(dtype=dtypes[key], device="cpu", copy=True) for key, value in state_dict.items()}
    model.load_state_dict(owned, strict=True, assign=True)
    return model.eval()


def calibrate(raw: np.ndarray | float) -> np.ndarray:
    """Raw standardised output(s) -> CXR-Age in years, in float64 exactly as run_model.py computes it.

    A scalar input gives a numpy float64 scalar; an array gives a float64 array of the same shape.
    """
    arr = np.asarray(raw, dtype=np.float64) * AGE_SD + AGE_MEAN
    return CALIB_A * arr - CALIB_B * arr**2 - CALIB_C
