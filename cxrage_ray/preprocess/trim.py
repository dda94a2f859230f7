"""`-trim +repage`: the bounding box ImageMagick trims a picture to (spec §9).

In:  pixels (H, W, C) — Q16 values or 8-bit samples, equality is the same either way — and an optional (H, W)
     alpha plane.
Out: the inclusive box (top, bottom, left, right) of IM's `GetImageBoundingBox` with fuzz 0.

The torch version for the GPU path is `cxrage_ray.preprocess.tensor.trim_box_tensor`.
"""

from __future__ import annotations

import numpy as np


def _differs(pixels: np.ndarray, alpha: np.ndarray | None, ref: tuple, lines: slice, axis: int) -> np.ndarray:
    """For each line (row if axis 0, column if 1) in `lines`: whether it holds a pixel != ref (colour, alpha)."""
    part = pixels[lines] if axis == 0 else pixels[:, lines]
    differs = (part != ref[0]).any(axis=2)
    if alpha is not None:
        differs |= (alpha[lines] if axis == 0 else alpha[:, lines]) != ref[1]
    return differs.any(axis=1 - axis)


def _first_differing(pixels: np.ndarray, alpha: np.ndarray | None, ref: tuple, axis: int, reverse: bool
                     ) -> int | None:
    """Index along `axis` (0 rows, 1 columns) of the first/last line holding a pixel != ref.

    Scans in growing chunks from the edge, so a thin border costs a thin read, not the whole image.
    """
    n = pixels.shape[axis]
    chunk, done = 8, 0
    while done < n:
        size = min(chunk, n - done)
        lo, hi = (n - done - size, n - done) if reverse else (done, done + size)
        hits = np.flatnonzero(_differs(pixels, alpha, ref, slice(lo, hi), axis))
        if hits.size:
            return int(lo + (hits[-1] if reverse else hits[0]))
        done += size
        chunk *= 4
    return None


def trim_box(pixels: np.ndarray, alpha: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """IM's `GetImageBoundingBox` with fuzz 0: (top, bottom, left, right), inclusive bounds.

    Args:
        pixels: (H, W, C) Q16 values or 8-bit samples (equality is the same either way).
        alpha: optional (H, W) alpha; when present it takes part in the equality test (IM compares
            opacity for images with a matte channel).

    left/top: first column/row holding a pixel != the top-left colour; right: last column holding a
    pixel != the top-right colour; bottom: last row holding a pixel != the bottom-left colour. The
    bottom-right pixel is never a reference. Returns the whole image when nothing differs (IM warns
    and its result is not modelled; keeping the image is the harmless choice).
    """
    h, w = pixels.shape[:2]

    def corner(y: int, x: int) -> tuple:
        return pixels[y, x].copy(), None if alpha is None else alpha[y, x]

    tl, tr, bl = corner(0, 0), corner(0, w - 1), corner(h - 1, 0)
    left = _first_differing(pixels, alpha, tl, axis=1, reverse=False)
    if left is None:
        return 0, h - 1, 0, w - 1
    top = _first_differing(pixels, alpha, tl, axis=0, reverse=False)
    right = _first_differing(pixels, alpha, tr, axis=1, reverse=True)
    bottom = _first_differing(pixels, alpha, bl, axis=0, reverse=True)
    # IM starts right/bottom at 0 and only raises them, so "nothing differs from TR" means 0
    right = 0 if right is None else right
    bottom = 0 if bottom is None else bottom
    if right < left or bottom < top:
        return 0, h - 1, 0, w - 1
    return top, bottom, left, right
