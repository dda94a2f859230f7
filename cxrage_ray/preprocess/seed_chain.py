"""The original pipeline's ImageMagick step, bit-exactly (spec §9).

In:  a `DecodedImage` (pixels (H, W, C), C in {1, 3}: uint8 8-bit samples or uint16 Q16; optional Q16 alpha).
Out: uint8 (H', W', C') with short side 512 and C' = 1 when every pixel is grey, else 3 — the pixels of
     `mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^ -format png` as
     ImageMagick 6.9.11 Q16 (non-HDRI) writes them; `seed_chain_png` gives that PNG file itself.

The chain, with IM's own arithmetic (magick/attribute.c, colorspace.c, enhance.c, resize.c, png.c):
  trim          bounding box against the TL/TR/BL corner colours, exact equality on all channels + alpha
  -colorspace   sRGB -> linear light, v <- round(65535 g(v/65535)), every channel
  -auto-level   ONE min/max over all pixels and colour channels, v <- round(65535 ((1/(max-min)) (v-min)))
  -depth 8      v <- floor(v/257) * 257 (6.9.11 truncates)
  -resize ^     fill 512x512; Lanczos-3 (IM's polynomial SincFast) when shrinking, Mitchell when enlarging
                or when the image has an alpha channel; separable, Q16 rounding between the passes
  PNG write     v8 = floor(v/257); alpha8 = 255 - floor((65535 - alpha)/257), written only when some
                pixel is not opaque

Everything up to `-depth 8` is a monotone per-value map, so it collapses into one 65536-entry lookup
table built from the trimmed image's min and max. The resize runs as banded BLAS products; the few
outputs that land within 1e-7 of a rounding tie are recomputed in IM's exact summation order, so the
result does not depend on how BLAS orders its sums.

Memory: nothing here makes a full-frame copy wider than the input, so a film at the pixel limit costs its
pixels plus one byte a pixel of levels: 8-bit films stay uint8 throughout (the lookup table is read at the
8-bit values' Q16 points), the trim compares colour and alpha without stacking them, the rare tie recount
converts only the taps it reads to float64 (it used to convert the whole frame: 2 GB at the limit), and the
alpha-weighted resize converts `ALPHA_CHUNK` columns at a time.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from cxrage_ray.decode.image import DecodedImage
from cxrage_ray.decode.limits import check_fill_aspect

QUANTUM = 65535
TARGET = 512
MAGICK_EPSILON = 1.0e-12
#: Outputs of a BLAS-ordered sum this close to x.5 are redone in IM's summation order. BLAS and IM's
#: sequential sums differ by < 1e-9 here (<= ~60 terms of magnitude <= 65535 * 1.3, double precision).
TIE_TOLERANCE = 1.0e-7
#: Output rows per dense block of the banded resize: small enough that the dense block wastes little
#: work outside the band, large enough for BLAS to run at speed.
BLOCK = 8

FilterName = Literal["lanczos", "mitchell"]


# ---------------------------------------------------------------------------------------------------
# -trim
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# -colorspace RGB, -auto-level, -depth 8: one lookup table
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _linear_table() -> np.ndarray:
    u = np.arange(QUANTUM + 1, dtype=np.float64) / QUANTUM
    g = np.where(u <= 0.0404482362771076, u / 12.92, ((u + 0.055) / 1.055) ** 2.4)
    table = np.floor(QUANTUM * g + 0.5).astype(np.uint16)
    table.flags.writeable = False
    return table


def linearize(q16: np.ndarray) -> np.ndarray:
    """`-colorspace RGB`: sRGB-encoded Q16 -> linear-light Q16, v <- round(65535 g(v/65535))."""
    return _linear_table()[q16]


def _clamp_round(value: np.ndarray) -> np.ndarray:
    """IM's `ClampToQuantum` (non-HDRI): 0 below 0, 65535 above, else (Quantum)(value + 0.5)."""
    return np.floor(np.clip(value, 0.0, QUANTUM) + 0.5)


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
    return _clamp_round(QUANTUM * (scale * (q16.astype(np.float64) - lo))).astype(np.uint16)


