"""The prepare deployment: one upload -> the prepared row `cxrage score`'s CPU stage makes of the same file.

Decode, seed chain and orientation run here, in their own replicas, as the batch scorer runs them in CPU tasks
apart from its predictor actor: the model replica's torch uses every core for the age model, and the small
orientation classifier sharing that process (and its thread setting) was many times slower on a busy machine.
Ray workers start with one torch thread, which is what the classifier wants. Prepared rows carry the 8-bit
picture (~0.25 MB) to the model deployment through Ray's object store.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cxrage_ray.serve.config import ServeConfig
from cxrage_ray.serve.scoring import Upload, prepare_upload
from cxrage_ray.config import PrepareSettings
from cxrage_ray.config import StorageConfig


class FilmPreparer:
    """Ray Serve deployment: `prepare(upload, position)` -> prepared row (never raises for a bad file).

    Args:
        cfg: the server's `ServeConfig` (decode options, orientation, `prepare_threads`).
    """

    def __init__(self, cfg: ServeConfig):
        self.settings = PrepareSettings(storage=StorageConfig(), decode=cfg.decode, preprocess="seed",
                                        orient=cfg.orient)
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.prepare_threads), thread_name_prefix="cxrage-prepare")

    def ready(self) -> bool:
        """For /healthz: the replica answers."""
        return True

    async def prepare(self, upload: Upload, position: int = 0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, prepare_upload, upload, self.settings, position)
