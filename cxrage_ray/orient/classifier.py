"""The orientation classifier: seed-chain pictures -> how each lies (quarter turns) and whether it is a lateral.

In:  seed-chain pictures (uint8 (H, W, C)) or their `Thumbnails`; weights from a safetensors file (by default the
     committed `weights/orientation.safetensors`, trained by `jobs/train_rotation.py`; model card
     `weights/ORIENTATION_MODEL_CARD.md`).
Out: one `OrientationPrediction` per picture (rotation probabilities, lateral probability). CPU, batched.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrage_ray.errors import WeightsError
from cxrage_ray.orient.array_network import ArrayNetwork, check_shapes
from cxrage_ray.orient.thumbnails import Thumbnails

ROTATIONS = (0, 90, 180, 270)
DEFAULT_WEIGHTS = "orientation.safetensors"


def standardise(thumbs: np.ndarray) -> np.ndarray:
    """Per-image zero mean / unit spread (the classifiers' input; robust to exposure and auto-level)."""
    mean = thumbs.mean(axis=(-2, -1), keepdims=True)
    std = thumbs.std(axis=(-2, -1), keepdims=True)
    return ((thumbs - mean) / (std + 1.0)).astype(np.float32)


@dataclass(frozen=True)
class OrientationPrediction:
    """The classifiers' verdict on one picture.

    Args:
        rotation_probs: P(input is rotated 0/90/180/270° clockwise), sums to 1.
        lateral_prob: P(lateral projection), averaged over the views scored (the four quarter turns, and
            their mirror images with `mirror_tta`).
    """

    rotation_probs: tuple[float, float, float, float]
    lateral_prob: float

    @property
    def rotation(self) -> int:
        return ROTATIONS[int(np.argmax(self.rotation_probs))]

    @property
    def confidence(self) -> float:
        return float(max(self.rotation_probs))


class OrientationClassifier:
    """Tiny CNN with two heads: rotation (4 classes) and frontal/lateral (architecture in the weights' metadata).

    In:  seed-chain pictures (uint8 (H, W, C)); each becomes a `size` px grey thumbnail (`thumbnail`), standardised.
    Out: one `OrientationPrediction` per picture. The network sees all four quarter turns of each thumbnail (and,
    with `mirror_tta`, of its left-right mirror image: eight views) and the rotation scores are combined
    consistently (turn j of a film lying at k lies at k + j; the mirror image of a film lying at k lies at -k),
    so the verdict is equivariant to 90° rotations by construction; the lateral probability is the mean over
    the views. CPU, batched, no gradients.

    Args:
        network: float32 (N, 1, size, size) numpy -> (N, 6) logits: the `ArrayNetwork` `load` builds, or a torch
            module built by `build_network` with its weights loaded.
        size: thumbnail side the network was trained on.
        metadata: the weights file's metadata (training figures, data, version).
        mirror_tta: also score the mirrored thumbnail (the network was trained with left-right flips, under
            which an upright film stays upright).
    """

    def __init__(
        self,
        network: Any,
        size: int = 64,
        metadata: Mapping[str, str] | None = None,
        mirror_tta: bool = False,
    ) -> None:
        # the shipped weights load as an `ArrayNetwork` (numpy); a torch module (training, tests) is wrapped
        self.network = torch_logits(network) if hasattr(network, "state_dict") else network
        self.size = size
        self.metadata = dict(metadata or {})
        self.mirror_tta = mirror_tta

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> OrientationClassifier:
        """Load from a safetensors file; by default the committed `weights/orientation.safetensors`."""
        from safetensors import safe_open

        if path is None:
            from importlib.resources import as_file

            from cxrage_ray.model.packaged import packaged_file

            with as_file(packaged_file(DEFAULT_WEIGHTS)) as packaged:
                return cls.load(packaged)
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"orientation weights {path} not found; retrain with `python jobs/train_rotation.py`")
        with safe_open(str(path), framework="np") as handle:  # numpy: no torch in the prepare workers
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        arch = json.loads(metadata.get("architecture", "{}"))
        size = int(arch.get("size", 64))
        try:
            network = ArrayNetwork.from_state(state, downsample=str(arch.get("downsample", "pool")))
            check_shapes(network, width=int(arch.get("width", 8)), hidden=int(arch.get("hidden", 64)), size=size,
                         stages=int(arch.get("stages", 3)))
        except (KeyError, ValueError) as exc:
            raise WeightsError(f"{path} does not match the orientation network: {exc}") from exc
        return cls(network, size=size, metadata=metadata, mirror_tta=bool(arch.get("mirror_tta", False)))

    def predict(self, images: Sequence[np.ndarray | Thumbnails], batch_size: int = 64) -> list[OrientationPrediction]:
        """Pictures (or their `Thumbnails`) -> one prediction each."""
        thumbs = [Thumbnails.of(image) for image in images]
        stacked = np.stack([thumb(self.size) for thumb in thumbs]) if len(thumbs) else np.zeros((0,))
        return self.predict_thumbnails(stacked, batch_size=batch_size)

    def predict_thumbnails(self, thumbs: np.ndarray, batch_size: int = 64) -> list[OrientationPrediction]:
        """Same as `predict` on precomputed `thumbnail`s, shape (N, size, size)."""
        if len(thumbs) == 0:
            return []
        x = standardise(np.asarray(thumbs, dtype=np.float32))
        # view (m, j): the thumbnail, mirrored left-right when m == 1, then turned j quarter turns clockwise
        mirrors = [x, x[:, :, ::-1]] if self.mirror_tta else [x]
        views = [np.rot90(m, k=-j, axes=(1, 2)) for m in mirrors for j in range(4)]
        n_views = len(views)
        turns = np.stack(views, axis=1)  # (N, views, S, S)
        flat = np.ascontiguousarray(turns.reshape(-1, 1, self.size, self.size))
        chunk = batch_size * n_views
        logits = np.concatenate([self.network(flat[i:i + chunk]) for i in range(0, len(flat), chunk)])
        logits = logits.astype(np.float64).reshape(len(x), n_views, 6)
        rot_logp = _log_softmax(logits[:, :, :4])  # (N, view, class c)
        # a film lying at k, turned j more, lies at (k + j) % 4; its mirror image turned j lies at (j - k) % 4
        # (mirroring reverses the sense of rotation): score(k) = sum over views of log p_view[where it lies]
        k = np.arange(4)
        score = np.zeros((len(x), 4))
        for v in range(n_views):
            mirrored, j = divmod(v, 4)
            lies = (j - k) % 4 if mirrored else (k + j) % 4
            score = score + rot_logp[:, v, lies]
        rot_probs = np.exp(_log_softmax(score))
        lateral = np.exp(_log_softmax(logits[:, :, 4:]))[:, :, 1].mean(axis=1)
        return [
            OrientationPrediction(rotation_probs=tuple(float(p) for p in rot_probs[i]), lateral_prob=float(lateral[i]))
            for i in range(len(x))
        ]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis (float64), stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def torch_logits(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A torch module built by `build_network` (training, tests) as the classifier's numpy -> numpy network."""
    import torch

    module.eval()

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return logits


@functools.lru_cache(maxsize=1)
def default_classifier() -> OrientationClassifier:
    """The committed classifier, loaded once per process (used when `orient` is given no classifier)."""
    return OrientationClassifier.load()
