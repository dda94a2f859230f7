"""Manifest as a stream: an opened INPUT (`ManifestSource`) -> batches of manifest rows, in manifest order.

In:  a `ManifestSource` (`cxrage_ray.manifest.build.open_manifest`): a Parquet manifest read from its file row group
     by row group, or rows listed/parsed once (folder, DICOMweb query, CSV) held as one pandas frame.
Out: - `scan_manifest`: one pass over the rows that keeps only 8 bytes per row (a 64-bit hash of each row's
       image_id) and returns a `ManifestScan`: the row count, the job fingerprint (summed batch by batch), and the
       duplicate image_ids as two small arrays (which row, and the earlier row it repeats).
     - `manifest_batches` / `unit_batches`: pandas batches of the rows `build_manifest` describes (``row_id``,
       ``image_id``, ``uri``, the manifest's own columns, `PROBLEM_COLUMN`), optionally without the rows already
       scored, each batch built from the raw rows alone plus the scan's duplicate arrays.

Why a scan first: a duplicate is a row whose image_id an *earlier* row claimed, and the job's fingerprint must be
known (and compared with OUTPUT's job record) before the first part is written. Both need every row once, but not
all at once: the scan reads the manifest batch by batch and holds one uint64 per row (the image_id's hash) and one
flag byte (10M rows: 90 MB, plus a sorted copy of the hashes while duplicates are found), never the rows
themselves. Two different image_ids whose hashes collide would be reported as a duplicate: with 64-bit hashes that
chance is about n²/2⁶⁵ (3·10⁻⁶ for 10M rows). The fingerprint is a sum of per-row hashes, so batches add up to
the same number however they are cut; `legacy_fingerprint` recomputes the number earlier releases recorded, so
their outputs still resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import PROBLEM_COLUMN
from cxrage_ray.storage.files import filesystem_for, is_local, join_uri
from cxrage_ray.storage.uris import protocol_of

log = logging.getLogger("cxrage_ray.manifest.build")  # the one logger users see for manifest warnings

#: Rows per batch when a manifest is scanned or streamed (one Parquet read, one vectorised pass).
SCAN_BATCH_ROWS = 65_536
#: Rows per read unit of a listed/CSV manifest (a Parquet manifest's units are its row groups).
TABLE_UNIT_ROWS = 65_536
_MASK64 = 2**64 - 1
_NULL_HASH = 0x6A09E667F3BCC908  # a null image_id/uri: hashed apart from any text, "" included
#: Marks the scan's fingerprint apart from the one earlier releases recorded (`legacy_fingerprint`).
FINGERPRINT_PREFIX = "v2:"
UID_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")


@dataclass(frozen=True)
class ManifestSource:
    """INPUT opened for reading, its rows not read yet (Parquet) or read once (the other kinds).

    Args:
        input: INPUT as given.
        storage: how to reach it.
        uri_column: the manifest column holding the paths (renamed ``uri``).
        base: the folder relative uris resolve against; None for listings (their uris are absolute already).
        num_rows: rows in the manifest.
        extras: the manifest's own columns, in order, as Arrow fields (the output carries them through).
        has_image_id: the manifest gives image_ids (else they are derived from the uris).
        parquet_rows: rows per row group of a Parquet manifest (None for the other kinds).
        frame: the raw rows of a listed/CSV manifest (None for Parquet), or the rows of one read unit of it.
        frame_start: the row_id of `frame`'s first row.
    """

    input: str
    storage: StorageConfig
    uri_column: str
    base: str | None
    num_rows: int
    extras: tuple[pa.Field, ...]
    has_image_id: bool
    parquet_rows: tuple[int, ...] | None = None
    frame: pd.DataFrame | None = field(default=None, repr=False)
    frame_start: int = 0

    def units(self) -> list[tuple[int, int]]:
        """Read units as (first row_id, rows): a Parquet manifest's row groups, else slices of the frame."""
        sizes = self.parquet_rows if self.parquet_rows is not None else [
            min(TABLE_UNIT_ROWS, self.num_rows - start) for start in range(0, self.num_rows, TABLE_UNIT_ROWS)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int) if len(sizes) else []
        return [(int(s), int(n)) for s, n in zip(starts, sizes)]


@dataclass(frozen=True)
class ManifestScan:
    """What one pass over every row found (see the module docstring).

    Args:
        rows: manifest rows.
        fingerprint: 16 hex digits identifying the rows (row_id, image_id, uri).
        duplicate_rows: row_ids (sorted) whose image_id an earlier row has; duplicate_of: that earlier row, aligned.
        problems: rows with any problem (blank uri/image_id, duplicate); first_problem: the first one's text.
        uid_columns: the rows name DICOMweb instances, so the three UID columns are added.
    """

    rows: int
    fingerprint: str
    duplicate_rows: np.ndarray
    duplicate_of: np.ndarray
    problems: int = 0
    first_problem: str | None = None
    uid_columns: bool = False


