"""File digests: the one sha256-of-a-file helper (weights identity, sidecars, conversion metadata).

In:  a local file path (and, for `hash_file_into`, a running hashlib digest to extend).
Out: the hex sha256 of the file, read in 1 MiB chunks so a 257 MB checkpoint never sits in memory whole.

A leaf with no third-party imports: `model.checkpoint` (torch) and `model.registry` (no torch) both use it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    hash_file_into(path, digest)
    return digest.hexdigest()


def hash_file_into(path: str | os.PathLike[str], digest: Any) -> None:
    """Feed the file at `path` into `digest` (a hashlib object), e.g. to resume hashing a partial download."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
