"""Rotation lists (`--rotation-list`): a file of film names -> the `RotationList` an `OrientConfig` carries.

In:  the list's path, or its text: the original's format (one file name per line: rotate it 90° clockwise) or
     `file,degrees` (clockwise degrees to APPLY, mogrify's meaning), optionally with a header line.
Out: a `cxrage_ray.config.RotationList` {file name: 0/90/180/270}, which answers `lookup(image_id, uri)` in O(1);
     and `legacy_orient_repr`, the orientation's identity as job.json recorded it before `OrientConfig.job_key`.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from cxrage_ray.config import OrientConfig, RotationList, rotation_list_key
from cxrage_ray.errors import InputError

_HEADER_NAMES = {"file", "filename", "file_name", "image", "image_id", "uri", "path", "name"}
_HEADER_DEGREES = {"degrees", "degree", "rotation", "rotate", "angle", "clockwise"}
#: The fields `repr(OrientConfig)` showed, in order, before the job key (`non_chest_likeness` was repr=False).
_LEGACY_REPR_FIELDS = ("mode", "rotation_list", "skip_flagged", "uncertain_threshold", "lateral_threshold",
                       "use_view_model")


def load_rotation_list(path_or_text: str | os.PathLike[str]) -> RotationList:
    """Parse a rotation list into {file name: clockwise degrees to apply (0/90/180/270)}.

    Two formats, optionally with a header line (`file` or `file,degrees`), blank lines and `#` comments ignored:
    - the original's: one file name per line -> rotate 90° clockwise (its `mogrify -rotate 90`);
    - `file,degrees`: any multiple of 90, negative allowed (-90 == 270).
    Names are reduced to their basename; a name listed twice with different degrees is an error.

    Args:
        path_or_text: a path (`Path`, or a `str` without a newline), or the list's text itself (a `str` holding
            at least one newline).

    Raises:
        InputError: the file is missing, or a line is malformed (the message names the line number).
    """
    text, origin = _read(path_or_text)
    table: dict[str, int] = {}
    seen_content = False
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in fields]
        if not fields or not any(fields) or fields[0].startswith("#"):
            continue
        if not seen_content:
            seen_content = True
            if _is_header(fields):
                continue
        key, degrees = _parse_line(fields, origin, number)
        if table.get(key, degrees) != degrees:
            raise InputError(f"{origin} line {number}: {key!r} is listed again with a different rotation")
        table[key] = degrees
    return RotationList(table)


def _read(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    """(the list's text, what to call it in messages)."""
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return path_or_text, "rotation list"
    path = Path(path_or_text)
    try:
        return path.read_text(encoding="utf-8-sig"), str(path)
    except OSError as exc:
        raise InputError(f"rotation list {path} cannot be read: {exc}") from exc


def _is_header(fields: list[str]) -> bool:
    return fields[0].lower() in _HEADER_NAMES and (len(fields) == 1 or fields[1].lower() in _HEADER_DEGREES)


def _parse_line(fields: list[str], origin: str, number: int) -> tuple[str, int]:
    """One content line -> (file key, clockwise degrees to apply)."""
    if len(fields) > 2:
        raise InputError(f"{origin} line {number}: expected 'file' or 'file,degrees', got {len(fields)} fields")
    key = rotation_list_key(fields[0])
    if not key:
        raise InputError(f"{origin} line {number}: empty file name")
    degrees = 90 if len(fields) == 1 or fields[1] == "" else _parse_degrees(fields[1], origin, number)
    return key, degrees


def _parse_degrees(text: str, origin: str, number: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{origin} line {number}: degrees must be a number, got {text!r}") from None
    if not value.is_integer() or int(value) % 90 != 0:
        raise InputError(f"{origin} line {number}: degrees must be a multiple of 90 (0/90/180/270), got {text!r}")
    return int(value) % 360


def legacy_orient_repr(config: OrientConfig | None) -> str:
    """`repr(config)` as it read before `OrientConfig.job_key`: the rotation list as the dict it was, in its own
    order, and `non_chest_likeness` left out. Older outputs' job.json holds this string, so they still resume."""
    if config is None:
        return repr(None)
    values = {name: getattr(config, name) for name in _LEGACY_REPR_FIELDS}
    if values["rotation_list"] is not None:
        values["rotation_list"] = dict(values["rotation_list"])
    return "OrientConfig(" + ", ".join(f"{name}={value!r}" for name, value in values.items()) + ")"
