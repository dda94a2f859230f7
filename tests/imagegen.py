"""Synthetic test images generated in code (no binary fixtures): arrays and their encoded bytes."""

from __future__ import annotations

import io

import numpy as np


def radiograph(h: int, w: int, seed: int = 0, border: int = 0, border_value: int = 0,
               dtype=np.uint8) -> np.ndarray:
    """A smooth body-like blob plus noise, with an optional constant border (H, W)."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 65535
    y, x = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((y - h / 2) / (0.35 * h)) ** 2 + ((x - w / 2) / (0.3 * w)) ** 2))
    img = 0.15 * top + 0.7 * top * blob + rng.normal(0, 0.03 * top, (h, w))
    img = np.clip(img, 1, top - 1).astype(dtype)
    if border:
        img[:border], img[-border:], img[:, :border], img[:, -border:] = (border_value,) * 4
    return img


def pillow_bytes(arr: np.ndarray, fmt: str, mode: str | None = None, **save) -> bytes:
    from PIL import Image

    # Pillow infers I;16 for uint16 and LA for (H, W, 2) uint8; only pass modes it cannot infer
    im = Image.fromarray(arr, mode=mode) if mode not in (None, "I;16", "LA") else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def palette_png(h: int, w: int, seed: int = 0, transparent_index: int | None = None) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    idx = (radiograph(h, w, seed) // 16).astype(np.uint8)  # 16 levels
    im = Image.fromarray(idx, mode="P")
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    im.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    kw = {} if transparent_index is None else {"transparency": transparent_index}
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray | list[np.ndarray], **kw) -> bytes:
    """One TIFF page per array (a list gives a multi-page file)."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for page in arr if isinstance(arr, list) else [arr]:
            tw.write(page, **kw)
    return buf.getvalue()