def to_depth8(q16: np.ndarray) -> np.ndarray:
    """`-depth 8` in 6.9.11: v <- floor(v/257) * 257 (truncation, as `ScaleQuantumToAny` does)."""
    return (q16 // 257 * 257).astype(np.uint16)


def level_table(raw_min: int, raw_max: int) -> np.ndarray:
    """uint8 table raw Q16 -> floor(depth8(auto_level(linearize(v))) / 257) for one image.

    Linearisation is monotone, so the linearised image's min/max are the table values at the raw
    image's min/max; the table's output k stands for the Q16 value 257 k.
    """
    lin = _linear_table()
    return (auto_level(lin, int(lin[raw_min]), int(lin[raw_max])) // 257).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# -resize: IM's filters and contribution weights
# ---------------------------------------------------------------------------------------------------

# SincFast for Q16 (resize.c, "Max. abs. rel. error 2.2e-8 < 1/2^25"): IM's Lanczos uses this polynomial,
# not sin(pi x)/(pi x).
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


FILTER_SUPPORT = {"lanczos": 3.0, "mitchell": 2.0}


@dataclass(frozen=True)
class AxisWeights:
    """Contributions of one resize axis: output i = sum_t weights[i, t] * input[starts[i] + t].

    `weights` is zero-padded to the longest row; `counts[i]` is the real number of taps.
    """

    starts: np.ndarray
    counts: np.ndarray
    weights: np.ndarray


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
    for arr in (starts, counts, w):
        arr.flags.writeable = False
    return AxisWeights(starts=starts, counts=counts, weights=w)


def _pass_exact(x2d: np.ndarray, aw: AxisWeights, rows: np.ndarray, cols: np.ndarray, value_scale: float = 1.0
                ) -> np.ndarray:
    """IM's sequential sum for the selected (output row, column) pairs of one pass along axis 0.

    Only the taps read are converted to float64 (times `value_scale`): the same numbers as converting the whole
    input first, without a full-frame float64 copy.
    """
    acc = np.zeros(rows.size)
    starts = aw.starts[rows]
    for k in range(aw.weights.shape[1]):
        idx = np.minimum(starts + k, x2d.shape[0] - 1)  # padded taps have weight 0
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


def _pass_rows(x2d: np.ndarray, aw: AxisWeights, blocks, value_scale: float = 1.0) -> np.ndarray:
    """One resize pass along axis 0 of a 2-D array -> uint16 (n_out, columns), IM-exact.

    Args:
        x2d: (n_in, m) input; the Q16 value of an entry is `value_scale * x2d[...]`.
        aw: the axis contributions; blocks: the same cut into dense blocks (`_dense_blocks`).
        value_scale: 257.0 when x2d holds 8-bit levels k standing for 257 k.
    """
    n_out = aw.starts.size
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
        idx = np.minimum(aw.starts + k, color.shape[0] - 1)
        w = aw.weights[:, k][:, None]
        a = w * qscale * (QUANTUM - opacity[idx])
        num = num + a[:, :, None] * color[idx]
        opac = opac + w * opacity[idx]
        gamma = gamma + a
    recip = np.where(np.abs(gamma) >= MAGICK_EPSILON, 1.0 / np.where(gamma == 0, 1.0, gamma),
                     np.where(gamma < 0, -1.0, 1.0) / MAGICK_EPSILON)
    return _clamp_round(recip[:, :, None] * num), _clamp_round(opac)


#: Input lines (columns of the pass) converted to float64 at a time by the alpha-weighted first pass: the whole
#: frame's colour and opacity as float64 were 32 B a pixel for RGBA (8.6 GB at the pixel limit).
ALPHA_CHUNK = 512


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


def fill_size(width: int, height: int, target: int = TARGET) -> tuple[int, int]:
    """`-resize {target}x{target}^` geometry: short side -> target, aspect kept, upscaling allowed."""
    s = max(target / width, target / height)
    return int(math.floor(width * s + 0.5)), int(math.floor(height * s + 0.5))


def resize_filter(width: int, height: int, out_w: int, out_h: int, has_alpha: bool) -> FilterName:
    """IM's default filter: Mitchell when enlarging (x_factor * y_factor > 1) or with alpha, else Lanczos."""
    if has_alpha or (out_w / width) * (out_h / height) > 1.0:
        return "mitchell"
    return "lanczos"


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
    h, w, c = q16.shape
    if (out_w, out_h) == (w, h):
        out = q16.astype(np.uint16) * (257 if levels else 1)
        return out.astype(np.uint16), alpha
    name = resize_filter(w, h, out_w, out_h, alpha is not None)
    aw_x, aw_y = axis_weights(w, out_w, name), axis_weights(h, out_h, name)
    bx, by = _dense_blocks(w, out_w, name), _dense_blocks(h, out_h, name)
    horizontal_first = out_w / w > out_h / h
    if alpha is not None:
        scale = 257.0 if levels else 1.0
        if horizontal_first:
            color, opacity = _first_pass_alpha(q16.transpose(1, 0, 2), alpha.T, aw_x, scale)
            color, opacity = _pass_rows_alpha(color.transpose(1, 0, 2), opacity.T, aw_y)
        else:
            color, opacity = _first_pass_alpha(q16, alpha, aw_y, scale)
            color, opacity = _pass_rows_alpha(color.transpose(1, 0, 2), opacity.T, aw_x)
            color, opacity = color.transpose(1, 0, 2), opacity.T
        return color.astype(np.uint16), (QUANTUM - opacity).astype(np.uint16)
    scale = 257.0 if levels else 1.0
    planes = []
    for ch in range(c):
        plane = q16[:, :, ch]
        if horizontal_first:
            mid = _pass_rows(plane.T, aw_x, bx, scale)  # (out_w, h)
            res = _pass_rows(np.ascontiguousarray(mid.T), aw_y, by)  # (out_h, out_w)
        else:
            mid = _pass_rows(plane, aw_y, by, scale)  # (out_h, w)
            res = _pass_rows(np.ascontiguousarray(mid.T), aw_x, bx).T  # (out_h, out_w)
        planes.append(res)
    return np.stack(planes, axis=2), None


def resize_fill_512(q16: np.ndarray, alpha: np.ndarray | None = None, levels: bool = False):
    """`-resize 512x512^` on (H, W, C) values (see `im_resize`)."""
    h, w = q16.shape[:2]
    out_w, out_h = fill_size(w, h)
    return im_resize(q16, out_w, out_h, alpha=alpha, levels=levels)


# ---------------------------------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedPicture:
    """The chain's result as IM writes it: 8-bit pixels (H, W, C) with C in {1, 3}, and the 8-bit
    alpha plane when IM writes one (some pixel not opaque), else None."""

    pixels: np.ndarray
    alpha: np.ndarray | None


def _all_channels_equal(pixels: np.ndarray) -> bool:
    return pixels.shape[2] == 1 or bool(
        np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 1], pixels[:, :, 2]))


