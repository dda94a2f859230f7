"""The decoded image: what every decoder hands the seed chain.

In:  nothing (a data type, imported by the decoders and by everything downstream of them).
Out: `DecodedImage`, pixels at the file's own depth plus an optional Q16 alpha plane and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class DecodedImage:
    """One decoded image, before any preprocessing.

    Attributes:
        pixels: (H, W, C), C in {1, 3}: uint8 8-bit samples v standing for the Q16 value v*257, or uint16
            Q16 values (16-bit sources, or any caller that built Q16 itself). 8-bit films are never widened
            to uint16 by a decoder: at the pixel limit that copy alone was 512 MB a grey film (issue 11).
        alpha: uint16 (H, W) alpha plane in Q16 when the file had one, else None.
        meta: format-specific metadata destined for output columns (never raw patient identifiers).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def q16(self) -> np.ndarray:
        """The pixels as uint16 Q16 values (H, W, C): 8-bit samples scaled v -> v*257 (a new array), Q16 kept."""
        if self.pixels.dtype == np.uint8:
            return np.multiply(self.pixels, 257, dtype=np.uint16)
        return self.pixels

    def eight_bit(self) -> np.ndarray:
        """The pixels as uint8 levels: 8-bit samples kept, Q16 values truncated (v // 257, as IM's 8-bit output)."""
        if self.pixels.dtype == np.uint8:
            return self.pixels
        return (self.pixels // 257).astype(np.uint8)
