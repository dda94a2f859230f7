"""Write stage: scored rows -> Parquet parts under OUTPUT, with an explicit record of what is complete.

In:  pyarrow tables of scored rows (the output contract below), streamed from the pipeline.
Out: OUTPUT/parts/part-<run>-<seq>.parquet files, each written to a temporary name and renamed (local) or
     PUT in one request (object stores), so a part either exists whole or not at all; OUTPUT/_cxrage/job.json
     (what the job is: manifest fingerprint and scoring settings) and OUTPUT/_cxrage/summary.json.

Everything that is not data lives under `OUTPUT/_cxrage/` (`RECORDS_DIR`): readers that treat a folder as a
Parquet dataset (pandas, pyarrow.dataset, DuckDB, Spark) skip `_`-prefixed names, so `pd.read_parquet(OUTPUT)`
reads the rows and nothing else. Outputs written before that layout kept job.json/summary.json at the top;
`read_json` still finds them there and `move_legacy_records` moves them into `_cxrage/` on the next run.

Parts are committed every `part_rows` rows or `commit_every_s` seconds, whichever comes first (`PartWriter`,
`committing_on_time`). A part OUTPUT refuses raises `OutputError` (the job stops) after the part is kept in the
local spill (`cxrage_ray.write.spill`), which the next run of the same job commits before it resumes.

Resume reads the `row_id`s of the committed parts; a row is in exactly one committed part because the
driver writes each row once and only whole parts become visible. `--retry-errors` first rewrites the parts
without their error rows (`drop_error_rows`), so those rows count as missing and are scored again.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.errors import InputError, OutputError, error_kind
from cxrage_ray.write.spill import Spill
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import exists, filesystem_for, list_files, read_bytes, write_bytes
from cxrage_ray.storage.retries import error_reason

PARTS_DIR = "parts"
#: Job records, summary and report: `_`-prefixed so dataset readers skip them.
RECORDS_DIR = "_cxrage"
#: The first part's commit window (seconds); each part doubles it, up to `PartWriter.commit_every_s`.
FIRST_COMMIT_WINDOW_S = 1.0
#: Record names that older outputs kept at OUTPUT's top level.
LEGACY_RECORDS = ("job.json", "summary.json")


def record_uri(output: str, name: str) -> str:
    """Where a record (job.json, summary.json, report.html, analysis.json) of OUTPUT lives."""
    return _join(output, RECORDS_DIR, name)


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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order/cast a batch to the output schema; absent columns become nulls."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(_as_type(table.column(f.name), f.type))
        else:
            columns.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@dataclass
class PartWriter:
    """Buffers scored rows and commits them as whole Parquet parts: every `part_rows` rows or every
    `commit_every_s` seconds, whichever comes first, so a killed driver loses at most that window.

    The first windows are shorter (1 s, then doubling up to `commit_every_s`): a run killed in its first
    minute keeps nearly everything, while a long run still settles at one part per `commit_every_s`.

    Args:
        output: OUTPUT folder (local path or fsspec URL).
        schema: the output schema (see `output_schema`).
        storage: storage settings for remote outputs.
        part_rows: rows per part file at most; ~10k rows is ~1-2 MB of Parquet.
        commit_every_s: the longest a scored row waits in memory (`add` commits on arrival of a batch,
            `flush_if_due` from a timer between batches; see `committing_on_time`).
        spill: where a part goes when OUTPUT refuses it (then `OutputError`); None: nowhere, the error says so.

    `add`, `flush` and `flush_if_due` may be called from two threads (the driver loop and the timer).
    """

    output: str
    schema: pa.Schema
    storage: StorageConfig
    part_rows: int = 10_000
    commit_every_s: float = 30.0
    spill: Spill | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    parts_written: int = 0
    rows_written: int = 0
    failure: OutputError | None = None
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered_rows: int = 0
    _oldest_row_at: float = 0.0
    _window_s: float = FIRST_COMMIT_WINDOW_S
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, table: pa.Table) -> None:
        """Buffer scored rows; commit when the part is full or its oldest row has waited long enough.

        Raises:
            OutputError: OUTPUT refused a part (now or on the timer); the job must stop.
        """
        with self._lock:
            self._raise_failure()
            if not self._buffered_rows:
                self._oldest_row_at = time.monotonic()
            self._buffer.append(conform(table, self.schema))
            self._buffered_rows += len(table)
            if self._buffered_rows >= self.part_rows or self._due():
                self._commit()

    def flush(self) -> None:
        """Commit whatever is buffered (raises `OutputError` as `add` does)."""
        with self._lock:
            self._raise_failure()
            self._commit()

    def flush_if_due(self) -> None:
        """Commit the buffer if its oldest row has waited `commit_every_s`; a failure is kept for `add`/`flush`."""
        with self._lock:
            if self.failure is None and self._due():
                with contextlib.suppress(OutputError):  # kept in self.failure, raised in the driver's thread
                    self._commit()

    @property
    def commit_window_s(self) -> float:
        """How long the oldest buffered row may wait now (grows from 1 s to `commit_every_s`)."""
        return min(self._window_s, self.commit_every_s)

    def _due(self) -> bool:
        return bool(self._buffered_rows) and time.monotonic() - self._oldest_row_at >= self.commit_window_s

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _commit(self) -> None:
        if not self._buffered_rows:
            return
        table = pa.concat_tables(self._buffer)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        name = f"part-{self.run_id}-{self.parts_written:05d}.parquet"
        uri = _join(self.output, PARTS_DIR, name)
        try:
            _write_or_refuse(uri, sink.getvalue(), self.storage)
        except OutputError as refused:
            self._next_part()  # the rows are in the spill now, or the error says they are not
            self.failure = self._refused(refused, name, sink.getvalue(), len(table))
            raise self.failure from refused
        # cleared only now: Ctrl-C during the write leaves the rows buffered, and the interrupted job's last
        # flush commits them under the same name (a part appears whole, once)
        self._next_part()
        self.rows_written += len(table)

    def _next_part(self) -> None:
        self._buffer, self._buffered_rows = [], 0
        self.parts_written += 1
        self._window_s = min(2 * self._window_s, self.commit_every_s)

    def _refused(self, refused: OutputError, name: str, data: bytes, rows: int) -> OutputError:
        """Keep a refused part in the spill; the error says why OUTPUT refused it and where the rows are."""
        reason = f"{refused}; the job stopped at the first part OUTPUT refused"
        if self.spill is None:
            return OutputError(f"{reason}; {rows} scored rows of that part were not kept and the rerun scores them")
        try:
            kept = self.spill.keep(name, data)
        except OSError as spill_exc:
            return OutputError(f"{reason}; {rows} scored rows could not be kept locally either "
                               f"({error_reason(spill_exc)}) and the rerun scores them")
        return OutputError(f"{reason}. {rows} scored rows are kept in {kept.parent}; once OUTPUT can be written, "
                           "rerun the same command: it commits them and scores only what is missing")


@contextlib.contextmanager
def committing_on_time(writer: PartWriter, tick_s: float | None = None) -> Iterator[PartWriter]:
    """Within the block, a timer thread commits `writer`'s rows once they have waited `commit_every_s`, also
    while no new batch arrives (a slow stage must not hold scored rows in memory indefinitely)."""
    stop = threading.Event()
    tick = tick_s if tick_s is not None else min(1.0, writer.commit_every_s / 4)

    def run() -> None:
        while not stop.wait(tick):
            writer.flush_if_due()

    timer = threading.Thread(target=run, name="cxrage-commit-timer", daemon=True)
    timer.start()
    try:
        yield writer
    finally:
        stop.set()
        timer.join()


def _write_or_refuse(uri: str, data: bytes, storage: StorageConfig) -> None:
    """`write_bytes`, with whatever the store raises as ``OutputError("cannot write URI: reason")``."""
    try:
        write_bytes(uri, data, storage)
    except Exception as exc:
        raise OutputError(f"cannot write {uri}: {error_reason(exc)}") from exc


def commit_part(output: str, name: str, data: bytes, storage: StorageConfig) -> None:
    """Commit one whole part (bytes of a Parquet file) as OUTPUT/parts/<name> (`OutputError` when refused)."""
    _write_or_refuse(_join(output, PARTS_DIR, name), data, storage)


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
        kept = table.filter(pa.array([not r for r in retry]))
        if len(kept):
            sink = io.BytesIO()
            pq.write_table(kept, sink, compression="zstd")
            write_bytes(uri, sink.getvalue(), storage)
        else:
            part_fs, part_path = filesystem_for(uri, storage)
            part_fs.rm(part_path)
        dropped += sum(retry)
    return dropped


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


def write_original_csv(table: pa.Table, path: str, storage: StorageConfig, weights_name: str | None = None) -> None:
    """The original tool's CSV: unnamed index, File, SD_Prediction, CXR_Age (ok rows only, in row order).

    With demo weights a fourth column `Weights` = `demo` says so on every line: those ages are meaningless.
    """
    df = table.select(["image_id", "raw_sd", "cxr_age", "status"]).to_pandas()
    df = df[df["status"] == "ok"].reset_index(drop=True)
    csv = df.rename(columns={"image_id": "File", "raw_sd": "SD_Prediction", "cxr_age": "CXR_Age"})[
        ["File", "SD_Prediction", "CXR_Age"]
    ]
    if weights_name == "demo":
        csv = csv.assign(Weights="demo")
    write_bytes(path, csv.to_csv(index=True).encode(), storage)
