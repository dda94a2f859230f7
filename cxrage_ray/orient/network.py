"""The orientation classifier's network (architecture only; `cxrage_ray.orient.classifier` loads its weights).

In:  the architecture numbers the weights file records (`width`, `hidden`, `size`, `stages`, `downsample`).
Out: a torch module mapping (N, 1, size, size) standardised thumbnails to (N, 6) logits: [:, :4] rotation
     classes (input rotated 0/90/180/270 clockwise), [:, 4:] view (frontal, lateral). torch is imported on call.
"""

from __future__ import annotations

from typing import Any


def feature_side(size: int, stages: int) -> int:
    """The side of the last stage's feature map for a `size` px input (the stem and each stage halve it); raises
    ValueError for a size the network cannot take. Shared with the numpy network (`cxrage_ray.orient.array_network`),
    so no torch here."""
    side = size // 2 // 2**stages
    if side < 1 or size % (2 ** (stages + 1)):
        raise ValueError(f"size {size} is not divisible by 2**{stages + 1}")
    return side


def check_downsample(downsample: str) -> None:
    """Raise ValueError unless `downsample` names a stage kind the network has ("pool" or "stride")."""
    if downsample not in ("pool", "stride"):
        raise ValueError(f"downsample must be 'pool' or 'stride', not {downsample!r}")


def build_network(
    width: int = 8, hidden: int = 64, size: int = 64, stages: int = 3, downsample: str = "pool"
) -> Any:
    """The classifier network on a `size` px grey thumbnail: a stride-2 5x5 stem, `stages` stages that double
    the channels (from `width`) and halve the side, a shared dense layer, two heads.

    A stage is conv-BN-ReLU + 2x2 max-pool (`downsample="pool"`) or a stride-2 conv-BN-ReLU (`"stride"`,
    a quarter of the multiply-adds, which is what lets a 96 px input stay as cheap as 64 px pooled).
    The defaults are the first release's network (64 px, pooled, ~90k parameters); the shipped weights record
    their own `width`/`hidden`/`size`/`stages`/`downsample` in the file's `architecture` metadata.

    Output: (N, 6) logits; [:, :4] rotation classes (input rotated 0/90/180/270 clockwise), [:, 4:] view
    (frontal, lateral). Flattening (not global pooling) keeps where things are, which is what orientation is.
    """
    import torch
    from torch import nn

    side = feature_side(size, stages)
    check_downsample(downsample)

    def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class OrientationNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers = conv(1, width, 5, 2)  # size -> size / 2
            channels = width
            for _ in range(stages):  # each stage doubles the channels and halves the side
                if downsample == "pool":
                    layers += [*conv(channels, 2 * channels), nn.MaxPool2d(2)]
                else:
                    layers += conv(channels, 2 * channels, 3, 2)
                channels *= 2
            self.features = nn.Sequential(*layers)
            self.dense = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(channels * side * side, hidden), nn.ReLU())
            self.rotation = nn.Linear(hidden, 4)
            self.view = nn.Linear(hidden, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.dense(self.features(x))
            return torch.cat([self.rotation(h), self.view(h)], dim=1)

    return OrientationNet()