def carried_schema(source: ManifestSource, scan: ManifestScan) -> pa.Schema:
    """The manifest's columns an output row carries: row_id, image_id, uri, then the manifest's own."""
    extras = list(source.extras)
    if scan.uid_columns:
        extras += [pa.field(c, pa.string()) for c in UID_COLUMNS if c not in {f.name for f in extras}]
    return pa.schema([pa.field("row_id", pa.int64()), pa.field("image_id", pa.string()),
                      pa.field("uri", pa.string()), *extras])


def raw_batches(source: ManifestSource, start: int = 0, rows: int | None = None, extras: bool = True,
                batch_rows: int = SCAN_BATCH_ROWS) -> Iterator[tuple[int, dict[str, pa.Array], pd.DataFrame | None]]:
    """(first row_id, the key columns ``uri`` and ``image_id`` as Arrow arrays, the other columns as pandas or None
    when `extras` is False) for the rows [start, start + rows), as read from INPUT.

    A Parquet manifest is read only from the row groups that hold those rows (`start` must begin one).
    """
    stop = source.num_rows if rows is None else start + rows
    keys = ["uri", "image_id"] if source.has_image_id else ["uri"]
    if source.frame is not None:
        others = [c for c in source.frame.columns if c not in keys]
        for first in range(start, stop, batch_rows):
            part = source.frame.iloc[first - source.frame_start:min(stop, first + batch_rows) - source.frame_start]
            arrays = {k: pa.array(part[k].to_numpy(dtype=object), from_pandas=True) for k in keys}
            yield first, arrays, part[others].reset_index(drop=True) if extras else None
        return
    groups, first_row = [], 0
    for index, size in enumerate(source.parquet_rows or ()):
        if start <= first_row < stop:
            groups.append(index)
        first_row += size
    if not groups:
        return
    columns = [source.uri_column if k == "uri" else k for k in keys]
    fs, path = filesystem_for(source.input, source.storage)
    with fs.open(path, "rb") as handle:
        reader = pq.ParquetFile(handle)
        read = None if extras else columns
        first = start
        for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=read):
            arrays = {k: batch.column(c) for k, c in zip(keys, columns)}
            others = [n for n in batch.schema.names if n not in columns]
            yield first, arrays, batch.select(others).to_pandas() if extras else None
            first += batch.num_rows


def _string(values: pa.Array) -> pa.Array:
    """A key column as Arrow strings: text as is, integers as their digits, other values as Python's str()."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.string())
    if pa.types.is_integer(values.type) or pa.types.is_null(values.type):
        return values.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in values.to_pylist()], pa.string())


def _blank_mask(text: pa.Array) -> np.ndarray:
    """Which cells are missing: null, or only whitespace (bool per row)."""
    empty = pc.equal(pc.utf8_trim_whitespace(text), "")
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)


def shape_rows(first_row_id: int, keys: dict[str, pa.Array], extras: pd.DataFrame | None, source: ManifestSource,
               row_ids: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw manifest rows -> manifest rows without their duplicate marks, and each row's problem (None when fine).

    The rules of `cxrage_ray.manifest.build` applied to a batch, in Arrow (only relative uris and ids of uris
    outside the manifest's folder go through Python): relative uris resolved against the manifest's folder, blank
    uris/image_ids marked, image_ids derived from the uris where the manifest gives none. `row_ids`: the rows'
    ids when they are not consecutive from `first_row_id`.
    """
    text = _string(keys["uri"])
    n = len(text)
    blank_uri = _blank_mask(text)
    trimmed = pc.utf8_trim_whitespace(text)
    uris = pc.if_else(pa.array(blank_uri), pa.scalar(None, pa.string()), trimmed if source.base else text)
    if source.base is not None:
        absolute = pc.or_(pc.match_substring(trimmed, "://"), pc.starts_with(trimmed, "/"))
        relative = np.flatnonzero(~pc.fill_null(absolute, True).to_numpy(zero_copy_only=False) & ~blank_uri)
        if len(relative):
            values = uris.to_numpy(zero_copy_only=False).copy()
            values[relative] = [join_uri(source.base, str(u)) for u in values[relative]]
            uris = pa.array(values, pa.string())
    problems = np.full(n, None, dtype=object)
    problems[blank_uri] = "empty uri"
    if "image_id" in keys:
        given = _string(keys["image_id"])
        blank_id = _blank_mask(given)
        image_ids = pc.if_else(pa.array(blank_id), pa.scalar(None, pa.string()), given)
    elif source.base is None:
        image_ids, blank_id = pa.nulls(n, pa.string()), np.ones(n, dtype=bool)
    else:
        image_ids = _default_image_ids(uris, source.base)
        blank_id = image_ids.is_null().to_numpy(zero_copy_only=False)
    problems[blank_id & ~blank_uri] = "empty image_id"
    ids = np.arange(first_row_id, first_row_id + n, dtype="int64") if row_ids is None else row_ids
    out = pd.DataFrame({"row_id": ids, "image_id": pd.arrays.ArrowStringArray(image_ids),
                        "uri": pd.arrays.ArrowStringArray(uris)})
    if extras is not None and len(extras.columns):
        out = pd.concat([out, extras.reset_index(drop=True)], axis=1)
    return out, problems


