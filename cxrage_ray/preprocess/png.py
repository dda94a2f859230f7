"""8-bit pictures -> PNG bytes, written directly (the seed chain's output file).

In:  uint8 pixels (H, W, 1|3) and an optional uint8 (H, W) alpha plane.
Out: PNG bytes — grey -> L/LA, colour -> RGB/RGBA — carrying gAMA 1.0 as ImageMagick's files do.

Filter type 0 rows and one zlib stream: several times faster than Pillow's adaptive filtering at the fast
compression levels, and the pixels are what count.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(pixels: np.ndarray, alpha: np.ndarray | None = None, compress_level: int = 1) -> bytes:
    """8-bit PNG bytes of (H, W, 1|3) pixels plus optional (H, W) alpha: grey -> L/LA, colour -> RGB/RGBA."""
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
