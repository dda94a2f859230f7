"""Scored rows that OUTPUT refused, kept on the local disk until a rerun can write them.

In:  a Parquet part (bytes) the writer could not commit to OUTPUT, and the job record it belongs to.
Out: `<spill root>/<key of OUTPUT>/part-*.parquet` + `job.json`; on the next run of the same job the parts are
     committed to OUTPUT under their own names (`restore`) and deleted here, so no scored row is lost and none
     is counted twice (a part that did reach OUTPUT after all is rewritten whole under the same name).

The spill root is `$CXRAGE_SPILL_DIR`, else `$XDG_CACHE_HOME/cxrage-ray/spill` (`~/.cache/...`); one folder per
OUTPUT (sha256 of its URI), so two jobs never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrage_ray.storage.atomic import write_atomic

log = logging.getLogger(__name__)


def default_spill_root(env: Mapping[str, str]) -> Path:
    """Where spilled parts go on this machine (see module docstring)."""
    if env.get("CXRAGE_SPILL_DIR"):
        return Path(env["CXRAGE_SPILL_DIR"])
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "cxrage-ray" / "spill"


@dataclass(frozen=True)
class Spill:
    """The spill folder of one OUTPUT, for one job (`job`: the defining keys of its job record)."""

    root: Path
    output: str
    job: Mapping[str, Any]

    @property
    def folder(self) -> Path:
        return self.root / hashlib.sha256(self.output.rstrip("/").encode()).hexdigest()[:16]

    def keep(self, name: str, data: bytes) -> Path:
        """Store one part that could not be committed; returns where it is.

        Both files are written whole or not at all: a half-written part would be restored into OUTPUT as a
        broken part, and a half-written job.json would make `parts` fail to read the spill at all.
        """
        record = json.dumps({"output": self.output, "job": dict(self.job)}, sort_keys=True)
        write_atomic(self.folder / "job.json", record.encode("utf-8"))
        write_atomic(self.folder / name, data)
        return self.folder / name

    def parts(self) -> list[Path]:
        """Spilled parts of this job (none when the folder holds another job's rows)."""
        if not (self.folder / "job.json").exists():
            return []
        record = json.loads((self.folder / "job.json").read_text())
        if record.get("job") != dict(self.job):
            log.warning("%s holds rows of a different job for this OUTPUT; they are left there", self.folder)
            return []
        return sorted(self.folder.glob("part-*.parquet"))

    def restore(self, commit: Callable[[str, bytes], None]) -> int:
        """Commit every spilled part with `commit(name, data)` (raises when OUTPUT still refuses), deleting each
        local copy once committed; returns the number of parts restored."""
        restored = 0
        for part in self.parts():
            commit(part.name, part.read_bytes())
            part.unlink()
            restored += 1
        if restored and not any(self.folder.glob("part-*.parquet")):
            (self.folder / "job.json").unlink(missing_ok=True)
            self.folder.rmdir()
        return restored
