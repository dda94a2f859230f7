"""Seeded random CXR-Age weights in the published checkpoint format — NOT a trained model.

In:  a seed. Out: a 237-key state dict whose outputs land in a realistic raw range, or a `.pth` file.

For running the whole product where the published weights cannot be downloaded (a demo, CI, speed
benchmarks, sensitivity figures). Its ages carry no meaning, and it is used only when asked for by name
(`--weights demo`); the tool never falls back to it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


def demo_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Default-initialised network whose BatchNorm running statistics match its own activations.

    Random init alone leaves BN running stats at (0, 1), so activations explode through 36 conv layers;
    train-mode passes over smooth random images set every BN's statistics to its own activations', so
    the eval-mode network is normalised layer by layer and the raw output is O(1). Deterministic per seed
    and independent of the caller's global RNG state.
    """
    from cxrage_ray.model.network import CXRAgeNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CXRAgeNet()  # torchvision's ResNet init (kaiming-normal convs); default Linear init in the head
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # non-trivial affine parameters so that round-trip tests compare real values
                    module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                    module.reset_running_stats()
                    module.momentum = None  # cumulative average over the passes below
            net.train()
            for _ in range(2):
                noise = torch.rand(6, 3, 14, 14, generator=generator)
                images = nn.functional.interpolate(noise, size=224, mode="bicubic", align_corners=False)
                net((images - 0.45) / 0.226)
        net.eval()
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
    state_dict = net.state_dict()
    for key, value in state_dict.items():
        state_dict[key] = value.detach().clone()
    return state_dict


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write `demo_state_dict(seed)` as a bare state dict (zip container) to `path`."""
    from cxrage_ray.storage.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(demo_state_dict(seed), tmp)
    return path
