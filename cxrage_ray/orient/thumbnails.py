"""Thumbnails of a seed-chain picture: the small grey squares the classifier and the picture QC look at.

In:  a uint8 picture (H, W[, C]), C in {1, 3}.
Out: float32 (size, size) grey thumbnails, box-filtered, aspect NOT kept; `Thumbnails` makes any number of sizes
     from one grey copy of the picture.
"""

from __future__ import annotations

import numpy as np


def thumbnail(image_u8: np.ndarray, size: int) -> np.ndarray:
    """uint8 picture (H, W[, C]) -> float32 (size, size) grey, box-filtered, aspect NOT kept.

    Squashing (instead of cropping) keeps the whole film and commutes with 90° rotations, so a rotated film's
    thumbnail is the rotated thumbnail.
    """
    return Thumbnails(image_u8)(size)


class Thumbnails:
    """A picture's `thumbnail`s at any sizes, from one grey float copy of the picture.

    The QC of one film asks for up to three (the classifier's, the chest templates' and the blank grid); the
    grey conversion is most of each one's cost, and two of them share a size (issue 15: ~1.5 ms per film).
    Every thumbnail is the one `thumbnail` gives.
    """

    def __init__(self, image_u8: np.ndarray):
        from PIL import Image

        image = np.asarray(image_u8)
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 picture, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        pil = Image.fromarray(np.ascontiguousarray(image))
        if pil.mode != "L":
            pil = pil.convert("L")  # grey stored as RGB converts to itself
        self._grey = pil.convert("F")
        self._sized: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, picture: np.ndarray | Thumbnails) -> Thumbnails:
        """`picture`'s thumbnails: itself when it already is one (the QC functions take either)."""
        return picture if isinstance(picture, Thumbnails) else cls(picture)

    def __call__(self, size: int) -> np.ndarray:
        if size not in self._sized:
            from PIL import Image

            self._sized[size] = np.asarray(self._grey.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
        return self._sized[size]
