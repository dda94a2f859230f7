"""Reading a scored OUTPUT folder (local or fsspec URL) for the report.

In:  the OUTPUT folder `cxrage score` wrote: Parquet files anywhere under it (hidden and `_`-prefixed scratch
     folders skipped) and, when present, OUTPUT/_cxrage/summary.json.
Out: `read_scored(...)`: one pandas row per scored input, holding only the columns the report uses (plus named
     extra columns such as follow-up time and event); `read_summary(...)`: summary.json as a dict, or None.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import CxrAgeError, InputError
from cxrage_ray.report.cohort import AGE_COLUMNS, SEX_COLUMNS, VIEW_COLUMNS
from cxrage_ray.storage.files import is_local, list_files, read_bytes
from cxrage_ray.write.parts import read_json

#: Columns the report reads besides the cohort variables and time/event (reading only these keeps a
#: million-row output at a few hundred MB of memory).
BASE_COLUMNS = ("image_id", "uri", "status", "error", "cxr_age", "qc", "weights_sha256", "weights_name",
                "preprocess", "tta")


def _is_scratch(relative_parts: Iterable[str]) -> bool:
    """Temp parts live in `_tmp/`, `.staging/`, ...: any hidden or `_`-prefixed path component."""
    return any(part.startswith(("_", ".")) for part in relative_parts)


def find_parquet(output: str | Path, storage: StorageConfig | None = None) -> list[str]:
    """Every `*.parquet` file under `output` (local folder or URL), skipping hidden and `_`-prefixed
    folders/files (temp parts).

    Raises:
        InputError: `output` is not a folder or holds no Parquet.
    """
    output = str(output)
    if is_local(output):
        root = Path(output.removeprefix("file://"))
        if not root.is_dir():
            raise InputError(f"{output} is not a folder: pass the OUTPUT folder that `cxrage score` wrote")
        files = [str(p) for p in sorted(root.rglob("*.parquet"))
                 if p.is_file() and not _is_scratch(p.relative_to(root).parts)]
    else:
        prefix = output.rstrip("/") + "/"
        files = [uri for uri in list_files(output, storage or StorageConfig())
                 if uri.endswith(".parquet") and not _is_scratch(uri.removeprefix(prefix).split("/"))]
    if not files:
        raise InputError(f"no Parquet files under {output}: run `cxrage score INPUT {output}` first")
    return files


def _parquet_source(uri: str, storage: StorageConfig | None) -> str | BinaryIO:
    """What pyarrow reads: the path itself for local files (read lazily), the object's bytes otherwise."""
    return uri if is_local(uri) else io.BytesIO(read_bytes(uri, storage or StorageConfig()))


def read_scored(output: str | Path, extra_columns: Iterable[str] = (),
                storage: StorageConfig | None = None) -> pd.DataFrame:
    """The scored rows of an OUTPUT folder: the columns the report uses plus `extra_columns`.

    Args:
        output: OUTPUT folder, local or fsspec URL (`s3://bucket/job`).
        extra_columns: further columns to read (time/event); a name absent from every file is an InputError.
        storage: credentials/endpoint for a remote OUTPUT.

    Returns:
        One row per scored input; absent optional columns are simply not in the frame.
    """
    files = find_parquet(output, storage)
    extra = [c for c in extra_columns if c]
    wanted = list(dict.fromkeys([*BASE_COLUMNS, *AGE_COLUMNS, *SEX_COLUMNS, *VIEW_COLUMNS, *extra]))
    tables, available = [], set()
    for uri in files:
        source = _parquet_source(uri, storage)
        names = pq.read_schema(source).names
        available.update(names)
        tables.append(pq.read_table(source, columns=[c for c in wanted if c in names]))
    missing = [c for c in extra if c not in available]
    if missing:
        raise InputError(
            f"column(s) {missing} not in the output under {output}; available: {sorted(available)}. "
            "Name manifest columns that `cxrage score` carried through (--time-col/--event-col)"
        )
    if "status" not in available:
        raise InputError(f"the Parquet under {output} has no `status` column: is it a `cxrage score` output?")
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def read_summary(output: str | Path, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """OUTPUT/_cxrage/summary.json (or an older output's OUTPUT/summary.json) as a dict, or None when absent
    or unreadable (the report does not need it)."""
    try:
        return read_json(str(output), "summary.json", storage or StorageConfig())
    except (OSError, ValueError, CxrAgeError):  # absent (ReadError), unreadable or not JSON
        return None