def _default_image_ids(uris: pa.Array, base: str) -> pa.Array:
    """Each uri's path relative to the manifest's folder when under it, else the uri itself (null for none)."""
    prefix = base.rstrip("/") + "/"
    under = pc.fill_null(pc.starts_with(uris, prefix), False)
    ids = pc.if_else(under, pc.utf8_slice_codeunits(uris, len(prefix)), uris)
    outside = np.flatnonzero(~under.to_numpy(zero_copy_only=False) & ~uris.is_null().to_numpy(zero_copy_only=False))
    if len(outside):  # file:// spellings of a local folder, if any
        values = ids.to_numpy(zero_copy_only=False).copy()
        values[outside] = [_default_image_id(str(u), base) for u in values[outside]]
        ids = pa.array(values, pa.string())
    return ids


def _default_image_id(uri: str, base: str) -> str:
    prefix = base.rstrip("/") + "/"
    if protocol_of(uri) == protocol_of(base) and is_local(uri) == is_local(base):
        candidate = uri
        if is_local(uri) and "://" in uri:  # file:///x -> /x to compare with a plain local base
            candidate = "/" + uri.split("://", 1)[1].lstrip("/")
        if candidate.startswith(prefix):
            return candidate[len(prefix):]
    return uri


def text_hashes(values: pa.Array) -> np.ndarray:
    """64-bit hashes (uint64) of Arrow strings, null hashed apart from every text (what the scan keeps per row)."""
    objects = values.to_numpy(zero_copy_only=False)
    hashed = pd.util.hash_array(objects, categorize=False)
    return np.where(values.is_null().to_numpy(zero_copy_only=False), np.uint64(_NULL_HASH), hashed)


def _arrow(column: pd.Series) -> pa.Array:
    """A pandas column of Arrow strings as one Arrow array (no copy)."""
    values = pa.array(column.array)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (uint64 in, uint64 out)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def batch_fingerprint(row_ids: np.ndarray, id_hashes: np.ndarray, uri_hashes: np.ndarray) -> int:
    """The batch's share of the job fingerprint: the sum (mod 2⁶⁴) of one hash per row of (row_id, image_id,
    uri); a sum, so batches add up in any grouping to the same number."""
    with np.errstate(over="ignore"):
        row = _mix(row_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ _mix(id_hashes)
                   ^ _mix(uri_hashes ^ np.uint64(0xD6E8FEB86659FD93)))
        return int(row.sum(dtype=np.uint64))


def legacy_fingerprint(source: ManifestSource) -> str:
    """The fingerprint releases before the streaming manifest recorded (pandas' row hashes of row_id, image_id and
    uri as text, summed): read only to resume an OUTPUT such a release wrote; ~3x slower than the scan's."""
    total = 0
    for first, keys, _ in raw_batches(source, extras=False):
        rows, _ = shape_rows(first, keys, None, source)
        legacy = rows[["row_id", "image_id", "uri"]].astype({"image_id": "string", "uri": "string"}).astype(str)
        total = (total + int(pd.util.hash_pandas_object(legacy, index=False).sum())) & _MASK64
    return f"{total:016x}"


