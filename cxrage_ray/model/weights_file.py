"""Weights a scoring actor reads itself: a verified file, on the machine the actor runs on.

In:  the weights `cxrage_ray.model.registry.resolve_weights` chose (path, sha256, where they came from) and the
     weights cache folder.
Out: `actors_can_read` says whether a job on the embedded Ray may hand its actors the file (`WeightsFile`) instead
     of a state dict the driver parsed; `WeightsFile.load()` is the state dict, once the file is seen to still
     have its sha256.

Why: on the embedded local Ray every actor runs on this machine, so the driver need not parse the checkpoint and
ship it through the object store, and then never imports torch: ~2.5 s of a core while Ray starts on 2 cores and
~300 MB of the driver's memory (issue 22). Only for weights known to load: the published model (its sha256 is the
registry's) and files whose sha256 loaded here before (`remember_loadable`, a list in the cache folder), so a bad
file still fails on the driver with its one-line message, not inside an actor as Ray's `ActorDiedError`. The
actor loads through the same restricted unpickler; the list only skips the driver's parse of the same bytes. A
job on a cluster still ships the state dict (`ray.put`): the actors' nodes do not have this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrage_ray.errors import WeightsError
from cxrage_ray.storage.atomic import write_atomic
from cxrage_ray.storage.digest import sha256_file

#: sha256s of weights files that loaded here (in the weights cache folder).
LOADABLE_RECORD = "loadable-sha256.json"
#: the most sha256s kept (a user with many checkpoints; the oldest drop out and are parsed on the driver again).
LOADABLE_KEPT = 64


@dataclass(frozen=True)
class WeightsFile:
    """A weights file the driver verified (`path`, its `sha256`), for actors on the same machine to load."""

    path: Path
    sha256: str

    def load(self) -> dict:
        """The state dict; WeightsError when the file no longer has the sha256 the job started with (it was
        replaced while the job ran: the rows already written say which weights scored them)."""
        from cxrage_ray.model.checkpoint import load_state_dict

        found = sha256_file(self.path) if Path(self.path).is_file() else "missing"
        if found != self.sha256:
            raise WeightsError(f"the weights file {self.path} changed after the job started (sha256 {found}, "
                               f"verified {self.sha256}); rerun the command to score with the file as it is now")
        return load_state_dict(self.path)


def actors_can_read(weights: Any, home: Path) -> bool:
    """Whether `weights` (a `ResolvedWeights`) are known to load: the verified published model, or a file whose
    sha256 loaded here before."""
    return weights.source in ("cache", "fetched") or weights.sha256 in _loadable(home)


def remember_loadable(home: Path, sha256: str) -> None:
    """Record that a file of this sha256 loaded (best effort: a cache folder that cannot be written only means the
    next job parses it on the driver again)."""
    known = [sha for sha in _loadable(home) if sha != sha256] + [sha256]
    try:
        write_atomic(Path(home) / LOADABLE_RECORD, json.dumps(known[-LOADABLE_KEPT:]).encode())
    except OSError:
        pass


def _loadable(home: Path) -> list[str]:
    try:
        known = json.loads((Path(home) / LOADABLE_RECORD).read_text())
    except (OSError, ValueError):
        return []
    return [sha for sha in known if isinstance(sha, str)] if isinstance(known, list) else []
