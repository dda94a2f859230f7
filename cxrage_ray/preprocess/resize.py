"""`-resize` on the CPU, bit-exactly as ImageMagick 6.9.11 Q16 resizes (resize.c), numpy.

In:  (H, W, C) Q16 values — or 8-bit levels k standing for Q16 257 k — an output size, an optional Q16 alpha.
Out: uint16 (out_h, out_w, C) Q16 values, and the alpha resized as IM resizes opacity.

Separable passes with IM's default filter (Lanczos-3 when shrinking, Mitchell when enlarging or with alpha) and
its Q16 rounding between them; the plan and weights come from `cxrage_ray.preprocess.resize_weights`, shared
with the torch passes. Without alpha a pass runs as banded BLAS products; the few outputs that land within
`TIE_TOLERANCE` of a rounding tie are recomputed in IM's exact summation order, so the result does not depend on
how BLAS orders its sums. With alpha IM's alpha-weighted sums run tap by tap in its order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cxrage_ray.preprocess.quantum import MAGICK_EPSILON, QUANTUM, clamp_round
from cxrage_ray.preprocess.resize_weights import (
    AxisWeights,
    FilterName,
    ResizePlan,
    axis_weights,
    fill_plan,
    resize_plan,
)

#: Outputs of a BLAS-ordered sum this close to x.5 are redone in IM's summation order. BLAS and IM's
#: sequential sums differ by < 1e-9 here (<= ~60 terms of magnitude <= 65535 * 1.3, double precision).
TIE_TOLERANCE = 1.0e-7
#: Output rows per dense block of the banded resize: small enough that the dense block wastes little
#: work outside the band, large enough for BLAS to run at speed.
BLOCK = 8
#: Input lines (columns of the pass) converted to float64 at a time by the alpha-weighted first pass: the whole
#: frame's colour and opacity as float64 were 32 B a pixel for RGBA (8.6 GB at the pixel limit).
ALPHA_CHUNK = 512


def _pass_exact(x2d: np.ndarray, aw: AxisWeights, rows: np.ndarray, cols: np.ndarray, value_scale: float = 1.0
                ) -> np.ndarray:
    """IM's sequential sum for the selected (output row, column) pairs of one pass along axis 0.

    Only the taps read are converted to float64 (times `value_scale`): the same numbers as converting the whole
    input first, without a full-frame float64 copy.
    """
    acc = np.zeros(rows.size)
    for k in range(aw.weights.shape[1]):
        idx = aw.index[rows, k]  # padded taps have weight 0
        acc = acc + aw.weights[rows, k] * (x2d[idx, cols].astype(np.float64) * value_scale)
    return acc


@lru_cache(maxsize=64)
def _dense_blocks(n_in: int, n_out: int, name: FilterName) -> tuple[tuple[int, int, int, np.ndarray], ...]:
    """The axis contributions cut into dense (BLOCK x span) matrices: (first output, lo, hi, matrix)."""
    aw = axis_weights(n_in, n_out, name)
    blocks = []
    for b0 in range(0, n_out, BLOCK):
        b1 = min(b0 + BLOCK, n_out)
        lo = int(aw.starts[b0])
        hi = int((aw.starts[b0:b1] + aw.counts[b0:b1]).max())
        dense = np.zeros((b1 - b0, hi - lo))
        for i in range(b0, b1):
            s, c = int(aw.starts[i]) - lo, int(aw.counts[i])
            dense[i - b0, s:s + c] = aw.weights[i, :c]
        dense.flags.writeable = False
        blocks.append((b0, lo, hi, dense))
    return tuple(blocks)


def _pass_rows(x2d: np.ndarray, n_out: int, name: FilterName, value_scale: float = 1.0) -> np.ndarray:
    """One resize pass along axis 0 of a 2-D array -> uint16 (n_out, columns), IM-exact.

    Args:
        x2d: (n_in, m) input; the Q16 value of an entry is `value_scale * x2d[...]`.
        n_out, name: the output lines and the filter.
        value_scale: 257.0 when x2d holds 8-bit levels k standing for 257 k.
    """
    aw, blocks = axis_weights(x2d.shape[0], n_out, name), _dense_blocks(x2d.shape[0], n_out, name)
    out = np.empty((n_out, x2d.shape[1]), dtype=np.float64)
    for b0, lo, hi, dense in blocks:
        weights = dense * value_scale if value_scale != 1.0 else dense
        np.matmul(weights, x2d[lo:hi].astype(np.float64, copy=False), out=out[b0:b0 + dense.shape[0]])
    out += 0.5
    # IM rounds with (Quantum)(v + 0.5); find sums whose v + 0.5 sits within TIE_TOLERANCE of an integer
    tie = np.abs(out - np.rint(out)) < TIE_TOLERANCE
    rows, cols = np.nonzero(tie)
    if rows.size:
        out[rows, cols] = _pass_exact(x2d, aw, rows, cols, value_scale) + 0.5
    np.floor(out, out=out)
    np.clip(out, 0.0, QUANTUM, out=out)
    return out.astype(np.uint16)


def _pass_rows_alpha(
    color: np.ndarray, opacity: np.ndarray, aw: AxisWeights
) -> tuple[np.ndarray, np.ndarray]:
    """One pass along axis 0 with IM's alpha weighting, in IM's exact order (images with a matte).

    Args:
        color: (n_in, m, C) Q16 colour values as float64.
        opacity: (n_in, m) IM opacity (65535 - alpha) as float64.
    """
    n_out = aw.starts.size
    qscale = 1.0 / QUANTUM
    num = np.zeros((n_out,) + color.shape[1:])
    gamma = np.zeros((n_out, color.shape[1]))
    opac = np.zeros((n_out, color.shape[1]))
    for k in range(aw.weights.shape[1]):
        idx = aw.index[:, k]
        w = aw.weights[:, k][:, None]
        a = w * qscale * (QUANTUM - opacity[idx])
        num = num + a[:, :, None] * color[idx]
        opac = opac + w * opacity[idx]
        gamma = gamma + a
    recip = np.where(np.abs(gamma) >= MAGICK_EPSILON, 1.0 / np.where(gamma == 0, 1.0, gamma),
                     np.where(gamma < 0, -1.0, 1.0) / MAGICK_EPSILON)
    return clamp_round(recip[:, :, None] * num), clamp_round(opac)


def _first_pass_alpha(q16: np.ndarray, alpha: np.ndarray, aw: AxisWeights, value_scale: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """`_pass_rows_alpha` along axis 0 of (n_in, m, C) values and (n_in, m) Q16 alpha, `ALPHA_CHUNK` columns at a
    time: every output column depends on its own input column only, so the result is the same numbers."""
    colors, opacities = [], []
    for c0 in range(0, q16.shape[1], ALPHA_CHUNK):
        color = q16[:, c0:c0 + ALPHA_CHUNK].astype(np.float64) * value_scale
        opacity = QUANTUM - alpha[:, c0:c0 + ALPHA_CHUNK].astype(np.float64)
        color, opacity = _pass_rows_alpha(color, opacity, aw)
        colors.append(color)
        opacities.append(opacity)
    return np.concatenate(colors, axis=1), np.concatenate(opacities, axis=1)


def im_resize(
    q16: np.ndarray,
    out_w: int,
    out_h: int,
    alpha: np.ndarray | None = None,
    levels: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """IM 6.9.11 `ResizeImage` with its default filter: (H, W, C) -> uint16 (out_h, out_w, C).

    Args:
        q16: (H, W, C) Q16 values, or 8-bit levels k standing for 257 k when `levels` is True.
        out_w, out_h: the output size.
        alpha: optional (H, W) Q16 alpha; selects Mitchell and IM's alpha-weighted sums.
        levels: see `q16`.

    Returns:
        (pixels, alpha) — alpha resized as IM resizes opacity, or None.
    """
    h, w, _ = q16.shape
    return _resize(q16, resize_plan(w, h, out_w, out_h, alpha is not None), alpha, levels)


def resize_fill_512(q16: np.ndarray, alpha: np.ndarray | None = None, levels: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """`-resize 512x512^` on (H, W, C) values (see `im_resize`)."""
    h, w = q16.shape[:2]
    return _resize(q16, fill_plan(w, h, alpha is not None), alpha, levels)


def _resize(q16: np.ndarray, plan: ResizePlan, alpha: np.ndarray | None, levels: bool
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """`im_resize` following a `ResizePlan`."""
    scale = 257.0 if levels else 1.0
    if plan.identity:
        out = q16.astype(np.uint16) * (257 if levels else 1)
        return out.astype(np.uint16), alpha
    if alpha is not None:
        return _resize_alpha(q16, alpha, plan, scale)
    planes = [_resize_plane(q16[:, :, ch], plan, scale) for ch in range(q16.shape[2])]
    return np.stack(planes, axis=2), None


def _resize_plane(plane: np.ndarray, plan: ResizePlan, scale: float) -> np.ndarray:
    """One channel (H, W) -> uint16 (out_h, out_w): two passes, the plan's first axis first."""
    if plan.horizontal_first:
        mid = _pass_rows(plane.T, plan.out_w, plan.filter, scale)  # (out_w, h)
        return _pass_rows(np.ascontiguousarray(mid.T), plan.out_h, plan.filter)  # (out_h, out_w)
    mid = _pass_rows(plane, plan.out_h, plan.filter, scale)  # (out_h, w)
    return _pass_rows(np.ascontiguousarray(mid.T), plan.out_w, plan.filter).T  # (out_h, out_w)


def _resize_alpha(q16: np.ndarray, alpha: np.ndarray, plan: ResizePlan, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """All channels with IM's alpha-weighted sums -> uint16 (out_h, out_w, C) and the resized Q16 alpha."""
    aw_x = axis_weights(plan.width, plan.out_w, plan.filter)
    aw_y = axis_weights(plan.height, plan.out_h, plan.filter)
    if plan.horizontal_first:
        color, opacity = _first_pass_alpha(q16.transpose(1, 0, 2), alpha.T, aw_x, scale)
        color, opacity = _pass_rows_alpha(color.transpose(1, 0, 2), opacity.T, aw_y)
    else:
        color, opacity = _first_pass_alpha(q16, alpha, aw_y, scale)
        color, opacity = _pass_rows_alpha(color.transpose(1, 0, 2), opacity.T, aw_x)
        color, opacity = color.transpose(1, 0, 2), opacity.T
    return color.astype(np.uint16), (QUANTUM - opacity).astype(np.uint16)