def scan_manifest(source: ManifestSource) -> ManifestScan:
    """One pass over every row (see the module docstring); logs a warning naming the first marked row."""
    from cxrage_ray.pacs.dicomweb import is_instance_uri

    hashes = np.zeros(source.num_rows, dtype=np.uint64)
    claims = np.zeros(source.num_rows, dtype=bool)
    total, problems, first_problem, first_row, uids = 0, 0, None, -1, False
    for first, keys, _ in raw_batches(source, extras=False):
        rows, found = shape_rows(first, keys, None, source)
        image_ids, uris = _arrow(rows["image_id"]), _arrow(rows["uri"])
        id_hashes = text_hashes(image_ids)
        total = (total + batch_fingerprint(rows["row_id"].to_numpy(), id_hashes, text_hashes(uris))) & _MASK64
        ok = pd.isna(found)
        hashes[first:first + len(rows)] = id_hashes
        claims[first:first + len(rows)] = ok
        if not ok.all():
            problems += int((~ok).sum())
            if first_problem is None:
                row = int(np.flatnonzero(~ok)[0])
                first_problem, first_row = f"row {first + row}: {found[row]}", first + row
        if not uids and pc.any(pc.starts_with(uris, "dicomweb")).as_py():
            uids = any(is_instance_uri(str(u)) for u in rows["uri"].dropna())
    duplicate_rows, duplicate_of = _duplicates(hashes, claims)
    del hashes, claims
    if len(duplicate_rows):
        problems += len(duplicate_rows)
        if first_problem is None or first_row > duplicate_rows[0]:
            first_problem = f"row {duplicate_rows[0]}: duplicate image_id (also row {duplicate_of[0]})"
    if problems:  # said up front: these rows will be ManifestError rows, not scores
        log.warning("%d manifest row(s) name no readable image and become ManifestError rows (%s%s)",
                    problems, first_problem, ", ..." if problems > 1 else "")
    return ManifestScan(rows=source.num_rows, fingerprint=f"{FINGERPRINT_PREFIX}{total:016x}",
                        duplicate_rows=duplicate_rows, duplicate_of=duplicate_of, problems=problems,
                        first_problem=first_problem, uid_columns=uids)


def _duplicates(hashes: np.ndarray, claims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids that repeat an earlier claiming row's hash, that earlier row), both int64 and sorted by row."""
    claimed = hashes[claims]
    ordered = np.sort(claimed)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(repeated):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(claims & np.isin(hashes, repeated)).astype(np.int64)
    order = np.argsort(hashes[rows], kind="stable")  # within one hash, rows stay in manifest order
    grouped, by_hash = rows[order], hashes[rows][order]
    starts = np.r_[True, by_hash[1:] != by_hash[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(grouped)), 0))
    later = ~starts
    dup, of = grouped[later], grouped[first][later]
    sort = np.argsort(dup)
    return dup[sort], of[sort]


def finish_rows(rows: pd.DataFrame, problems: np.ndarray, scan: ManifestScan) -> pd.DataFrame:
    """Add the duplicate marks and `PROBLEM_COLUMN` (``row N: problem``), and the DICOMweb UID columns."""
    ids = rows["row_id"].to_numpy()
    lo, hi = np.searchsorted(scan.duplicate_rows, [ids[0], ids[-1] + 1]) if len(ids) else (0, 0)
    for dup, of in zip(scan.duplicate_rows[lo:hi], scan.duplicate_of[lo:hi]):
        at = np.flatnonzero(ids == dup)
        if len(at) and problems[at[0]] is None:
            problems[at[0]] = f"duplicate image_id {rows['image_id'].iloc[at[0]]!r} (also row {of})"
    marked = np.flatnonzero(pd.notna(problems))
    column = np.full(len(rows), None, dtype=object)
    column[marked] = [f"row {ids[i]}: {problems[i]}" for i in marked]
    rows[PROBLEM_COLUMN] = pd.array(column, dtype="string")
    if scan.uid_columns:
        from cxrage_ray.pacs.dicomweb import with_uid_columns

        with_uids = with_uid_columns(rows)
        for name in UID_COLUMNS:
            rows[name] = with_uids[name] if name in with_uids else pd.array([None] * len(rows), dtype="string")
    return rows


def unit_batches(source: ManifestSource, scan: ManifestScan, start: int, rows: int,
                 done: np.ndarray | None = None) -> Iterator[pd.DataFrame]:
    """The finished manifest rows of one read unit [start, start + rows), without the sorted row_ids `done`
    (a chunked anti-join: each batch is filtered before its rows are shaped)."""
    for first, keys, extras in raw_batches(source, start, rows):
        ids = None
        if done is not None and len(done):
            ids = np.arange(first, first + len(keys["uri"]), dtype=np.int64)
            keep = ~_contains(done, ids)
            if not keep.any():
                continue
            if not keep.all():
                positions = pa.array(np.flatnonzero(keep))
                keys = {k: v.take(positions) for k, v in keys.items()}
                extras = None if extras is None else extras.iloc[np.flatnonzero(keep)]
                ids = ids[keep]
        shaped, problems = shape_rows(first, keys, extras, source, row_ids=ids)
        yield finish_rows(shaped, problems, scan)


def manifest_batches(source: ManifestSource, scan: ManifestScan, done: np.ndarray | None = None
                     ) -> Iterator[pd.DataFrame]:
    """Every unit's rows in manifest order (`unit_batches` over `source.units()`)."""
    for start, rows in source.units():
        yield from unit_batches(source, scan, start, rows, done)


def _contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` are in the sorted array `sorted_ids` (a chunked anti-join: one binary search per row)."""
    at = np.searchsorted(sorted_ids, ids)
    at[at == len(sorted_ids)] = 0
    return sorted_ids[at] == ids
