"""Weights the scoring actors read themselves (`WeightsFile`), and which weights are known to load."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import random_state_dict, save_fastai_checkpoint, save_malicious_checkpoint
from cxrage_ray.errors import UnsafeCheckpointError, WeightsError
from cxrage_ray.model.registry import ResolvedWeights
from cxrage_ray.model.weights_file import LOADABLE_RECORD, WeightsFile, actors_can_read, remember_loadable
from cxrage_ray.pipeline.itinerary import _weights_for_actors
from cxrage_ray.config import RayConfig, ScoreConfig
from cxrage_ray.storage.digest import sha256_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    state = random_state_dict(3)
    save_fastai_checkpoint(path, state, legacy=False)
    return path, state


def test_a_weights_file_loads_what_the_driver_verified_and_refuses_a_changed_one(checkpoint, tmp_path):
    path, state = checkpoint
    loaded = WeightsFile(path, sha256_file(path)).load()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    copy = tmp_path / "model.pth"
    copy.write_bytes(path.read_bytes())
    verified = WeightsFile(copy, sha256_file(copy))
    copy.write_bytes(copy.read_bytes()[:-1] + b"x")  # replaced after the job started
    with pytest.raises(WeightsError, match="changed after the job started"):
        verified.load()
    copy.unlink()
    with pytest.raises(WeightsError, match="missing"):
        verified.load()


def test_the_actor_still_refuses_an_unsafe_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    save_malicious_checkpoint(path, tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointError):
        WeightsFile(path, sha256_file(path)).load()
    assert not (tmp_path / "pwned").exists()


def test_only_weights_known_to_load_are_handed_to_the_actors_as_a_file(checkpoint, tmp_path):
    """A file never loaded here is parsed on the driver (a bad one fails there with its own message); once it
    loaded, the next embedded job hands its actors the file; the published model always; a cluster never."""
    path, _ = checkpoint
    sha = sha256_file(path)
    home = tmp_path / "home"
    explicit = ResolvedWeights(path, sha, "explicit")
    embedded = ScoreConfig(input="m.csv", output="out")
    assert not actors_can_read(explicit, home)
    first = _weights_for_actors(explicit, home, embedded)
    assert not isinstance(first, WeightsFile) and list(first.result())  # parsed on the driver's thread
    assert json.loads((home / LOADABLE_RECORD).read_text()) == [sha]
    second = _weights_for_actors(explicit, home, embedded)
    assert second == WeightsFile(path, sha)
    assert actors_can_read(ResolvedWeights(path, "0" * 64, "cache"), tmp_path / "empty")  # verified published
    on_cluster = ScoreConfig(input="m.csv", output="out", ray=RayConfig(address="auto"))
    shipped = _weights_for_actors(explicit, home, on_cluster)
    assert not isinstance(shipped, WeightsFile) and list(shipped.result())
    # the record stays short, newest last, and a broken one only means parsing on the driver again
    for k in range(70):
        remember_loadable(home, f"{k:064d}")
    kept = json.loads((home / LOADABLE_RECORD).read_text())
    assert len(kept) == 64 and kept[-1] == f"{69:064d}" and sha not in kept
    (home / LOADABLE_RECORD).write_text("{not json")
    assert not actors_can_read(explicit, home)
