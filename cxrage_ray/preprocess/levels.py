"""`-colorspace RGB -auto-level -depth 8` as one lookup table (spec §9).

In:  a picture's raw min and max (Q16), or the (trimmed) pixels themselves.
Out: `level_table`: uint8 (65536,) raw Q16 -> 8-bit level k (standing for Q16 257 k); `eight_bit_levels`: the
     pixels through it. The single steps (`linearize`, `auto_level`, `to_depth8`) are here too, for the tests
     that prove the table is their composition.

Every step up to `-depth 8` is a monotone per-value map, so the three collapse into one table built from the
trimmed image's min and max, with IM's own arithmetic (colorspace.c, enhance.c):
  -colorspace   sRGB -> linear light, v <- round(65535 g(v/65535)), every channel
  -auto-level   ONE min/max over all pixels and colour channels, v <- round(65535 ((1/(max-min)) (v-min)))
  -depth 8      v <- floor(v/257) * 257 (6.9.11 truncates)
The GPU path (`cxrage_ray.preprocess.tensor`) moves this same table to its device and indexes it there.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cxrage_ray.preprocess.quantum import QUANTUM, clamp_round


@lru_cache(maxsize=1)
def linear_table() -> np.ndarray:
    """uint16 (65536,) sRGB Q16 -> linear-light Q16 (read-only, built once)."""
    u = np.arange(QUANTUM + 1, dtype=np.float64) / QUANTUM
    g = np.where(u <= 0.0404482362771076, u / 12.92, ((u + 0.055) / 1.055) ** 2.4)
    table = np.floor(QUANTUM * g + 0.5).astype(np.uint16)
    table.flags.writeable = False
    return table


def linearize(q16: np.ndarray) -> np.ndarray:
    """`-colorspace RGB`: sRGB-encoded Q16 -> linear-light Q16, v <- round(65535 g(v/65535))."""
    return linear_table()[q16]


def auto_level(q16: np.ndarray, lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """`-auto-level`: one min/max over every pixel and channel; v <- round(65535 ((1/(hi-lo)) (v-lo))).

    Args:
        q16: Q16 values (any shape, colour channels only).
        lo, hi: the min/max to use (default: of `q16`). Equal bounds leave the image unchanged.
    """
    lo = int(q16.min()) if lo is None else lo
    hi = int(q16.max()) if hi is None else hi
    if hi == lo:
        return q16.astype(np.uint16)
    scale = 1.0 / (hi - lo)
    return clamp_round(QUANTUM * (scale * (q16.astype(np.float64) - lo))).astype(np.uint16)


def to_depth8(q16: np.ndarray) -> np.ndarray:
    """`-depth 8` in 6.9.11: v <- floor(v/257) * 257 (truncation, as `ScaleQuantumToAny` does)."""
    return (q16 // 257 * 257).astype(np.uint16)


def level_table(raw_min: int, raw_max: int) -> np.ndarray:
    """uint8 table raw Q16 -> floor(depth8(auto_level(linearize(v))) / 257) for one image.

    Linearisation is monotone, so the linearised image's min/max are the table values at the raw
    image's min/max; the table's output k stands for the Q16 value 257 k.
    """
    lin = linear_table()
    return (auto_level(lin, int(lin[raw_min]), int(lin[raw_max])) // 257).astype(np.uint8)


def eight_bit_levels(pixels: np.ndarray) -> np.ndarray:
    """uint8 levels of -colorspace RGB, -auto-level, -depth 8 (`level_table`) for Q16 or 8-bit pixels."""
    if pixels.dtype == np.uint8:  # 8-bit v is Q16 257 v: read the Q16 table at those 256 points
        table = level_table(int(pixels.min()) * 257, int(pixels.max()) * 257)[::257]
    else:
        table = level_table(int(pixels.min()), int(pixels.max()))
    return table[pixels]
