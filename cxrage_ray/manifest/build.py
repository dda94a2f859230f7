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

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import CONTRACT_NAMES, PROBLEM_COLUMN
from cxrage_ray.errors import InputError, ReadError
from cxrage_ray.manifest.stream import ManifestSource, manifest_batches, scan_manifest
from cxrage_ray.pacs.dicomweb import is_dicomweb, query_manifest
from cxrage_ray.storage.files import exists, filesystem_for, list_files, parent_uri, read_bytes, write_bytes

log = logging.getLogger(__name__)

#: Extensions kept when listing a folder (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".dic"})
MANIFEST_EXTENSIONS = (".csv", ".parquet")
RESERVED_COLUMNS = (*(c for c in CONTRACT_NAMES if c not in ("image_id", "uri")), PROBLEM_COLUMN)
#: DICOM files are often named by UID ("1.2.840.113619.2.55"): an all-digit suffix is not an extension.
_NUMERIC_SUFFIX = re.compile(r"^\.\d+$")
#: Rows per row group of a Parquet manifest `write_manifest` writes: the unit `cxrage score` streams.
MANIFEST_ROW_GROUP = 65_536


def open_manifest(input: str, storage: StorageConfig, uri_column: str = "uri") -> ManifestSource:
    """INPUT opened for streaming (`cxrage_ray.manifest.stream`): checked, but a Parquet manifest's rows not read.

    A Parquet manifest is checked from its footer (columns, row count) and its rows stream from the file later;
    a folder/prefix or DICOMweb query is listed once and a CSV parsed once, and their rows are held as one frame.

    Raises:
        InputError: as `build_manifest`.
    """
    if is_dicomweb(input):  # a QIDO-RS query: listed once, page by page
        return _from_frame(input, storage, query_manifest(input, storage), base=None)
    if input.lower().endswith(".parquet"):
        return _open_parquet(input, storage, uri_column)
    if input.lower().endswith(MANIFEST_EXTENSIONS):
        return _from_csv(input, storage, uri_column)
    return _from_folder(input, storage)


def build_manifest(input: str, storage: StorageConfig, uri_column: str = "uri") -> pd.DataFrame:
    """Rows to score for INPUT (see the module docstring), all at once: `open_manifest`, then every streamed batch.

    Args:
        input: folder/prefix, or a ``.csv`` / ``.parquet`` manifest; local path or fsspec URL.
        storage: how to reach remote storage.
        uri_column: the manifest column with each image's path/URL (ignored for folders).

    Raises:
        InputError: INPUT missing; a folder without images; a manifest that cannot be read or parsed, has no
            rows, lacks ``uri``, or has reserved column names. Blank uris/image_ids and duplicate image_ids
            are not refused: those rows carry their problem in `PROBLEM_COLUMN`.
    """
    source = open_manifest(input, storage, uri_column)
    scan = scan_manifest(source)
    return pd.concat(list(manifest_batches(source, scan)), ignore_index=True)


def write_manifest(df: pd.DataFrame, out_url: str, storage: StorageConfig) -> None:
    """Write a manifest for reuse as INPUT: Parquet (or CSV when `out_url` ends in .csv), without ``row_id``.

    ``row_id`` and `PROBLEM_COLUMN` are dropped because they are reserved: the manifest read back gets fresh
    row_ids in the same order, and its problems are found again. Parquet row groups of `MANIFEST_ROW_GROUP` rows
    let `cxrage score` stream it a group at a time.
    """
    table_df = df.drop(columns=["row_id", PROBLEM_COLUMN], errors="ignore")
    if out_url.lower().endswith(".csv"):
        data = table_df.to_csv(index=False).encode()
    else:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(table_df, preserve_index=False), sink, compression="zstd",
                       row_group_size=MANIFEST_ROW_GROUP)
        data = sink.getvalue()
    write_bytes(out_url, data, storage)


def _from_frame(input: str, storage: StorageConfig, frame: pd.DataFrame, base: str | None) -> ManifestSource:
    """A source over rows already in memory (a listing, a parsed CSV)."""
    frame = frame.reset_index(drop=True)
    extras = frame.drop(columns=[c for c in ("uri", "image_id") if c in frame.columns])
    schema = pa.Schema.from_pandas(extras, preserve_index=False) if len(extras.columns) else pa.schema([])
    return ManifestSource(input=input, storage=storage, uri_column="uri", base=base, num_rows=len(frame),
                          extras=tuple(schema), has_image_id="image_id" in frame.columns, frame=frame)


# ---------------------------------------------------------------- folder / prefix


