"""The model deployment: prepared rows -> served result objects, films batched across requests with `@serve.batch`.

Each replica holds the `ScoreActor` the batch scorer runs (an `AgePredictor` plus the constant labels) and
a `SaliencyMaker` per method on the same model. A call scores one file that `FilmPreparer` has prepared:

    prepared row --(@serve.batch: films of concurrent requests gathered)--> score_films (one model pass) --> result

The batched model pass runs in a worker thread, so the replica keeps accepting films while a batch is on the
model: those queue up and form the next batch.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

from ray import serve

from cxrage_ray.config import SALIENCY_METHODS
from cxrage_ray.pipeline.plan import CPU_BATCH_VIEWS, GPU_BATCH_VIEWS
from cxrage_ray.serve.config import ServeConfig
from cxrage_ray.serve.scoring import ScoreOptions, score_films



class FilmScorer:
    """Ray Serve model deployment (see the module docstring); plain class, wrapped by `serve.deployment`.

    Args:
        cfg: the server's `ServeConfig` (weights path + sha256, predictor, decode, orientation, batching).
    """

    def __init__(self, cfg: ServeConfig):
        import torch

        from cxrage_ray.model.checkpoint import load_state_dict, sha256_file
        from cxrage_ray.errors import WeightsError
        from cxrage_ray.predict.saliency import SaliencyMaker
        from cxrage_ray.predict.scoring import ScoreActor

        sha256 = sha256_file(cfg.weights_path)
        if sha256 != cfg.weights_sha256:
            raise WeightsError(f"{cfg.weights_path} on this node has sha256 {sha256}, not {cfg.weights_sha256}")
        predictor_config = cfg.predictor
        if predictor_config.batch_size <= 0:
            gpu = predictor_config.device != "cpu" and torch.cuda.is_available()
            predictor_config = replace(predictor_config, batch_size=GPU_BATCH_VIEWS if gpu else CPU_BATCH_VIEWS)
        # a lone request runs only its own views, not a padded pass (latency; `PredictorConfig.fixed_shape`): its
        # age may differ from `cxrage score`'s in the 7th digit
        predictor_config = replace(predictor_config, fixed_shape=False)
        labels = {"weights_sha256": cfg.weights_sha256, "weights_name": cfg.weights_name, "preprocess": "seed",
                  "tta": predictor_config.tta, "decode": cfg.decode.mode}
        self.stage = ScoreActor([load_state_dict(cfg.weights_path)], predictor_config, labels)
        model = self.stage.predictor.model
        self.saliency_makers = {method: SaliencyMaker(model, method) for method in SALIENCY_METHODS}
        self.score_batch.set_max_batch_size(cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batches_run = 0
        self.films_in_batches = 0
        self.largest_batch = 0

    async def score(self, prepared: dict[str, Any], options: ScoreOptions) -> dict[str, Any]:
        """One prepared file -> its result object; an error row passes through unscored (never raises for bad input)."""
        if prepared["status"] != "ok":
            return score_films([prepared], self.stage.predictor, self.stage.labels)[0]
        return await self.score_batch((prepared, options))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def score_batch(self, items: list[tuple[dict[str, Any], ScoreOptions]]) -> list[dict[str, Any]]:
        """Films of concurrent requests -> their results, on one model pass (in a worker thread)."""
        self.batches_run += 1
        self.films_in_batches += len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        prepared = [item[0] for item in items]
        options = [item[1] for item in items]
        return await asyncio.to_thread(score_films, prepared, self.stage.predictor, self.stage.labels,
                                       self.saliency_makers, options)

    def stats(self) -> dict[str, Any]:
        """Batching figures of this replica since it started."""
        return {
            "batches_run": self.batches_run,
            "films_scored_in_batches": self.films_in_batches,
            "mean_batch_size": self.films_in_batches / self.batches_run if self.batches_run else None,
            "largest_batch": self.largest_batch,
            "pid": os.getpid(),
        }

    def model_info(self) -> dict[str, Any]:
        """What this replica scores with: weights, device/precision, preprocessing and TTA settings."""
        import numpy
        import torch

        import cxrage_ray

        predictor = self.stage.predictor
        return {
            "weights_sha256": self.stage.labels["weights_sha256"],
            "weights_name": self.stage.labels["weights_name"],
            "device": self.stage.labels["device"],
            "tta": predictor.config.tta,
            "views_per_forward_pass": predictor.config.batch_size,
            "versions": {"cxrage_ray": cxrage_ray.__version__, "torch": torch.__version__,
                         "numpy": numpy.__version__},
        }
