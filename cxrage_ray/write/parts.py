"""OUTPUT's layout: committed parts, the job's records, and reading them back.

In:  an OUTPUT folder (local path or fsspec URL).
Out: OUTPUT/parts/part-<run>-<seq>.parquet files (made by `cxrage_ray.write.pending.commit_pending`: written to a
     temporary name and renamed (local) or PUT in one request (object stores), so a part either exists whole or
     not at all), each with its `PartRecord` in the footer; OUTPUT/_cxrage/job.json (what the job is: manifest
     fingerprint and scoring settings) and OUTPUT/_cxrage/summary.json.

Everything that is not data lives under `OUTPUT/_cxrage/` (`RECORDS_DIR`): readers that treat a folder as a
Parquet dataset (pandas, pyarrow.dataset, DuckDB, Spark) skip `_`-prefixed names, so `pd.read_parquet(OUTPUT)`
reads the rows and nothing else. Outputs written before that layout kept job.json/summary.json at the top;
`read_json` still finds them there and `move_legacy_records` moves them into `_cxrage/` on the next run.

Parts are committed every `part_rows` rows or `commit_every_s` seconds, whichever comes first
(`cxrage_ray.write.committer`). A part OUTPUT refuses raises `OutputError` (the job stops) after the part is kept
in the local spill (`cxrage_ray.write.spill`), which the next run of the same job commits before it resumes.

Resume reads the `row_id`s of the committed parts; a row is in exactly one committed part because only the
driver names parts, once each, from the blocks Ray Data delivered (`cxrage_ray.write.pending`), and only whole
parts become visible. `--retry-errors` first rewrites the parts
without their error rows (`drop_error_rows`), so those rows count as missing and are scored again.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import InputError, OutputError, error_kind
from cxrage_ray.storage.files import exists, filesystem_for, list_files, read_bytes, write_bytes
from cxrage_ray.storage.retries import error_reason
from cxrage_ray.write.pending import conform, parquet_bytes
from cxrage_ray.write.records import PartRecord, part_record, read_part_record, with_record

PARTS_DIR = "parts"
#: Job records, summary and report: `_`-prefixed so dataset readers skip them.
RECORDS_DIR = "_cxrage"
#: Record names that older outputs kept at OUTPUT's top level.
LEGACY_RECORDS = ("job.json", "summary.json")


def record_uri(output: str, name: str) -> str:
    """Where a record (job.json, summary.json, report.html, analysis.json) of OUTPUT lives."""
    return _join(output, RECORDS_DIR, name)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _write_or_refuse(uri: str, data: bytes, storage: StorageConfig) -> None:
    """`write_bytes`, with whatever the store raises as ``OutputError("cannot write URI: reason")``."""
    try:
        write_bytes(uri, data, storage)
    except Exception as exc:
        raise OutputError(f"cannot write {uri}: {error_reason(exc)}") from exc


def commit_part(output: str, name: str, data: bytes, storage: StorageConfig) -> None:
    """Commit one whole part (bytes of a Parquet file) as OUTPUT/parts/<name> (`OutputError` when refused)."""
    _write_or_refuse(_join(output, PARTS_DIR, name), data, storage)


def write_part(output: str, name: str, rows: pa.Table, schema: pa.Schema, storage: StorageConfig) -> PartRecord:
    """Commit `rows` (conformed to `schema`) as the whole part OUTPUT/parts/<name>, its record in the footer (tools
    and tests that make an OUTPUT directly; a job's parts come from `cxrage_ray.write.pending`)."""
    table = conform(rows, schema)
    record = part_record(table)
    commit_part(output, name, parquet_bytes(with_record(table, record)), storage)
    return record


def committed_parts(output: str, storage: StorageConfig) -> list[str]:
    """URIs of the committed parts under OUTPUT/parts, sorted ([] before the first part). Temp files are not
    listed: only whole parts carry the `.parquet` name."""
    return [uri for uri in list_files(_join(output, PARTS_DIR), storage) if uri.endswith(".parquet")]


def completed_row_ids(output: str, storage: StorageConfig) -> set[int]:
    """row_ids already in committed parts, as a set (see `completed_row_id_array`)."""
    return set(completed_row_id_array(output, storage).tolist())


def completed_row_id_array(output: str, storage: StorageConfig) -> np.ndarray:
    """row_ids already in committed parts (for resume), sorted and unique, int64: 8 bytes per finished row.

    Only each part's row_id column is read (its Parquet column chunk, not the whole part), several parts at a
    time: on an object store each part is a request or two, and a 99%-done archive job has hundreds of them.
    """
    parts = committed_parts(output, storage)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=min(8, len(parts)), thread_name_prefix="cxrage-resume") as pool:
        ids = list(pool.map(lambda uri: _row_ids(uri, storage), parts))
    return np.unique(np.concatenate(ids))


