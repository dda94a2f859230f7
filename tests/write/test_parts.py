"""The write stage without Ray: whole Parquet parts, the resume record, and `--retry-errors`' part rewrite."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from cxrage_ray.errors import InputError, OutputError
from cxrage_ray.contract import output_schema
from cxrage_ray.write.parts import (
    PartWriter,
    commit_part,
    committing_on_time,
    conform,
    completed_row_ids,
    drop_error_rows,
    read_output,
    write_json,
)
from cxrage_ray.write.spill import Spill
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import list_files

SCHEMA = output_schema(pa.schema([pa.field("site", pa.string())]))


def _rows(row_ids: list[int], errors: dict[int, str]) -> pa.Table:
    """Scored rows: `errors` maps row_id -> error text; every other row is ok with an age."""
    return pa.table({
        "row_id": pa.array(row_ids, pa.int64()),
        "image_id": [f"img-{i}" for i in row_ids],
        "status": ["error" if i in errors else "ok" for i in row_ids],
        "error": [errors.get(i) for i in row_ids],
        "cxr_age": [None if i in errors else 40.0 + i for i in row_ids],
        "site": ["north"] * len(row_ids),
    })


def _write_parts(output: str, storage: StorageConfig, errors: dict[int, str]) -> None:
    """Ten rows in three parts of 4, 4 and 2 rows."""
    writer = PartWriter(output, SCHEMA, storage, part_rows=4)
    for start in (0, 4, 8):
        writer.add(_rows(list(range(start, min(start + 4, 10))), errors))
    writer.flush()


ERRORS = {
    1: "ReadError: not found: s3://b/1.png",
    2: "DecodeError: cannot identify image",
    8: "ReadError: throttled (SlowDown) after 5 retries",
    9: "ReadError: not found: s3://b/9.png",
}


def test_parts_are_whole_and_resume_reads_their_row_ids(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(InputError):
        read_output(out, StorageConfig())
    assert completed_row_ids(out, StorageConfig()) == set()
    _write_parts(out, StorageConfig(), ERRORS)
    assert len(list_files(f"{out}/parts", StorageConfig())) == 3
    assert completed_row_ids(out, StorageConfig()) == set(range(10))
    table = read_output(out, StorageConfig())
    assert table.column("row_id").to_pylist() == list(range(10))
    assert table.schema.names[-1] == "site"  # manifest columns carried after the contract
    assert not [name for name in os.listdir(tmp_path / "out" / "parts") if not name.endswith(".parquet")]


def test_drop_error_rows_of_one_kind(tmp_path):
    out, storage = str(tmp_path / "out"), StorageConfig()
    _write_parts(out, storage, ERRORS)
    assert drop_error_rows(out, storage, ("ReadError",)) == 3
    # the part holding only ReadError rows (8, 9) is gone; the others were rewritten without them
    assert len(list_files(f"{out}/parts", storage)) == 2
    assert completed_row_ids(out, storage) == set(range(10)) - {1, 8, 9}
    kept = read_output(out, storage).to_pandas().set_index("row_id")
    assert kept.loc[2, "error"].startswith("DecodeError")
    assert kept.loc[0, "cxr_age"] == 40.0 and kept.loc[0, "site"] == "north"
    assert drop_error_rows(out, storage, ("ReadError",)) == 0  # nothing left of that kind


def test_drop_every_error_row(tmp_path):
    out, storage = str(tmp_path / "out"), StorageConfig()
    _write_parts(out, storage, ERRORS)
    assert drop_error_rows(out, storage) == 4
    table = read_output(out, storage)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("row_id").to_pylist() == [0, 3, 4, 5, 6, 7]
    assert drop_error_rows(str(tmp_path / "never-written"), storage) == 0


def test_drop_error_rows_on_object_storage(s3_env):
    storage = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("sink-retry")
    out = f"s3://{bucket}/job"
    _write_parts(out, storage, ERRORS)
    assert drop_error_rows(out, storage, ("ReadError", "DecodeError")) == 4
    assert completed_row_ids(out, storage) == {0, 3, 4, 5, 6, 7}
    assert len(list_files(f"{out}/parts", storage)) == 2


def test_files_and_folders_follow_the_umask(tmp_path):
    """mkstemp makes 0600 files; a part or record must get what `open()` would give it under the umask."""
    from cxrage_ray.write.parts import record_uri, write_json

    old = os.umask(0o022)
    try:
        writer = PartWriter(str(tmp_path / "out"), SCHEMA, StorageConfig(), part_rows=1)
        writer.add(pa.table({"row_id": [0], "status": ["ok"]}))
        write_json(str(tmp_path / "out"), "job.json", {"a": 1}, StorageConfig())
        os.umask(0o027)
        write_json(str(tmp_path / "out"), "summary.json", {"a": 1}, StorageConfig())
    finally:
        os.umask(old)
    part = next((tmp_path / "out" / "parts").glob("*.parquet"))
    assert oct(part.stat().st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(record_uri(str(tmp_path / "out"), "job.json")).st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "out" / "parts").stat().st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(record_uri(str(tmp_path / "out"), "summary.json")).st_mode & 0o777) == oct(0o640)
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]


def test_records_live_under_cxrage_and_old_top_level_records_are_moved(tmp_path):
    """pandas reads OUTPUT as a dataset only when nothing but Parquet is outside `_`-prefixed folders."""
    import json

    import pandas as pd

    from cxrage_ray.write.parts import RECORDS_DIR, move_legacy_records, read_json, write_json

    out = tmp_path / "out"
    writer = PartWriter(str(out), SCHEMA, StorageConfig(), part_rows=2)
    writer.add(pa.table({"row_id": [0, 1], "status": ["ok", "ok"]}))
    (out / "job.json").write_text(json.dumps({"old": True}))  # an output written before _cxrage/
    (out / "summary.json").write_text(json.dumps({"rows_ok": 2}))
    assert read_json(str(out), "job.json", StorageConfig()) == {"old": True}  # found at the old place
    assert move_legacy_records(str(out), StorageConfig()) == ["job.json", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == [RECORDS_DIR, "parts"]
    assert read_json(str(out), "summary.json", StorageConfig()) == {"rows_ok": 2}
    write_json(str(out), "job.json", {"new": True}, StorageConfig())
    assert read_json(str(out), "job.json", StorageConfig()) == {"new": True}
    assert sorted(pd.read_parquet(out)["row_id"]) == [0, 1]


def test_conform_rebuilds_columns_ray_carried_as_pickled_objects():
    """The quick start's metadata.csv has text columns that are all null in some blocks: Ray Data then carries
    them as pickled Python objects, which a plain cast cannot turn into text ("Invalid UTF8 payload")."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    pickled = ArrowPythonObjectArray.from_objects(["00012975_000.png", float("nan"), None])
    table = pa.table({"row_id": [0, 1, 2], "site": pickled})
    with pytest.raises(pa.ArrowInvalid):
        table.column("site").cast(pa.string())
    conformed = conform(table, SCHEMA)
    assert conformed.column("site").to_pylist() == ["00012975_000.png", None, None]
    assert conformed.schema == SCHEMA


