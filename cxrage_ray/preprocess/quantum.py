"""ImageMagick 6.9.11 Q16 (non-HDRI) arithmetic that every step of the seed chain shares.

In:  float64 values on the Q16 scale.
Out: the constants IM compares and scales with, and its `ClampToQuantum` rounding.
"""

from __future__ import annotations

import numpy as np

#: The largest Q16 value (IM's `QuantumRange`).
QUANTUM = 65535
#: IM's `MagickEpsilon`: the guard it adds before divisions and in the resize's support arithmetic.
MAGICK_EPSILON = 1.0e-12


def clamp_round(value: np.ndarray) -> np.ndarray:
    """IM's `ClampToQuantum` (non-HDRI): 0 below 0, 65535 above, else (Quantum)(value + 0.5)."""
    return np.floor(np.clip(value, 0.0, QUANTUM) + 0.5)
