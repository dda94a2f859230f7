"""The original pipeline's ImageMagick step, bit-exactly (spec §9).

In:  a `DecodedImage` (pixels (H, W, C), C in {1, 3}: uint8 8-bit samples or uint16 Q16; optional Q16 alpha).
Out: uint8 (H', W', C') with short side 512 and C' = 1 when every pixel is grey, else 3 — the pixels of
     `mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^ -format png` as
     ImageMagick 6.9.11 Q16 (non-HDRI) writes them; `seed_chain_png` gives that PNG file itself.

The chain, with IM's own arithmetic (magick/attribute.c, colorspace.c, enhance.c, resize.c, png.c), one module a
step:
  `trim`        bounding box against the TL/TR/BL corner colours, exact equality on all channels + alpha
  `levels`      -colorspace RGB, -auto-level, -depth 8 as one 65536-entry lookup table built from the trimmed
                image's min and max
  `resize`      fill 512x512; Lanczos-3 (IM's polynomial SincFast) when shrinking, Mitchell when enlarging
                or when the image has an alpha channel; separable, Q16 rounding between the passes
                (plan and weights in `resize_weights`)
  `png`         v8 = floor(v/257); alpha8 = 255 - floor((65535 - alpha)/257), written only when some
                pixel is not opaque

Memory: nothing here makes a full-frame copy wider than the input, so a film at the pixel limit costs its
pixels plus one byte a pixel of levels: 8-bit films stay uint8 throughout (the lookup table is read at the
8-bit values' Q16 points), the trim compares colour and alpha without stacking them, the rare tie recount
converts only the taps it reads to float64 (it used to convert the whole frame: 2 GB at the limit), and the
alpha-weighted resize converts `ALPHA_CHUNK` columns at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.preprocess.levels import eight_bit_levels, to_depth8
from cxrage_ray.preprocess.png import encode_png
from cxrage_ray.preprocess.quantum import QUANTUM
from cxrage_ray.preprocess.resize import resize_fill_512
from cxrage_ray.preprocess.trim import trim_box


@dataclass(frozen=True)
class SeedPicture:
    """The chain's result as IM writes it: 8-bit pixels (H, W, C) with C in {1, 3}, and the 8-bit
    alpha plane when IM writes one (some pixel not opaque), else None."""

    pixels: np.ndarray
    alpha: np.ndarray | None


def _all_channels_equal(pixels: np.ndarray) -> bool:
    return pixels.shape[2] == 1 or bool(
        np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 1], pixels[:, :, 2]))


def seed_picture(image: DecodedImage) -> SeedPicture:
    """Run the whole chain on a decoded image (see the module docstring)."""
    pixels, alpha = image.pixels, image.alpha
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16 (H, W, 1|3) pixels, got {pixels.dtype} {pixels.shape}")
    top, bottom, left, right = trim_box(pixels, alpha)
    pixels = pixels[top:bottom + 1, left:right + 1]
    check_fill_aspect(pixels.shape[1], pixels.shape[0])  # a sliver left by the trim must not explode the resize
    if alpha is not None:
        alpha = alpha[top:bottom + 1, left:right + 1]
        # -depth 8 quantises opacity (65535 - alpha) as it does colour
        alpha = (QUANTUM - to_depth8(QUANTUM - alpha)).astype(np.uint16)
    if _all_channels_equal(pixels):
        # every step is per channel apart from the global min/max, which equal channels share
        pixels = pixels[:, :, :1]
    levels = eight_bit_levels(pixels)
    q16, alpha = resize_fill_512(levels, alpha=alpha, levels=True)
    out = (q16 // 257).astype(np.uint8)
    if out.shape[2] == 3 and _all_channels_equal(out):
        out = out[:, :, :1]
    alpha8 = None
    if alpha is not None:
        # the PNG writer truncates IM's opacity (65535 - alpha), not the alpha itself
        alpha8 = (255 - (QUANTUM - alpha.astype(np.int32)) // 257).astype(np.uint8)
        if alpha.min() == QUANTUM:
            alpha8 = None  # IM's PNG writer drops an all-opaque alpha channel
    return SeedPicture(pixels=out, alpha=alpha8)


def seed_chain(image: DecodedImage) -> np.ndarray:
    """uint8 (H, W, C), C in {1, 3}: the seed-chain PNG's colour pixels (what fastai's `open_image`
    reads after `convert('RGB')`, which drops any alpha)."""
    return seed_picture(image).pixels


def seed_chain_png(image: DecodedImage, compress_level: int = 1) -> bytes:
    """The chain's result as PNG bytes, pixel-identical to mogrify's output (alpha written as IM does)."""
    picture = seed_picture(image)
    return encode_png(picture.pixels, picture.alpha, compress_level)
