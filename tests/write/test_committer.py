"""The driver's commits without Ray: commit windows (every `part_rows` rows or `commit_every_s` seconds), the
timer, the run's totals from block records, and a refused part kept in the spill."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

import pandas as pd
import pyarrow as pa
import pytest

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import output_schema
from cxrage_ray.errors import OutputError
from cxrage_ray.write.committer import PartCommitter, commit_here, committing_on_time
from cxrage_ray.write.parts import commit_part, completed_row_ids
from cxrage_ray.write.pending import PendingWrite, write_pending
from cxrage_ray.write.spill import Spill

SCHEMA = output_schema(pa.schema([]))
LOCAL = StorageConfig()


def _committer(out: str, **kwargs) -> tuple[PartCommitter, PendingWrite]:
    committer = PartCommitter(out, LOCAL, commit_here, **kwargs)
    return committer, PendingWrite(out, SCHEMA, LOCAL, committer.run)


def _block(write: PendingWrite, row_ids: list[int]):
    return write_pending(pd.DataFrame({"row_id": row_ids, "status": ["ok"] * len(row_ids),
                                       "read_retries": ['{"SlowDown": 2}'] * len(row_ids)}), write)


def test_blocks_become_parts_of_part_rows_and_the_totals_add_up(tmp_path):
    out = str(tmp_path / "out")
    committer, write = _committer(out, part_rows=4, commit_every_s=1e9)
    for start in range(0, 10, 2):
        committer.add(_block(write, [start, start + 1]))
    assert completed_row_ids(out, LOCAL) == set(range(8))  # two windows of 4 rows committed, 2 rows waiting
    committer.flush()
    assert completed_row_ids(out, LOCAL) == set(range(10))
    assert sorted(os.listdir(f"{out}/parts")) == [f"part-{committer.run}-{k:05d}.parquet" for k in range(3)]
    assert (committer.rows_received, committer.rows_written) == (10, 10)
    assert committer.retries == {"SlowDown": 20}
    assert os.listdir(f"{out}/_cxrage/pending/{committer.run}") == []


def test_rows_are_committed_on_time_even_when_no_block_arrives(tmp_path):
    out = str(tmp_path / "out")
    committer, write = _committer(out, part_rows=10_000, commit_every_s=1.0)
    with committing_on_time(committer, tick_s=0.05):
        added = time.monotonic()
        committer.add(_block(write, [0, 1]))
        if time.monotonic() - added < 0.9:  # a busy machine may take the whole window before this look
            assert completed_row_ids(out, LOCAL) == set()  # the first window (1 s) is not over
        deadline = time.monotonic() + 10
        while not completed_row_ids(out, LOCAL) and time.monotonic() < deadline:
            time.sleep(0.05)  # no add() now: only the timer can commit
        assert completed_row_ids(out, LOCAL) == {0, 1}
        committer.add(_block(write, [2]))
    committer.flush()
    assert completed_row_ids(out, LOCAL) == {0, 1, 2} and committer.rows_written == 3


def test_the_first_commit_windows_are_short_and_grow_to_commit_every(tmp_path):
    committer, write = _committer(str(tmp_path / "out"), commit_every_s=30.0)
    windows = []
    for i in range(8):
        windows.append(committer.commit_window_s)
        committer.add(_block(write, [i]))
        committer.flush()
    assert windows == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_flush_waits_for_commits_still_running(tmp_path):
    """Ctrl-C and the end of a run flush: every block received is in a part before the driver goes on."""
    out = str(tmp_path / "out")
    release = threading.Event()

    def slow_commit(pending, part, storage) -> Future:
        done: Future = Future()

        def run() -> None:
            release.wait(5)
            done.set_result(commit_here(pending, part, storage).result())

        threading.Thread(target=run, daemon=True).start()
        return done

    committer = PartCommitter(out, LOCAL, slow_commit, part_rows=1)
    write = PendingWrite(out, SCHEMA, LOCAL, committer.run)
    committer.add(_block(write, [0]))
    committer.add(_block(write, [1]))
    assert committer.rows_written == 0  # both commits are running
    threading.Timer(0.2, release.set).start()
    committer.flush()
    assert committer.rows_written == 2 and completed_row_ids(out, LOCAL) == {0, 1}


def test_a_refused_part_is_spilled_and_the_failure_sticks(tmp_path):
    out = tmp_path / "out"
    spill = Spill(tmp_path / "spill", str(out), {"manifest_fingerprint": "abc"})
    committer, write = _committer(str(out), part_rows=2, spill=spill)
    block = _block(write, [0, 1])
    (out / "parts").write_text("not a folder")  # OUTPUT refuses parts from now on
    with pytest.raises(OutputError, match="cannot write .*parts/part-.* 2 scored rows are kept in"):
        committer.add(block)
        committer.flush()
    assert [p.name for p in spill.parts()] == [f"part-{committer.run}-00000.parquet"]
    with pytest.raises(OutputError):  # the job must stop: later blocks are refused too, not dropped quietly
        committer.add(_block(write, [2]))
    os.remove(out / "parts")  # OUTPUT is writable again: the rerun commits the spilled rows first
    assert spill.restore(lambda name, data: commit_part(str(out), name, data, LOCAL)) == 1
    assert completed_row_ids(str(out), LOCAL) == {0, 1}


def test_a_commit_task_that_fails_stops_the_job_and_says_the_rows_are_scored_again(tmp_path):
    def broken(pending, part, storage) -> Future:
        done: Future = Future()
        done.set_exception(RuntimeError("worker died"))
        return done

    committer = PartCommitter(str(tmp_path / "out"), LOCAL, broken, part_rows=1)
    write = PendingWrite(str(tmp_path / "out"), SCHEMA, LOCAL, committer.run)
    committer.add(_block(write, [0]))
    with pytest.raises(OutputError, match="1 scored rows were not committed and the rerun scores them"):
        committer.flush()
