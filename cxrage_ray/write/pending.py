"""Rows written where they are scored: a block of scored rows -> a pending file, then pending files -> a part.

In:  a block of scored rows in the scoring actor (`write_pending`); a group of pending files the driver names
     (`commit_pending`, run as a Ray task: the driver never holds a row).
Out: `OUTPUT/_cxrage/pending/<run>/<uuid>.parquet` and a small block record for the driver (`BlockRecord`: the
     pending file, its `PartRecord`, the storage retries and precision-audit deltas of its rows); then the part
     `OUTPUT/parts/<name>` holding the group's rows, its record in the footer, and the pending files deleted.

Exactly once, by construction:
- A pending file lives under `_cxrage/`, which dataset readers (pandas, pyarrow, DuckDB, Spark) skip, and resume
  never reads: rows in it count nowhere until a part holds them.
- Only the driver names a part, once, from the block records Ray Data delivered to it. A scoring task Ray
  retries, or an actor that dies after its upload, leaves a pending file no record names: never committed.
- A part appears whole (temp file + rename, or one PUT). `commit_pending` run twice (a Ray retry) finds its part
  there and only deletes what is left of its inputs; a driver killed at any point leaves pending files that the
  next run deletes (`clear_pending`) before it reads what is done, and scores their rows again.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import OutputError, ReadError
from cxrage_ray.storage.files import exists, filesystem_for, list_files, read_bytes, write_bytes
from cxrage_ray.storage.retries import error_reason
from cxrage_ray.write.records import PartRecord, part_record, read_part_record, with_record

PENDING_DIR = "_cxrage/pending"


@dataclass(frozen=True)
class PendingWrite:
    """Where and how a scoring actor writes its blocks (made by the driver, shipped to the actors).

    Args:
        output: OUTPUT (a local folder every node sees at the same path, or an object store URL).
        schema: the output schema (`cxrage_ray.contract.output_schema`).
        storage: storage settings.
        run: this run's id (pending files of a run live under one folder).
    """

    output: str
    schema: pa.Schema
    storage: StorageConfig
    run: str

    @property
    def folder(self) -> str:
        return f"{self.output.rstrip('/')}/{PENDING_DIR}/{self.run}"


@dataclass
class BlockRecord:
    """What the driver gets for a block of scored rows: never the rows (see the module docstring).

    `refused`: OUTPUT refused the pending file; then `data` holds the block as Parquet bytes so the driver can keep
    it in the spill, and `pending` is empty."""

    pending: str
    record: PartRecord
    retries: dict[str, int] = field(default_factory=dict)
    audit_deltas: list[float] = field(default_factory=list)
    audit_precisions: list[str] = field(default_factory=list)
    refused: str = ""
    data: bytes = b""

    def as_row(self) -> dict[str, Any]:
        """One row of the block Ray Data carries back (a few hundred bytes)."""
        return {"pending": self.pending, "record": self.record.to_json(), "retries": json.dumps(self.retries),
                "audit": json.dumps({"deltas": self.audit_deltas, "precisions": self.audit_precisions}),
                "refused": self.refused, "data": self.data}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BlockRecord:
        audit = json.loads(row["audit"])
        return cls(pending=row["pending"], record=PartRecord.from_json(row["record"]),
                   retries=json.loads(row["retries"]), audit_deltas=audit["deltas"],
                   audit_precisions=audit["precisions"], refused=row["refused"] or "", data=row["data"] or b"")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order/cast a batch to the output schema; absent columns become nulls."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(_as_type(table.column(f.name), f.type))
        else:
            columns.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _as_type(column: pa.ChunkedArray, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    """`column` cast to `type_`. A column Ray Data could only carry as pickled Python objects (a manifest
    column of text in some blocks and all nulls in others, e.g. metadata.csv's `nih_*` columns) is rebuilt
    from its Python values, NaN as null."""
    try:
        return column.cast(type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if not isinstance(column.type, pa.ExtensionType):
            raise
        return pa.array(column.to_pylist(), type=type_, from_pandas=True)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file (zstd), as every part is written."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_pending(scored: Any, settings: PendingWrite) -> BlockRecord:
    """Write a block of scored rows (pandas or pyarrow, any column order, the writer's extra columns included) as
    a pending file; return its record. Never raises for OUTPUT's refusal: the record carries it (and the rows)."""
    from cxrage_ray.pipeline.prepare import retry_counts
    from cxrage_ray.predict.precision_audit import audited_films

    deltas, precisions = audited_films(scored)  # read from the batch as it came: no conversion for them
    retries = dict(sorted(retry_counts(scored).items()))
    table = scored if isinstance(scored, pa.Table) else pa.Table.from_pandas(scored, preserve_index=False)
    rows = conform(table, settings.schema)
    record = part_record(rows)
    data = parquet_bytes(with_record(rows, record))
    uri = f"{settings.folder}/{uuid.uuid4().hex}.parquet"
    try:
        write_bytes(uri, data, settings.storage)
    except Exception as exc:
        return BlockRecord("", record, retries, deltas, sorted(precisions),
                           refused=f"cannot write {uri}: {error_reason(exc)}", data=data)
    return BlockRecord(uri, record, retries, deltas, sorted(precisions))


def commit_pending(pending: list[str], part_uri: str, storage: StorageConfig) -> dict[str, Any]:
    """Make the part `part_uri` of the pending files' rows (a Ray task the driver starts; idempotent).

    Returns {"record": json} once the part is there, or {"refused": reason, "data": the part's bytes} when OUTPUT
    refuses it (the driver keeps them in the spill). A pending file that is missing is an `OutputError`: OUTPUT
    is then not the same folder on every node."""
    if exists(part_uri, storage):  # a retry of a commit whose part was written: only the clean-up was left
        _delete(pending, storage)
        return {"record": read_part_record(part_uri, storage).to_json()}
    tables = []
    for uri in pending:
        try:
            tables.append(pq.read_table(io.BytesIO(read_bytes(uri, storage))))
        except ReadError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            raise OutputError(f"a scored block written to {uri} is not there: on a cluster, OUTPUT must be an "
                              "object store (s3://...) or a folder every node mounts at the same path") from exc
    table = pa.concat_tables(tables)
    record = PartRecord()
    for part in tables:
        record = record.merged(PartRecord.from_metadata(part.schema.metadata) or part_record(part))
    data = parquet_bytes(with_record(table.replace_schema_metadata(None), record))
    try:
        write_bytes(part_uri, data, storage)
    except Exception as exc:
        return {"refused": f"cannot write {part_uri}: {error_reason(exc)}", "data": data}
    _delete(pending, storage)
    return {"record": record.to_json()}


def clear_pending(output: str, storage: StorageConfig) -> int:
    """Delete every pending file under OUTPUT (no commit names them: an earlier run stopped before); returns how
    many. Their rows are not in any part, so this run scores them."""
    files = list_files(f"{output.rstrip('/')}/{PENDING_DIR}", storage)
    _delete(files, storage)
    return len(files)


def _delete(uris: list[str], storage: StorageConfig) -> None:
    for uri in uris:
        fs, path = filesystem_for(uri, storage)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
