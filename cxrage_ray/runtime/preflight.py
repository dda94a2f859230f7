"""Checks that `cxrage score` makes before anything heavy (torch, Ray) is imported or started.

In:  the parsed settings of a job (plain values: paths, numbers, the device asked for).
Out: nothing, or an `InputError` / `WeightsError` whose message says what to do. Nothing is written.

Every mistake a user can make on the command line that can be seen without Ray is caught here, so it is
answered in about a second with `cxrage: error: ...` and exit 2 instead of after Ray's start-up, and no
OUTPUT folder is left behind. The manifest itself is built here too (`build_manifest` raises `InputError`
for a missing INPUT, an empty folder or a manifest without its path column); the job reuses it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from cxrage_ray.errors import InputError
from cxrage_ray.storage.files import is_local


@dataclass(frozen=True)
class Limits:
    """Numeric options and their smallest allowed value (the option's name as the user typed it)."""

    batch_size: int = 0
    part_rows: int = 10_000
    predict_actors: int = 1
    num_cpus: int | None = None
    no_progress_timeout_s: float = 600.0
    commit_every_s: float = 30.0


def check_limits(limits: Limits) -> None:
    """Numbers that would only fail (or hang) once Ray runs."""
    if limits.batch_size < 0:
        raise InputError(f"--batch-size {limits.batch_size}: give 0 (automatic) or a positive number of views")
    if limits.part_rows < 1:
        raise InputError(f"--part-rows {limits.part_rows}: give a positive number of rows per Parquet part")
    if limits.predict_actors < 1:
        raise InputError(f"--predict-actors {limits.predict_actors}: give at least 1")
    if limits.num_cpus is not None and limits.num_cpus < 1:
        raise InputError(f"--num-cpus {limits.num_cpus}: give at least 1")
    if not limits.no_progress_timeout_s > 0:
        raise InputError(f"--no-progress-timeout {limits.no_progress_timeout_s}: give a positive number of seconds")
    if not limits.commit_every_s > 0:
        raise InputError(f"--commit-every {limits.commit_every_s}: give a positive number of seconds")


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def check_output_folder(output: str, *, option: str = "OUTPUT") -> None:
    """A local OUTPUT must be a folder or not exist yet, below a folder this user can write to."""
    if not is_local(output):
        return  # object stores have no folders to be wrong about; credentials are checked on first write
    path = _local_path(output)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {output} is an existing file: give a folder (it is created if missing)")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {output}: {parent} is a file, so the folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {output}: no permission to write in {parent}")


def check_output_file(path_uri: str, *, option: str) -> None:
    """A local file option (--csv, --rotation-list...) must not name a folder; its folder must be creatable."""
    if not is_local(path_uri):
        return
    path = _local_path(path_uri)
    if path.is_dir():
        raise InputError(f"{option} {path_uri} is a folder: give a file name")
    check_output_folder(str(path.parent), option=option)


def check_input_file(path_uri: str | None, *, option: str) -> None:
    """A local file the job reads (--rotation-list, --weights) must exist."""
    if path_uri is None or not is_local(path_uri):
        return
    if not _local_path(path_uri).is_file():
        raise InputError(f"{option} {path_uri}: no such file")


def cuda_devices() -> int:
    """CUDA devices this machine's driver reports, asked of libcuda directly (milliseconds, no torch import);
    0 when there is no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def check_device(device: str, ray_address: str | None) -> None:
    """`--device cuda` on an embedded local Ray needs a GPU on this machine (a cluster is asked once it is joined)."""
    if device == "cuda" and not ray_address and cuda_devices() == 0:
        raise InputError("--device cuda, but this machine has no CUDA GPU (no NVIDIA driver or no device): "
                         "use --device cpu (or auto), or --ray-address to join a cluster with GPUs")
