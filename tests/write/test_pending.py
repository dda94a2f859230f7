"""Rows written where they are scored, without Ray: pending blocks, the commit that makes a part of them, and why
no row is ever seen twice (a retried commit, an uncommitted block, a driver killed between write and commit)."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import PRECISION_DELTA_COLUMN, RETRIES_COLUMN, output_schema
from cxrage_ray.errors import OutputError
from cxrage_ray.write.parts import completed_row_ids, part_records
from cxrage_ray.write.pending import PENDING_DIR, BlockRecord, PendingWrite, clear_pending, commit_pending, write_pending

SCHEMA = output_schema(pa.schema([pa.field("site", pa.string())]))
LOCAL = StorageConfig()


def _scored(row_ids: list[int], errors: dict[int, str] = {}) -> pd.DataFrame:  # noqa: B006 (never mutated)
    """A scoring actor's output batch: the contract's columns and the two the writer reads and drops."""
    return pd.DataFrame({
        "row_id": row_ids,
        "image_id": [f"img-{i}" for i in row_ids],
        "uri": [f"s3://b/{i}.png" for i in row_ids],
        "status": ["error" if i in errors else "ok" for i in row_ids],
        "error": [errors.get(i) for i in row_ids],
        "cxr_age": [None if i in errors else 40.0 + i for i in row_ids],
        "qc": [["lateral_suspect"] if i % 3 == 0 else [] for i in row_ids],
        "site": ["north"] * len(row_ids),
        RETRIES_COLUMN: ['{"SlowDown": 1}' if i == 0 else "{}" for i in row_ids],
        PRECISION_DELTA_COLUMN: [0.01 if i == 0 else float("nan") for i in row_ids],
        "device": ["cuda/bfloat16"] * len(row_ids),
    })


def test_a_block_is_pending_until_committed_and_readers_never_see_it(tmp_path):
    out = str(tmp_path / "out")
    write = PendingWrite(out, SCHEMA, LOCAL, run="r1")
    block = write_pending(_scored([0, 1, 2], {2: "DecodeError: bad"}), write)
    assert block.pending.startswith(f"{out}/{PENDING_DIR}/r1/") and os.path.exists(block.pending)
    assert (block.record.rows, block.record.ok, block.record.errors_by_kind) == (3, 2, {"DecodeError": 1})
    assert block.record.qc_flags == {"lateral_suspect": 1}
    assert block.retries == {"SlowDown": 1}
    assert block.audit_deltas == [0.01] and block.audit_precisions == ["bfloat16"]
    again = BlockRecord.from_row(block.as_row())  # what Ray Data carries to the driver
    assert again.record == block.record and again.pending == block.pending
    # pending: in no reader's view and not done for resume
    assert completed_row_ids(out, LOCAL) == set()
    assert len(pd.read_parquet(out)) == 0  # nothing outside `_`-prefixed folders yet
    assert RETRIES_COLUMN not in pq.read_schema(block.pending).names  # not an output column


def test_commit_makes_one_part_with_the_blocks_record_and_deletes_them(tmp_path):
    out = str(tmp_path / "out")
    write = PendingWrite(out, SCHEMA, LOCAL, run="r1")
    blocks = [write_pending(_scored([0, 1]), write), write_pending(_scored([2, 3], {3: "ReadError: gone"}), write)]
    result = commit_pending([b.pending for b in blocks], f"{out}/parts/part-r1-00000.parquet", LOCAL)
    assert not any(os.path.exists(b.pending) for b in blocks)
    [(name, record)] = part_records(out, LOCAL)
    assert name == "part-r1-00000.parquet" and record.rows == 4 and record.errors_by_kind == {"ReadError": 1}
    assert record.first_errors[0]["row_id"] == 3 and record.to_json() == result["record"]
    rows = pd.read_parquet(out)
    assert sorted(rows["row_id"]) == [0, 1, 2, 3] and list(rows.columns) == SCHEMA.names


def test_a_retried_commit_leaves_its_rows_once(tmp_path):
    """Ray retries a commit task whose worker died after the part was written: the part is not written again
    and what is left of its pending files goes."""
    out = str(tmp_path / "out")
    write = PendingWrite(out, SCHEMA, LOCAL, run="r1")
    blocks = [write_pending(_scored([0, 1]), write), write_pending(_scored([2]), write)]
    part = f"{out}/parts/part-r1-00000.parquet"
    commit_pending([b.pending for b in blocks], part, LOCAL)
    before = os.stat(part).st_mtime_ns
    assert commit_pending([b.pending for b in blocks], part, LOCAL)["record"]  # the retry
    assert os.stat(part).st_mtime_ns == before
    assert sorted(pd.read_parquet(out)["row_id"]) == [0, 1, 2]


def test_blocks_no_commit_names_are_deleted_by_the_next_run_and_counted_nowhere(tmp_path):
    """A scoring task Ray retried (its first attempt's block is named by no record), or a driver killed between
    a block's write and its commit: the block is never read, and the next run deletes it and scores its rows."""
    out = str(tmp_path / "out")
    write = PendingWrite(out, SCHEMA, LOCAL, run="r1")
    committed = write_pending(_scored([0, 1]), write)
    orphan = write_pending(_scored([0, 1]), write)  # the same rows again: a retried task's first attempt
    uncommitted = write_pending(_scored([2, 3]), write)  # the driver died before its commit
    commit_pending([committed.pending], f"{out}/parts/part-r1-00000.parquet", LOCAL)
    assert sorted(pd.read_parquet(out)["row_id"]) == [0, 1]
    assert completed_row_ids(out, LOCAL) == {0, 1}
    assert clear_pending(out, LOCAL) == 2
    assert not os.path.exists(orphan.pending) and not os.path.exists(uncommitted.pending)
    assert sorted(pd.read_parquet(out)["row_id"]) == [0, 1]


def test_a_block_output_refuses_carries_its_rows_back(tmp_path):
    out = tmp_path / "out"
    (out / "_cxrage").mkdir(parents=True)
    (out / "_cxrage" / "pending").write_text("not a folder")
    block = write_pending(_scored([0, 1]), PendingWrite(str(out), SCHEMA, LOCAL, run="r1"))
    assert block.pending == "" and block.refused.startswith("cannot write")
    assert pq.read_table(pa.BufferReader(block.data)).column("row_id").to_pylist() == [0, 1]


def test_a_pending_block_another_node_wrote_to_its_own_disk_is_a_clear_error(tmp_path):
    with pytest.raises(OutputError, match="folder every node mounts"):
        commit_pending([str(tmp_path / "out" / PENDING_DIR / "r1" / "gone.parquet")],
                       str(tmp_path / "out" / "parts" / "part-r1-00000.parquet"), LOCAL)


def test_a_refused_part_comes_back_as_bytes_for_the_spill(tmp_path):
    out = tmp_path / "out"
    block = write_pending(_scored([0, 1]), PendingWrite(str(out), SCHEMA, LOCAL, run="r1"))
    (out / "parts").write_text("not a folder")
    result = commit_pending([block.pending], str(out / "parts" / "part-r1-00000.parquet"), LOCAL)
    assert result["refused"].startswith("cannot write")
    assert pq.read_table(pa.BufferReader(result["data"])).column("row_id").to_pylist() == [0, 1]


def test_pending_blocks_and_parts_on_object_storage(s3_env):
    storage = StorageConfig.from_env_and_pairs(os.environ, [])
    out = f"s3://{s3_env.make_bucket('pending')}/job"
    write = PendingWrite(out, SCHEMA, storage, run="r1")
    blocks = [write_pending(_scored([0, 1]), write), write_pending(_scored([2]), write)]
    stray = write_pending(_scored([5]), write)
    commit_pending([b.pending for b in blocks], f"{out}/parts/part-r1-00000.parquet", storage)
    assert completed_row_ids(out, storage) == {0, 1, 2}
    assert clear_pending(out, storage) == 1
    assert [r.rows for _, r in part_records(out, storage)] == [3]
    assert stray.pending.startswith(f"{out}/{PENDING_DIR}/")