def _row_ids(uri: str, storage: StorageConfig) -> np.ndarray:
    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=["row_id"])
    return table.column("row_id").to_numpy().astype(np.int64, copy=False)


def drop_error_rows(output: str, storage: StorageConfig, kinds: tuple[str, ...] = ()) -> int:
    """Take error rows (of `kinds`; every kind when empty) out of the committed parts, so a rerun scores them again.

    Each affected part is replaced whole under its own name (temp file + rename, or one PUT) by a copy without
    those rows, or deleted when nothing else is in it. Whenever this is interrupted, every part is either the
    old or the new version: a row is still in at most one part, and a dropped row is simply missing, which the
    resume scores. Returns the number of rows dropped.
    """
    dropped = 0
    for uri in committed_parts(output, storage):
        table = pq.read_table(io.BytesIO(read_bytes(uri, storage)))
        retry = [
            status == "error" and (not kinds or error_kind(error) in kinds)
            for status, error in zip(table.column("status").to_pylist(), table.column("error").to_pylist())
        ]
        if not any(retry):
            continue
        kept = table.filter(pa.array([not r for r in retry])).replace_schema_metadata(None)
        if len(kept):
            write_bytes(uri, parquet_bytes(with_record(kept, part_record(kept))), storage)
        else:
            part_fs, part_path = filesystem_for(uri, storage)
            part_fs.rm(part_path)
        dropped += sum(retry)
    return dropped


def part_records(output: str, storage: StorageConfig) -> list[tuple[str, PartRecord]]:
    """(name, record) of every committed part, from its footer: a few KB a part, whatever its rows, read several
    parts at a time. A part of an older release has no record: its small columns are read instead."""
    parts = committed_parts(output, storage)
    if not parts:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(parts)), thread_name_prefix="cxrage-records") as pool:
        records = list(pool.map(lambda uri: read_part_record(uri, storage), parts))
    return [(uri.rsplit("/", 1)[-1], record) for uri, record in zip(parts, records)]


def output_parts(output: str, storage: StorageConfig, columns: list[str]) -> Iterator[pa.Table]:
    """Each committed part's `columns` (nulls for a column an older part lacks), one part at a time: memory follows
    the largest part, not OUTPUT (write-back walks a job's rows this way)."""
    for uri in committed_parts(output, storage):
        fs, path = filesystem_for(uri, storage)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=present).replace_schema_metadata(None)
        for name in columns:
            if name not in present:
                table = table.append_column(name, pa.nulls(len(table)))
        yield table.select(columns)


def read_output(output: str, storage: StorageConfig) -> pa.Table:
    """All committed rows of an OUTPUT folder, sorted by row_id."""
    tables = [pq.read_table(io.BytesIO(read_bytes(uri, storage))) for uri in committed_parts(output, storage)]
    if not tables:
        raise InputError(f"no scored parts under {output}/{PARTS_DIR}")
    return pa.concat_tables(tables, promote_options="default").sort_by("row_id")


def write_json(output: str, name: str, payload: dict[str, Any], storage: StorageConfig) -> None:
    """Write the record OUTPUT/_cxrage/<name> (`OutputError` when OUTPUT refuses it)."""
    _write_or_refuse(record_uri(output, name), json.dumps(payload, indent=2, sort_keys=True).encode(), storage)


def read_json(output: str, name: str, storage: StorageConfig) -> dict[str, Any] | None:
    """The record OUTPUT/_cxrage/<name> (or OUTPUT/<name> of an older output), or None when absent."""
    for uri in (record_uri(output, name), _join(output, name)):
        if exists(uri, storage):
            return json.loads(read_bytes(uri, storage))
    return None


def move_legacy_records(output: str, storage: StorageConfig) -> list[str]:
    """Move job.json/summary.json of an older output from OUTPUT/ into OUTPUT/_cxrage/; returns the names moved.

    Each record is written at its new place before the old one is removed, so an interruption leaves a
    readable record (`read_json` prefers the new place).
    """
    moved = []
    for name in LEGACY_RECORDS:
        old = _join(output, name)
        if not exists(old, storage):
            continue
        write_bytes(record_uri(output, name), read_bytes(old, storage), storage)
        fs, path = filesystem_for(old, storage)
        fs.rm(path)
        moved.append(name)
    return moved
