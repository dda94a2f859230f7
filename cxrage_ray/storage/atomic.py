"""Local files that appear whole or not at all: the one atomic-write helper of the package.

In:  a local target path, and either the bytes to write (`write_atomic`) or a writer that fills a temporary
     path itself (`atomic_path`, for libraries that want a file name: torch.save, a download).
Out: the target, replaced in one rename once the data is complete and fsync'd; on failure no target change
     and no temporary file left behind.

Why one helper: the rules are easy to get subtly wrong at each site. The temporary file lives in the target's
folder (a rename across file systems is not atomic), its name neither ends like the target nor matches
``part-*`` (a reader globbing ``*.parquet`` or ``part-*`` never sees a half-written file), and the result has
the mode `open()` would give it (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Names of temporary files start so: hidden, and unlike any target's name.
TEMP_PREFIX = ".tmp-"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` whole or not at all (parent folders created).

    In:  a local path and the complete contents.
    Out: `path` holds exactly `data` (mode 0666 minus the umask); on any error it is as it was.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to `path`, renamed over `path` when the block ends without an exception.

    In:  the local target path (parent folders are created).
    Out: yields an existing empty temporary file (mode 0666 minus the umask) for the block to (re)write; on
         success it is fsync'd and renamed over `path`; on an exception it is removed and the exception re-raised.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=f"-{target.name}.tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp
        move_into_place(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def move_into_place(finished: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a complete file over `path` after flushing it to disk (same folder: one atomic rename).

    In:  `finished`, a file already holding all its data (e.g. a verified download's ``.part``).
    Out: `path` is that file; without the fsync a crash soon after could leave `path` present but empty.
    """
    fd = os.open(finished, os.O_RDONLY)  # read-only: fsync needs no write access (a 0444 file under umask 0222)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(finished, path)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (brief, but the only portable way)
    os.umask(mask)
    return mask
