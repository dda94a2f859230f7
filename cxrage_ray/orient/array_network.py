"""The orientation network for inference in numpy: the trained weights -> logits, without torch.

In:  the weights file's tensors as numpy arrays (the state dict of `cxrage_ray.orient.network.build_network`'s
     module) and its architecture numbers; then float32 (N, 1, size, size) standardised thumbnails.
Out: (N, 6) float32 logits, as the torch module gives them in eval mode (to float32 rounding, ~1e-6): [:, :4]
     rotation classes, [:, 4:] view (frontal, lateral).

Why numpy: the CPU prepare tasks run the classifier on every film, and importing torch for a network of ~90k
weights cost each prepare worker ~2.5 s of a core and ~300 MB before its first film (issue 22: the first prepared
block of a job came ~2.5 s later, on 2 cores). Training keeps the torch module (`build_network`); the test
`tests/orient/test_array_network.py` holds the two to the same logits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cxrage_ray.orient.network import check_downsample, feature_side

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which the trained network used


@dataclass(frozen=True)
class ConvLayer:
    """conv (bias-free) + eval-mode batch norm, folded into one affine conv, then ReLU; `pool`: a 2x2 max-pool
    after it. `weight`: (out, in * k * k) in the (in, ky, kx) order of `_patches`."""

    weight: np.ndarray
    bias: np.ndarray
    kernel: int
    stride: int
    pool: bool

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, C) -> (N, H', W', out), channels last throughout (one matrix product per layer)."""
        patches = _patches(x, self.kernel, self.stride)
        n, h, w = patches.shape[:3]
        y = patches.reshape(n * h * w, -1) @ self.weight.T + self.bias
        y = np.maximum(y, 0.0, out=y).reshape(n, h, w, -1)
        if self.pool:
            y = y.reshape(n, h // 2, 2, w // 2, 2, -1).max(axis=(2, 4))
        return y


def _patches(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """(N, H, W, C) -> (N, H', W', C, k, k) zero-padded `kernel` windows every `stride` pixels (torch's
    `padding=kernel // 2`)."""
    pad = kernel // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(1, 2))
    return windows[:, ::stride, ::stride]


@dataclass(frozen=True)
class ArrayNetwork:
    """`build_network`'s module in eval mode as numpy arrays (see the module docstring); callable like it."""

    convs: tuple[ConvLayer, ...]
    dense: tuple[np.ndarray, np.ndarray]
    heads: tuple[np.ndarray, np.ndarray]  # the rotation and view heads stacked: (6, hidden), (6,)

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], downsample: str = "pool") -> ArrayNetwork:
        """From the torch module's state dict (numpy arrays; `num_batches_tracked` ignored)."""
        check_downsample(downsample)
        indices = sorted(int(m.group(1)) for key in state
                         if (m := re.fullmatch(r"features\.(\d+)\.weight", key)) and state[key].ndim == 4)
        convs = []
        for position, i in enumerate(indices):
            weight = np.asarray(state[f"features.{i}.weight"], dtype=np.float64)
            gamma, beta, mean, var = (np.asarray(state[f"features.{i + 1}.{name}"], dtype=np.float64)
                                      for name in ("weight", "bias", "running_mean", "running_var"))
            scale = gamma / np.sqrt(var + BN_EPS)
            stem = position == 0  # the 5x5 stride-2 stem; a stage is stride 2 or stride 1 + max-pool
            convs.append(ConvLayer(
                weight=(weight * scale[:, None, None, None]).reshape(len(weight), -1).astype(np.float32),
                bias=(beta - mean * scale).astype(np.float32),
                kernel=weight.shape[-1],
                stride=2 if stem or downsample == "stride" else 1,
                pool=not stem and downsample == "pool",
            ))
        dense = (np.asarray(state["dense.2.weight"], np.float32), np.asarray(state["dense.2.bias"], np.float32))
        heads = (np.concatenate([state["rotation.weight"], state["view.weight"]]).astype(np.float32),
                 np.concatenate([state["rotation.bias"], state["view.bias"]]).astype(np.float32))
        return cls(convs=tuple(convs), dense=dense, heads=heads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 1, S, S) -> (N, 6) logits."""
        h = np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1))
        for conv in self.convs:
            h = conv(h)
        flat = h.transpose(0, 3, 1, 2).reshape(len(h), -1)  # torch flattens (C, H, W)
        hidden = np.maximum(flat @ self.dense[0].T + self.dense[1], 0.0)
        return hidden @ self.heads[0].T + self.heads[1]


def check_shapes(network: ArrayNetwork, width: int, hidden: int, size: int, stages: int) -> None:
    """Raise ValueError unless `network`'s weights have the shapes `build_network(width, hidden, size, stages)`
    gives (what torch's strict `load_state_dict` checked)."""
    side = feature_side(size, stages)
    convs = [(width, 1 * 5 * 5)] + [(width * 2 ** (i + 1), width * 2**i * 3 * 3) for i in range(stages)]
    expected = {"convs": convs, "dense": [(hidden, width * 2**stages * side * side)], "heads": [(6, hidden)]}
    found = {"convs": [conv.weight.shape for conv in network.convs], "dense": [network.dense[0].shape],
             "heads": [network.heads[0].shape]}
    for part, want in expected.items():
        if [tuple(shape) for shape in found[part]] != want:
            raise ValueError(f"{part}: weights of shapes {found[part]}, the architecture needs {want}")
