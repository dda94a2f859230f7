"""The original tool's CSV (`--csv`), streamed from OUTPUT's parts in row order, in bounded memory.

In:  OUTPUT's committed parts (only `row_id`, `image_id`, `raw_sd`, `cxr_age`, `status` are read).
Out: a CSV: unnamed index, File, SD_Prediction, CXR_Age (ok rows only, in row order); with demo weights a fourth
     column `Weights` = `demo` on every line (those ages are meaningless). Written whole or not at all (a temp
     file renamed locally; one multipart upload completed at the end on object stores).

Row order without holding OUTPUT: the rows go out in passes over `rows_per_pass` row_ids, each pass reading only
the parts whose row_id range (their footer's statistics) meets it, and only those rows (Parquet filters), so
memory follows the pass, not the job.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.atomic import atomic_path
from cxrage_ray.storage.files import filesystem_for, is_local
from cxrage_ray.write.parts import committed_parts

#: Row ids per pass: ~60 MB of the CSV's columns at most.
ROWS_PER_PASS = 1_000_000
COLUMNS = ["row_id", "image_id", "raw_sd", "cxr_age", "status"]
HEADERS = {"image_id": "File", "raw_sd": "SD_Prediction", "cxr_age": "CXR_Age"}


def write_original_csv(output: str, path: str, storage: StorageConfig, weights_name: str | None = None,
                       rows_per_pass: int = ROWS_PER_PASS) -> int:
    """Write the CSV of OUTPUT's ok rows to `path` (see the module docstring); returns the rows written."""
    ranges = [(uri, *_row_id_range(uri, storage)) for uri in committed_parts(output, storage)]
    top = max((high for _, _, high in ranges), default=-1)
    written = 0
    with _text_sink(path, storage) as sink:
        sink.write(_lines(pa.table({c: pa.array([], pa.string()) for c in HEADERS}), 0, weights_name, header=True))
        for start in range(0, top + 1, rows_per_pass):
            stop = start + rows_per_pass
            tables = [_ok_rows(uri, start, stop, storage) for uri, low, high in ranges if low < stop and high >= start]
            if not tables:
                continue
            rows = pa.concat_tables(tables).sort_by("row_id")
            sink.write(_lines(rows, written, weights_name, header=False))
            written += len(rows)
    return written


def _lines(rows: pa.Table, first_index: int, weights_name: str | None, header: bool) -> str:
    frame = rows.select(list(HEADERS)).to_pandas().rename(columns=HEADERS)
    frame.index = range(first_index, first_index + len(frame))
    if weights_name == "demo":
        frame = frame.assign(Weights="demo")
    return frame.to_csv(index=True, header=header)


def _row_id_range(uri: str, storage: StorageConfig) -> tuple[int, int]:
    """(lowest, highest) row_id of a part, from its footer's statistics (its row_id column when it has none)."""
    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        column = parquet.schema_arrow.get_field_index("row_id")
        stats = [parquet.metadata.row_group(g).column(column).statistics for g in range(parquet.num_row_groups)]
        if stats and all(s is not None and s.has_min_max for s in stats):
            return min(int(s.min) for s in stats), max(int(s.max) for s in stats)
        ids = parquet.read(columns=["row_id"]).column("row_id")
    return (int(pc.min(ids).as_py()), int(pc.max(ids).as_py())) if len(ids) else (0, -1)


def _ok_rows(uri: str, start: int, stop: int, storage: StorageConfig) -> pa.Table:
    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle, columns=COLUMNS,
                              filters=[("row_id", ">=", start), ("row_id", "<", stop), ("status", "=", "ok")])
    return table.replace_schema_metadata(None)


@contextlib.contextmanager
def _text_sink(path: str, storage: StorageConfig) -> Iterator[Any]:
    """A text file at `path` that appears whole or not at all (see the module docstring)."""
    if is_local(path):
        fs, local = filesystem_for(path, storage)
        with atomic_path(local) as temp, open(temp, "w", encoding="utf-8", newline="") as sink:
            yield sink
        return
    fs, remote = filesystem_for(path, storage)
    raw = fs.open(remote, "wb")
    sink = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    try:
        yield sink
        sink.flush()
    except BaseException:
        raw.discard()  # the multipart upload is abandoned: nothing appears
        raise
    sink.detach()
    raw.close()  # completes the upload: the object appears whole
