"""The seed chain's fill geometry, which the decoders need before the seed chain runs.

In:  image sizes (and, for `crop_to_fill_grid`, a reduced-resolution image and its full size).
Out: the `-resize 512x512^` output size (`fill_size`), the smallest short side a fast decode may reduce to
     (`FAST_DECODE_MIN_SIDE`), and a reduced image cropped so its fill size is the full image's.

A leaf: the decoders (reduced JPEG / JPEG 2000 decodes), the decode limits and the seed chain all import it, and
it imports none of them.
"""

from __future__ import annotations

import math

import numpy as np

#: The seed chain's `-resize 512x512^`: the short side becomes this.
FILL_TARGET = 512
#: `--decode fast` never reduces the short side below this: twice the 512 px the seed chain resizes to,
#: so the final Lanczos downscale still has real detail to average.
FAST_DECODE_MIN_SIDE = 2 * FILL_TARGET


def fill_size(width: int, height: int, target: int = FILL_TARGET) -> tuple[int, int]:
    """`-resize {target}x{target}^` geometry: short side -> target, aspect kept, upscaling allowed."""
    s = max(target / width, target / height)
    return int(math.floor(width * s + 0.5)), int(math.floor(height * s + 0.5))


def crop_to_fill_grid(image: np.ndarray, full_rows: int, full_cols: int) -> np.ndarray:
    """Drop the last row/column of a reduced image when that makes the seed chain's 512 px
    `-resize ^` geometry equal the full-resolution image's.

    Reduced decoders round odd sizes up (ceil(n / 2^r)), which can make the fill size differ by one
    output pixel from the exact path (e.g. 2517 px -> 629 exact, 1259 -> 630 fast); a one-pixel
    different picture shifts every fastai view. Untrimmed films are the common case, so the full
    image's geometry is the target.

    Args:
        image: (h, w[, c]) reduced image.
        full_rows, full_cols: the full-resolution size.
    """
    h, w = image.shape[:2]
    want = fill_size(full_cols, full_rows)
    for dh, dw in ((0, 0), (0, 1), (1, 0), (1, 1)):
        if h - dh > 0 and w - dw > 0 and fill_size(w - dw, h - dh) == want:
            return image[: h - dh, : w - dw]
    return image