def is_image_name(relative_path: str) -> bool:
    """Keep image-like and extension-less files; skip hidden files/folders and anything else."""
    parts = relative_path.split("/")
    if any(part.startswith(".") for part in parts):
        return False
    suffix = posixpath.splitext(parts[-1])[1].lower()
    return suffix in IMAGE_EXTENSIONS or suffix == "" or bool(_NUMERIC_SUFFIX.match(suffix))


def _from_folder(input: str, storage: StorageConfig) -> ManifestSource:
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
    return _from_frame(input, storage, pd.DataFrame({"image_id": [r for r, _ in rows], "uri": [u for _, u in rows]}),
                       base=None)


def _folder_prefix(input: str) -> str:
    """INPUT as `list_files` spells its results, ending in '/': URLs as given, local paths made absolute."""
    if "://" in input:
        return input.rstrip("/") + "/"
    return os.path.abspath(input).rstrip("/") + "/"


# ---------------------------------------------------------------- manifest file


def _open_parquet(input: str, storage: StorageConfig, uri_column: str) -> ManifestSource:
    """A Parquet manifest checked from its footer alone: its rows stream later (`cxrage_ray.manifest.stream`)."""
    _check_readable(input, storage)
    try:
        fs, path = filesystem_for(input, storage)
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except Exception as e:  # noqa: BLE001 - any parser failure is the user's file, not our bug
        raise InputError(f"cannot parse manifest {input}: {type(e).__name__}: {e}") from e
    names = _checked_columns(input, schema.names, uri_column)
    if metadata.num_rows == 0:
        raise InputError(f"manifest {input} has no rows")
    extras = tuple(schema.field(n) for n in names if n not in (uri_column, "image_id"))
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return ManifestSource(input=input, storage=storage, uri_column=uri_column, base=parent_uri(input),
                          num_rows=metadata.num_rows, extras=_plain_fields(extras), has_image_id="image_id" in names,
                          parquet_rows=groups)


def _from_csv(input: str, storage: StorageConfig, uri_column: str) -> ManifestSource:
    """A CSV manifest, parsed once by pandas (its own type inference over the whole file) and held as a frame;
    a manifest of millions of rows streams from Parquet instead (`cxrage manifest big.csv big.parquet`)."""
    df = _parse(_check_readable(input, storage, read=True), input, uri_column)
    _checked_columns(input, list(df.columns), uri_column)
    if uri_column != "uri":
        df = df.rename(columns={uri_column: "uri"})
    if df.empty:
        raise InputError(f"manifest {input} has no rows")
    return _from_frame(input, storage, df, base=parent_uri(input))


def _check_readable(input: str, storage: StorageConfig, read: bool = False) -> bytes:
    """INPUT's bytes (`read`), or b"" once it is known to exist and not be empty; `InputError` otherwise."""
    try:
        if read:
            return read_bytes(input, storage)
        if not exists(input, storage):
            raise ReadError(f"not found: {input}")
        fs, path = filesystem_for(input, storage)
        if fs.size(path) == 0:
            raise ReadError(f"{input} is empty")
        return b""
    except ReadError as e:
        if str(e).startswith("not found"):
            raise InputError(f"input not found: {input}") from e
        if "empty" in str(e):
            raise InputError(f"manifest {input} is empty (0 bytes)") from e
        raise InputError(f"cannot read manifest {input}: {e}") from e


def _checked_columns(input: str, columns: list, uri_column: str) -> list:
    """The manifest's column names, refused when the path column is missing or a name is reserved."""
    if uri_column not in columns:
        names = ", ".join(map(str, columns[:12])) + (", ..." if len(columns) > 12 else "")
        hint = "" if uri_column != "uri" else "; name the column that holds the paths with --uri-column NAME"
        raise InputError(f"manifest {input} has no `{uri_column}` column (columns: {names or 'none'}){hint}")
    if uri_column != "uri" and "uri" in columns:
        raise InputError(f"manifest {input} has both `{uri_column}` and `uri` columns: rename `uri` or drop "
                         "--uri-column")
    reserved = [c for c in RESERVED_COLUMNS if c in columns]
    if reserved:
        raise InputError(
            f"manifest {input} has column(s) reserved for the output: {', '.join(reserved)}; rename them"
        )
    return list(columns)


def _plain_fields(fields: tuple[pa.Field, ...]) -> tuple[pa.Field, ...]:
    """Fields as the streamed rows carry them (a dictionary-encoded column reads back as its values)."""
    return tuple(pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in fields)


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
