"""Manifest: INPUT (a folder/prefix, or a CSV/Parquet manifest, local or any fsspec URL) -> one row per image.

In:  INPUT and a `StorageConfig`.
     - A folder/prefix is listed once, recursively. Image-like files are kept (.png .jpg .jpeg .tif .tiff
       .dcm .dicom .dic, and extension-less files such as DICOM UIDs); hidden files/folders and everything
       else (.csv, .parquet, .json, .md, .txt, ...) are skipped.
     - A ``.csv`` / ``.parquet`` manifest needs a ``uri`` column, or the column named by `uri_column`
       (``--uri-column file``), which becomes ``uri``; relative paths are resolved against the manifest's
       folder; ``image_id`` is optional; every other column is carried through unchanged.
     - A DICOMweb query (``dicomweb+https://host/prefix/?Modality=CR,DX&…``) is paged through once by QIDO-RS
       (cxrage_ray.pacs.dicomweb); its rows carry ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``.
Out: a pandas DataFrame with ``row_id`` (int64, 0..n-1 in manifest order), ``image_id`` (string),
     ``uri`` (string, absolute path or URL), then the manifest's extra columns, then ``manifest_problem``
     (`PROBLEM_COLUMN`, string, null for a good row).

Every manifest row yields a row. A row that names no readable image (empty ``uri`` or ``image_id``, or an
``image_id`` an earlier row already has) carries its problem in ``manifest_problem`` (``row 17: empty uri``,
``row 5: duplicate image_id 'x' (also row 3)``; rows are ``row_id``s); the prepare stage turns it into a
``ManifestError`` row without fetching anything. The first row with an image_id keeps it; later ones are the
error rows, so the ok rows' image_ids are unique. A uri of an unsupported scheme (``gopher://``) is not
judged here: its fetch fails as a ``ReadError`` (the storage layer is the one place that knows schemes).

Only a manifest that cannot be used at all raises `InputError` (INPUT missing, unreadable or unparseable, no
rows, no path column, reserved column names), with a message that says what is wrong.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.contract import PROBLEM_COLUMN
from cxrage_ray.pacs.dicomweb import is_dicomweb, query_manifest, with_uid_columns
from cxrage_ray.errors import InputError, ReadError
from cxrage_ray.contract import CONTRACT_NAMES
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import (
    exists,
    is_local,
    join_uri,
    list_files,
    parent_uri,
    read_bytes,
    write_bytes,
)
from cxrage_ray.storage.uris import protocol_of

log = logging.getLogger(__name__)

#: Extensions kept when listing a folder (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".dic"})
MANIFEST_EXTENSIONS = (".csv", ".parquet")
RESERVED_COLUMNS = (*(c for c in CONTRACT_NAMES if c not in ("image_id", "uri")), PROBLEM_COLUMN)
#: DICOM files are often named by UID ("1.2.840.113619.2.55"): an all-digit suffix is not an extension.
_NUMERIC_SUFFIX = re.compile(r"^\.\d+$")


def build_manifest(input: str, storage: StorageConfig, uri_column: str = "uri") -> pd.DataFrame:
    """Rows to score for INPUT (see the module docstring).

    Args:
        input: folder/prefix, or a ``.csv`` / ``.parquet`` manifest; local path or fsspec URL.
        storage: how to reach remote storage.
        uri_column: the manifest column with each image's path/URL (ignored for folders).

    Raises:
        InputError: INPUT missing; a folder without images; a manifest that cannot be read or parsed, has no
            rows, lacks ``uri``, or has reserved column names. Blank uris/image_ids and duplicate image_ids
            are not refused: those rows carry their problem in `PROBLEM_COLUMN`.
    """
    if is_dicomweb(input):  # a QIDO-RS query: listed once, page by page
        return _finish(query_manifest(input, storage))
    if input.lower().endswith(MANIFEST_EXTENSIONS):
        return with_uid_columns(_from_manifest_file(input, storage, uri_column))
    return _from_folder(input, storage)


def write_manifest(df: pd.DataFrame, out_url: str, storage: StorageConfig) -> None:
    """Write a manifest for reuse as INPUT: Parquet (or CSV when `out_url` ends in .csv), without ``row_id``.

    ``row_id`` and `PROBLEM_COLUMN` are dropped because they are reserved: the manifest read back gets fresh
    row_ids in the same order, and its problems are found again.
    """
    table_df = df.drop(columns=["row_id", PROBLEM_COLUMN], errors="ignore")
    if out_url.lower().endswith(".csv"):
        data = table_df.to_csv(index=False).encode()
    else:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(table_df, preserve_index=False), sink, compression="zstd")
        data = sink.getvalue()
    write_bytes(out_url, data, storage)


# ---------------------------------------------------------------- folder / prefix


def is_image_name(relative_path: str) -> bool:
    """Keep image-like and extension-less files; skip hidden files/folders and anything else."""
    parts = relative_path.split("/")
    if any(part.startswith(".") for part in parts):
        return False
    suffix = posixpath.splitext(parts[-1])[1].lower()
    return suffix in IMAGE_EXTENSIONS or suffix == "" or bool(_NUMERIC_SUFFIX.match(suffix))


def _from_folder(input: str, storage: StorageConfig) -> pd.DataFrame:
    files = list_files(input, storage)
    if not files:
        if not exists(input, storage):
            raise InputError(f"input not found: {input}")
        raise InputError(f"no files under {input}: give a folder/prefix with images or a .csv/.parquet manifest")
    base = _folder_prefix(input)
    if not all(f.startswith(base) for f in files):  # INPUT named a single file
        raise InputError(
            f"INPUT {input} is a file: give a folder/prefix of images or a manifest ending in .csv/.parquet"
        )
    rows = [(f[len(base):], f) for f in files]
    rows = [(rel, uri) for rel, uri in rows if is_image_name(rel)]
    if not rows:
        raise InputError(
            f"no images in {input}: {len(files)} file(s) found, none with an image extension "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or without an extension"
        )
    return _finish(pd.DataFrame({"image_id": [r for r, _ in rows], "uri": [u for _, u in rows]}))


def _folder_prefix(input: str) -> str:
    """INPUT as `list_files` spells its results, ending in '/': URLs as given, local paths made absolute."""
    if "://" in input:
        return input.rstrip("/") + "/"
    return os.path.abspath(input).rstrip("/") + "/"


# ---------------------------------------------------------------- manifest file


def _from_manifest_file(input: str, storage: StorageConfig, uri_column: str = "uri") -> pd.DataFrame:
    try:
        data = read_bytes(input, storage)
    except ReadError as e:
        if str(e).startswith("not found"):
            raise InputError(f"input not found: {input}") from e
        if "empty" in str(e):
            raise InputError(f"manifest {input} is empty (0 bytes)") from e
        raise InputError(f"cannot read manifest {input}: {e}") from e
    df = _parse(data, input, uri_column)
    if uri_column not in df.columns:
        columns = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
        hint = "" if uri_column != "uri" else "; name the column that holds the paths with --uri-column NAME"
        raise InputError(f"manifest {input} has no `{uri_column}` column (columns: {columns or 'none'}){hint}")
    if uri_column != "uri":
        if "uri" in df.columns:
            raise InputError(f"manifest {input} has both `{uri_column}` and `uri` columns: rename `uri` or drop "
                             "--uri-column")
        df = df.rename(columns={uri_column: "uri"})
    reserved = [c for c in RESERVED_COLUMNS if c in df.columns]
    if reserved:
        raise InputError(
            f"manifest {input} has column(s) reserved for the output: {', '.join(reserved)}; rename them"
        )
    if df.empty:
        raise InputError(f"manifest {input} has no rows")
    base = parent_uri(input)
    blank_uri = _blank(df["uri"])
    uris = [None if blank else _resolve(str(u).strip(), base) for u, blank in zip(df["uri"], blank_uri)]
    problems: list[str | None] = ["empty uri" if blank else None for blank in blank_uri]
    if "image_id" in df.columns:  # a blank one is marked by _finish
        image_ids = [None if blank else str(v) for v, blank in zip(df["image_id"], _blank(df["image_id"]))]
    else:
        image_ids = [None if u is None else _default_image_id(u, base) for u in uris]
    extra = df.drop(columns=[c for c in ("uri", "image_id") if c in df.columns]).reset_index(drop=True)
    out = pd.DataFrame({"image_id": pd.array(image_ids, dtype="string"), "uri": pd.array(uris, dtype="string")})
    return _finish(pd.concat([out, extra], axis=1), problems)


def _blank(column: pd.Series) -> np.ndarray:
    """Which cells of a manifest column are missing: null/NaN, or only whitespace (bool per row)."""
    text = column.astype("string").str.strip()
    return (text.isna() | (text == "")).fillna(True).to_numpy(dtype=bool)


def _parse(data: bytes, input: str, uri_column: str = "uri") -> pd.DataFrame:
    try:
        if input.lower().endswith(".parquet"):
            return pq.read_table(io.BytesIO(data)).to_pandas()
        # uri/image_id stay text ("00012" is an id, not the number 12); other columns are inferred as usual
        return pd.read_csv(io.BytesIO(data), dtype={uri_column: str, "image_id": str}, keep_default_na=True)
    except pd.errors.EmptyDataError as e:
        raise InputError(f"manifest {input} is empty") from e
    except Exception as e:  # noqa: BLE001 - any parser failure is the user's file, not our bug
        raise InputError(f"cannot parse manifest {input}: {type(e).__name__}: {e}") from e


def _resolve(uri: str, base: str) -> str:
    """Absolute URIs and absolute local paths stay; relative ones are joined onto the manifest's folder."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return join_uri(base, uri)