def test_rows_are_committed_on_time_even_when_no_batch_arrives(tmp_path):
    out = str(tmp_path / "out")
    writer = PartWriter(out, SCHEMA, StorageConfig(), part_rows=10_000, commit_every_s=0.3)
    with committing_on_time(writer, tick_s=0.05):
        writer.add(_rows([0, 1], {}))
        assert completed_row_ids(out, StorageConfig()) == set()  # far below part_rows: buffered
        deadline = time.monotonic() + 5
        while not completed_row_ids(out, StorageConfig()) and time.monotonic() < deadline:
            time.sleep(0.05)  # no add() now: only the timer can commit
        assert completed_row_ids(out, StorageConfig()) == {0, 1}
        writer.add(_rows([2], {}))
    writer.flush()
    assert completed_row_ids(out, StorageConfig()) == {0, 1, 2}
    assert writer.rows_written == 3


def test_a_batch_arriving_late_commits_the_rows_that_waited(tmp_path):
    out = str(tmp_path / "out")
    writer = PartWriter(out, SCHEMA, StorageConfig(), part_rows=10_000, commit_every_s=0.2)
    writer.add(_rows([0], {}))
    time.sleep(0.3)
    writer.add(_rows([1], {}))  # the oldest row waited past commit_every_s: both go out now
    assert completed_row_ids(out, StorageConfig()) == {0, 1}


