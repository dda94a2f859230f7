"""What a part holds, in a few hundred bytes: the record a writer hands the driver instead of the rows.

In:  a table of scored rows in the output contract (`part_record`), or a part's Parquet file (`read_part_record`:
     its footer; a part of an older release, which has none, is read from its small columns).
Out: `PartRecord`: rows, ok/error counts, errors by kind, QC flag counts, the first error rows by row_id. It is
     stored in the part's own footer (`RECORD_KEY`), so summary.json is made from the parts' footers, not rows.

Records add up (`merged`): the part a commit makes from several pending blocks carries the sum of theirs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import error_kind
from cxrage_ray.runtime.console import ERRORS_NAMED
from cxrage_ray.storage.files import filesystem_for

#: The Parquet key-value metadata key of a part's record.
RECORD_KEY = b"cxrage.part_record"
#: The columns a record is made from (what a part of an older release is read for).
RECORD_COLUMNS = ["row_id", "image_id", "uri", "status", "error", "qc"]


@dataclass
class PartRecord:
    """The counts of one part (or of several, `merged`); see the module docstring."""

    rows: int = 0
    ok: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    qc_flags: dict[str, int] = field(default_factory=dict)
    #: the part's first `ERRORS_NAMED` error rows by row_id: {row_id, image_id, uri, error}
    first_errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.rows - self.ok

    def merged(self, other: PartRecord) -> PartRecord:
        """The record of both parts' rows together."""
        first = sorted(self.first_errors + other.first_errors, key=lambda row: row["row_id"])[:ERRORS_NAMED]
        return PartRecord(rows=self.rows + other.rows, ok=self.ok + other.ok,
                          errors_by_kind=_add(self.errors_by_kind, other.errors_by_kind),
                          qc_flags=_add(self.qc_flags, other.qc_flags), first_errors=first)

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "ok": self.ok, "errors_by_kind": self.errors_by_kind,
                           "qc_flags": self.qc_flags, "first_errors": self.first_errors}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PartRecord:
        data = json.loads(text)
        return cls(rows=int(data["rows"]), ok=int(data["ok"]), errors_by_kind=dict(data["errors_by_kind"]),
                   qc_flags=dict(data["qc_flags"]), first_errors=list(data["first_errors"]))

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> PartRecord | None:
        """The record a part's footer holds, or None (a part written before records)."""
        if not metadata or RECORD_KEY not in metadata:
            return None
        return cls.from_json(metadata[RECORD_KEY])


def part_record(table: pa.Table) -> PartRecord:
    """The record of a table of scored rows (columnar: no Python loop over the rows but the error rows')."""
    status = table.column("status")
    errors = table.filter(pc.equal(status, "error"))
    kinds = Counter(error_kind(text or "Error: ?") for text in errors.column("error").to_pylist())
    flags: dict[str, int] = {}
    if "qc" in table.column_names and len(table):
        flat = pc.list_flatten(table.column("qc"))
        if len(flat):
            counts = pc.value_counts(flat)
            flags = {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(),
                                                    counts.field("counts").to_pylist())}
    first = errors.select([c for c in ("row_id", "image_id", "uri", "error") if c in errors.column_names])
    first = first.sort_by("row_id").slice(0, ERRORS_NAMED).to_pylist()
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return PartRecord(rows=len(table), ok=ok, errors_by_kind=dict(sorted(kinds.items())),
                      qc_flags=dict(sorted(flags.items())), first_errors=first)


def read_part_record(uri: str, storage: StorageConfig) -> PartRecord:
    """The record of the Parquet file at `uri`: its footer's, or (a part written before records) made from its
    `RECORD_COLUMNS`."""
    fs, path = filesystem_for(uri, storage)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        record = PartRecord.from_metadata(parquet.schema_arrow.metadata)
        if record is None:
            present = [c for c in RECORD_COLUMNS if c in parquet.schema_arrow.names]
            record = part_record(parquet.read(columns=present))
    return record


def with_record(table: pa.Table, record: PartRecord) -> pa.Table:
    """`table` whose schema metadata carries `record` (written into the part's footer)."""
    metadata = dict(table.schema.metadata or {})
    metadata[RECORD_KEY] = record.to_json().encode()
    return table.replace_schema_metadata(metadata)


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    total = Counter(a)
    total.update(b)
    return dict(sorted(total.items()))