def _default_image_id(uri: str, base: str) -> str:
    """`uri`'s path relative to the manifest's folder when under it, else the uri itself."""
    prefix = base.rstrip("/") + "/"
    if protocol_of(uri) == protocol_of(base) and is_local(uri) == is_local(base):
        candidate = uri
        if is_local(uri) and "://" in uri:  # file:///x -> /x to compare with a plain local base
            candidate = "/" + uri.split("://", 1)[1].lstrip("/")
        if candidate.startswith(prefix):
            return candidate[len(prefix):]
    return uri


def _finish(df: pd.DataFrame, problems: list[str | None] | None = None) -> pd.DataFrame:
    """Type the key columns, prepend row_id, and append `PROBLEM_COLUMN`: `problems` (one per row, None when
    fine), else ``empty image_id``, else ``duplicate image_id`` for a repeat of an earlier row's image_id;
    each prefixed by the row. Logs a warning naming the first such row."""
    df = df.reset_index(drop=True)
    df["image_id"] = df["image_id"].astype("string")
    found = list(problems) if problems is not None else [None] * len(df)
    blank_id = _blank(df["image_id"])
    for row in np.flatnonzero(blank_id):
        found[row] = found[row] or "empty image_id"
    # only rows that name an image claim an id; vectorised, as archive manifests run to millions of rows
    claiming = df["image_id"][~(pd.Series(found, dtype=object).notna().to_numpy() | blank_id)]
    repeat = claiming.duplicated(keep="first")
    first_row = pd.Series(claiming[~repeat].index, index=claiming[~repeat].to_numpy())
    for row, image_id in claiming[repeat].items():
        found[row] = f"duplicate image_id {image_id!r} (also row {first_row[image_id]})"
    df["uri"] = df["uri"].astype("string")
    df.insert(0, "row_id", pd.RangeIndex(len(df)).astype("int64"))
    df[PROBLEM_COLUMN] = pd.array([None if p is None else f"row {row}: {p}" for row, p in enumerate(found)],
                                  dtype="string")
    marked = df[PROBLEM_COLUMN].dropna()
    if len(marked):  # said up front: these rows will be ManifestError rows, not scores
        log.warning("%d manifest row(s) name no readable image and become ManifestError rows (%s%s)",
                    len(marked), marked.iloc[0], ", ..." if len(marked) > 1 else "")
    return df