def _refusing_output(tmp_path) -> str:
    """An OUTPUT whose parts/ cannot be created: a file stands where the folder would be."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "parts").write_text("not a folder")
    return str(out)


def test_a_refused_part_is_spilled_and_the_failure_sticks(tmp_path):
    out = _refusing_output(tmp_path)
    spill = Spill(tmp_path / "spill", out, {"manifest_fingerprint": "abc"})
    writer = PartWriter(out, SCHEMA, StorageConfig(), part_rows=2, spill=spill)
    with pytest.raises(OutputError, match="cannot write .*parts/part-.* 2 scored rows are kept in"):
        writer.add(_rows([0, 1], {}))
    assert [p.name for p in spill.parts()] == [f"part-{writer.run_id}-00000.parquet"]
    with pytest.raises(OutputError):  # the job must stop: later batches are refused too, not dropped quietly
        writer.add(_rows([2], {}))
    with pytest.raises(OutputError):
        writer.flush()

    os.remove(f"{out}/parts")  # OUTPUT is writable again: the rerun commits the spilled rows first
    assert spill.restore(lambda name, data: commit_part(out, name, data, StorageConfig())) == 1
    assert completed_row_ids(out, StorageConfig()) == {0, 1}
    assert spill.parts() == [] and not spill.folder.exists()


def test_spilled_rows_of_another_job_are_left_alone(tmp_path):
    out = str(tmp_path / "out")
    Spill(tmp_path / "spill", out, {"manifest_fingerprint": "old"}).keep("part-x-00000.parquet", b"PAR1")
    other = Spill(tmp_path / "spill", out, {"manifest_fingerprint": "new"})
    assert other.parts() == []
    assert other.restore(lambda name, data: pytest.fail("another job's rows were committed")) == 0
    assert (other.folder / "part-x-00000.parquet").exists()


def test_a_refused_record_is_an_output_error(tmp_path):
    out = _refusing_output(tmp_path)
    os.remove(f"{out}/parts")
    (tmp_path / "out" / "_cxrage").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write .*_cxrage/job.json"):
        write_json(out, "job.json", {"a": 1}, StorageConfig())


def test_the_first_commit_windows_are_short_and_grow_to_commit_every(tmp_path):
    writer = PartWriter(str(tmp_path / "out"), SCHEMA, StorageConfig(), commit_every_s=30.0)
    windows = []
    for i in range(8):
        windows.append(writer.commit_window_s)
        writer.add(_rows([i], {}))
        writer.flush()
    assert windows == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_ctrl_c_during_a_write_keeps_the_rows_for_the_last_flush(tmp_path, monkeypatch):
    import cxrage_ray.write.parts as sink

    out = str(tmp_path / "out")
    writer = PartWriter(out, SCHEMA, StorageConfig(), part_rows=2)
    real_write, calls = sink.write_bytes, []

    def interrupted_once(uri, data, storage):
        calls.append(uri)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_write(uri, data, storage)

    monkeypatch.setattr(sink, "write_bytes", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        writer.add(_rows([0, 1], {}))
    writer.flush()  # what the pipeline's Ctrl-C handler does
    assert completed_row_ids(out, StorageConfig()) == {0, 1}
    assert calls[0] == calls[1]  # the same part name: whole, once