def _levels(pixels: np.ndarray) -> np.ndarray:
    """uint8 levels of -colorspace RGB, -auto-level, -depth 8 (`level_table`) for Q16 or 8-bit pixels."""
    if pixels.dtype == np.uint8:  # 8-bit v is Q16 257 v: read the Q16 table at those 256 points
        table = level_table(int(pixels.min()) * 257, int(pixels.max()) * 257)[::257]
    else:
        table = level_table(int(pixels.min()), int(pixels.max()))
    return table[pixels]


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
    levels = _levels(pixels)
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


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(pixels: np.ndarray, alpha: np.ndarray | None = None, compress_level: int = 1) -> bytes:
    """8-bit PNG bytes of (H, W, 1|3) pixels plus optional (H, W) alpha: grey -> L/LA, colour -> RGB/RGBA.

    Written directly (filter type 0 rows, one zlib stream) because it is several times faster than
    Pillow's adaptive filtering at the fast compression levels; the file carries gAMA 1.0 as IM's does.
    """
    data = pixels if alpha is None else np.concatenate([pixels, alpha[:, :, None]], axis=2)
    h, w, c = data.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)
    raw[:, 1:] = data.reshape(h, w * c)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)),
        _chunk(b"gAMA", struct.pack(">I", 100000)),
        _chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level)),
        _chunk(b"IEND", b""),
    ))


def seed_chain_png(image: DecodedImage, compress_level: int = 1) -> bytes:
    """The chain's result as PNG bytes, pixel-identical to mogrify's output (alpha written as IM does)."""
    picture = seed_picture(image)
    return encode_png(picture.pixels, picture.alpha, compress_level)
