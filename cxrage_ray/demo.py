"""Seeded random CXR-Age weights in the published checkpoint format — NOT a trained model.

In:  a seed. Out: a 237-key state dict whose outputs land in a realistic raw range, or a `.pth` file.

For running the whole product where the published weights cannot be downloaded (a demo, CI, speed
benchmarks, sensitivity figures). Its ages carry no meaning, and it is used only when asked for by name
(`--weights demo`); the tool never falls back to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def demo_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Default-initialised network whose BatchNorm running statistics match its own activations.

    Random init alone leaves BN running stats at (0, 1), so activations explode through 36 conv layers;
    a few train-mode passes over smooth random images set the statistics so the raw output is O(1).
    """
    from cxrage_ray.model import CXRAgeNet

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = CXRAgeNet()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration passes
    net.train()
    with torch.no_grad():
        for _ in range(3):
            noise = torch.rand(8, 1, 28, 28, generator=generator)
            images = nn.functional.interpolate(noise, size=224, mode="bilinear", align_corners=False)
            net((images.expand(-1, 3, -1, -1) - 0.45) / 0.226)
    net.eval()
    return {k: v.clone() for k, v in net.state_dict().items()}


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write `demo_state_dict(seed)` as a bare state dict (zip container) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(demo_state_dict(seed), tmp)
    tmp.replace(path)
    return path
