"""Tolerant readers of DICOM element values, shared by every DICOM module.

In:  a raw element value as pydicom returns it (str, int, `MultiValue`, `DSfloat`, None, or garbage).
Out: a plain Python value (int, float, str, date) or the caller's default / None — never an exception: real
     archives hold values like `Rows = ''` or `StudyDate = '2019-01-01'`, and one bad tag must not cost a film.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any


def int_value(value: Any, default: int) -> int:
    """`int(value)`, or `default` when the value is absent or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def float_value(value: Any) -> float | None:
    """`float(value)`, or None when the value is absent, empty or not a number."""
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def text_value(value: Any, upper: bool = False) -> str | None:
    """The value as stripped text (multi-values joined by a backslash, as DICOM writes them); None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v).strip() for v in value)
    else:
        text = str(value).strip()
    if not text:
        return None
    return text.upper() if upper else text


def date_value(value: Any) -> dt.date | None:
    """A DA value (`YYYYMMDD`, also with dots or dashes) as a date; None when absent or not a real date."""
    text = str(value or "").strip().replace(".", "").replace("-", "")
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def short_text(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
