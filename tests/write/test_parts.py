"""The write stage without Ray: whole Parquet parts, the resume record, and `--retry-errors`' part rewrite."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from cxrage_ray.errors import InputError, OutputError
from cxrage_ray.contract import output_schema
from cxrage_ray.write.parts import (
    completed_row_ids,
    drop_error_rows,
    part_records,
    read_output,
    write_json,
    write_part,
)
from cxrage_ray.write.pending import conform
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
    for k, start in enumerate((0, 4, 8)):
        write_part(output, f"part-x-{k:05d}.parquet", _rows(list(range(start, min(start + 4, 10))), errors), SCHEMA,
                   storage)


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
        write_part(str(tmp_path / "out"), "part-x-00000.parquet", pa.table({"row_id": [0], "status": ["ok"]}), SCHEMA,
                   StorageConfig())
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
    write_part(str(out), "part-x-00000.parquet", pa.table({"row_id": [0, 1], "status": ["ok", "ok"]}), SCHEMA,
               StorageConfig())
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


def test_drop_error_rows_rewrites_the_parts_records(tmp_path):
    """summary.json is made from the parts' footers: a rewritten part carries the record of what it now holds."""
    out, storage = str(tmp_path / "out"), StorageConfig()
    _write_parts(out, storage, ERRORS)
    before = {name: r for name, r in part_records(out, storage)}
    assert [before[n].errors_by_kind for n in sorted(before)] == [
        {"DecodeError": 1, "ReadError": 1}, {}, {"ReadError": 2}]
    assert before["part-x-00000.parquet"].first_errors[0]["row_id"] == 1
    drop_error_rows(out, storage, ("ReadError",))
    after = dict(part_records(out, storage))
    assert sorted(after) == ["part-x-00000.parquet", "part-x-00001.parquet"]
    assert after["part-x-00000.parquet"].rows == 3 and after["part-x-00000.parquet"].errors_by_kind == {
        "DecodeError": 1}


def test_a_part_of_an_older_release_is_read_for_its_record(tmp_path):
    """Parts written before records have no footer record: their small columns give it instead."""
    import pyarrow.parquet as pq

    out = tmp_path / "out" / "parts"
    out.mkdir(parents=True)
    pq.write_table(conform(_rows([0, 1, 2], {1: "ReadError: gone"}), SCHEMA), out / "part-old-00000.parquet")
    [(name, record)] = part_records(str(tmp_path / "out"), StorageConfig())
    assert name == "part-old-00000.parquet"
    assert (record.rows, record.ok, record.errors_by_kind) == (3, 2, {"ReadError": 1})
    assert record.first_errors == [{"row_id": 1, "image_id": "img-1", "uri": None, "error": "ReadError: gone"}]


def _refusing_output(tmp_path) -> str:
    """An OUTPUT whose parts/ cannot be created: a file stands where the folder would be."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "parts").write_text("not a folder")
    return str(out)


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
