"""The files shipped beside the code: the weight registry, model cards and the small weights we train.

In:  a file name (``registry.json``, ``orientation.safetensors``, a model card).
Out: a `Traversable` for it (read it, or `importlib.resources.as_file` it).

An installed package has them as ``cxrage_ray.weights_data`` (pyproject maps the checkout's ``weights/``
folder there). Run from a checkout with ``PYTHONPATH=.`` and nothing installed — as the GPU benchmark kit runs
on a bare machine — that name does not exist, so the checkout's ``weights/`` beside the package is used.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

#: Where a checkout keeps the packaged files, relative to the `cxrage_ray` folder.
CHECKOUT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


def packaged_file(name: str) -> Traversable:
    """The shipped file `name`, from the installed package, else from the checkout's ``weights/``."""
    try:
        folder: Traversable = resources.files("cxrage_ray.weights_data")
    except ModuleNotFoundError:  # not installed: a checkout on PYTHONPATH
        folder = CHECKOUT_WEIGHTS
    return folder.joinpath(name)
