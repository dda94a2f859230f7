"""`-resize`'s plan and contribution weights, as ImageMagick 6.9.11 computes them (resize.c).

In:  the input and output sizes of a resize (and whether the picture has alpha).
Out: `ResizePlan` (output size, IM's default filter, which axis goes first) and, per axis, `AxisWeights`: the
     input taps and float64 weights of every output line, normalised as IM normalises them.

Plain numpy, computed once per size (cached): the numpy passes (`cxrage_ray.preprocess.resize`) and the torch
passes (`cxrage_ray.preprocess.tensor`) apply the very same weights in IM's summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from cxrage_ray.decode.geometry import fill_size
from cxrage_ray.preprocess.quantum import MAGICK_EPSILON

FilterName = Literal["lanczos", "mitchell"]

#: SincFast for Q16 (resize.c, "Max. abs. rel. error 2.2e-8 < 1/2^25"): IM's Lanczos uses this polynomial,
#: not sin(pi x)/(pi x).
_SINC_FAST_C = (
    0.173611107357320220183368594093166520811e-2,
    -0.384240921114946632192116762889211361285e-3,
    0.394201182359318128221229891724947048771e-4,
    -0.250963301609117217660068889165550534856e-5,
    0.111902032818095784414237782071368805120e-6,
    -0.372895101408779549368465614321137048875e-8,
    0.957694196677572570319816780188718518330e-10,
    -0.187208577776590710853865174371617338991e-11,
    0.253524321426864752676094495396308636823e-13,
    -0.177084805010701112639035485248501049364e-15,
)
FILTER_SUPPORT = {"lanczos": 3.0, "mitchell": 2.0}


def sinc_fast(x: np.ndarray) -> np.ndarray:
    """IM's `SincFast` (Q16 build) for 0 <= x <= 4, in IM's evaluation order."""
    xx = x * x
    p = np.full_like(xx, _SINC_FAST_C[-1])
    for c in _SINC_FAST_C[-2::-1]:
        p = c + xx * p
    return (xx - 1.0) * (xx - 4.0) * (xx - 9.0) * (xx - 16.0) * p


def _mitchell(x: np.ndarray) -> np.ndarray:
    b = c = 1.0 / 3.0
    two_b = b + b
    k = (1.0 - (1.0 / 3.0) * b, -3.0 + two_b + c, 2.0 - 1.5 * b - c,
         (4.0 / 3.0) * b + 4.0 * c, -8.0 * c - two_b, b + 5.0 * c, (-1.0 / 6.0) * b - c)
    near = k[0] + x * (x * (k[1] + x * k[2]))
    far = k[3] + x * (k[4] + x * (k[5] + x * k[6]))
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def filter_weight(x: np.ndarray, name: FilterName) -> np.ndarray:
    """IM's `GetResizeFilterWeight` for the two filters the chain uses (blur 1)."""
    x = np.abs(x)
    if name == "lanczos":
        # window SincFast scaled by 1/window_support, times the SincFast filter
        return sinc_fast(x * (1.0 / 3.0)) * sinc_fast(x)
    return _mitchell(x)


@dataclass(frozen=True)
class AxisWeights:
    """Contributions of one resize axis: output i = sum_t weights[i, t] * input[index[i, t]].

    `weights` is zero-padded to the longest row; `counts[i]` is the real number of taps; `index[i, t]` is
    `starts[i] + t`, clipped to the last input line for the padded taps (whose weight is 0).
    """

    starts: np.ndarray
    counts: np.ndarray
    weights: np.ndarray
    index: np.ndarray


@lru_cache(maxsize=64)
def axis_weights(n_in: int, n_out: int, name: FilterName) -> AxisWeights:
    """IM's `HorizontalFilter`/`VerticalFilter` contribution rows for n_in -> n_out (cached, read-only)."""
    factor = n_out / n_in
    scale = max(1.0 / factor + MAGICK_EPSILON, 1.0)
    support = scale * FILTER_SUPPORT[name]
    scale = 1.0 / scale
    x = np.arange(n_out, dtype=np.float64)
    bisect = (x + 0.5) / factor + MAGICK_EPSILON
    starts = np.maximum(bisect - support + 0.5, 0.0).astype(np.int64)
    stops = np.minimum(bisect + support + 0.5, float(n_in)).astype(np.int64)
    counts = stops - starts
    taps = int(counts.max())
    t = np.arange(taps, dtype=np.float64)
    valid = t[None, :] < counts[:, None]
    w = filter_weight(scale * ((starts[:, None] + t[None, :]) - bisect[:, None] + 0.5), name)
    w = np.where(valid, w, 0.0)
    density = np.zeros(n_out)
    for k in range(taps):  # IM's left-to-right sum, not numpy's pairwise one
        density = density + w[:, k]
    normalise = (density != 0.0) & (density != 1.0)
    recip = np.where(normalise, 1.0 / np.where(normalise, density, 1.0), 1.0)
    w = np.where(normalise[:, None], w * recip[:, None], w)
    index = np.minimum(starts[:, None] + np.arange(taps)[None, :], n_in - 1)
    for arr in (starts, counts, w, index):
        arr.flags.writeable = False
    return AxisWeights(starts=starts, counts=counts, weights=w, index=index)


def resize_filter(width: int, height: int, out_w: int, out_h: int, has_alpha: bool) -> FilterName:
    """IM's default filter: Mitchell when enlarging (x_factor * y_factor > 1) or with alpha, else Lanczos."""
    if has_alpha or (out_w / width) * (out_h / height) > 1.0:
        return "mitchell"
    return "lanczos"


@dataclass(frozen=True, slots=True)
class ResizePlan:
    """How IM resizes (width, height) to (out_w, out_h): its default filter, and whether the horizontal pass
    runs first (IM resizes the axis with the larger factor first)."""

    width: int
    height: int
    out_w: int
    out_h: int
    filter: FilterName
    horizontal_first: bool

    @property
    def identity(self) -> bool:
        """The output size is the input size: IM copies the pixels."""
        return (self.out_w, self.out_h) == (self.width, self.height)


def resize_plan(width: int, height: int, out_w: int, out_h: int, has_alpha: bool) -> ResizePlan:
    """The plan of `-resize {out_w}x{out_h}!` on a (width, height) picture."""
    name = resize_filter(width, height, out_w, out_h, has_alpha)
    return ResizePlan(width, height, out_w, out_h, name, out_w / width > out_h / height)


def fill_plan(width: int, height: int, has_alpha: bool) -> ResizePlan:
    """The plan of the seed chain's `-resize 512x512^` (`cxrage_ray.decode.geometry.fill_size`)."""
    out_w, out_h = fill_size(width, height)
    return resize_plan(width, height, out_w, out_h, has_alpha)
