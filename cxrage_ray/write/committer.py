"""The driver's side of the write stage: block records in, parts committed; never a row.

In:  `BlockRecord`s as Ray Data delivers them from the scoring actors (`cxrage_ray.write.pending`).
Out: parts under OUTPUT/parts, each made by a `commit_pending` task from the pending files of one commit window:
     every `part_rows` rows or `commit_every_s` seconds, whichever comes first (the first windows shorter: 1 s,
     doubling), so a killed driver loses at most that window. The run's totals for summary.json (rows committed,
     storage retries, audit deltas) come from the records.

A commit runs as a task (`submit`: a Ray task on a cluster, a thread in tests), so several can be in flight
while blocks keep arriving; `flush` waits for them all. A part OUTPUT refuses is kept in the local spill and the
job stops with `OutputError`, as before.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import OutputError
from cxrage_ray.predict.precision_audit import AuditTally
from cxrage_ray.storage.retries import error_reason
from cxrage_ray.write.pending import BlockRecord, commit_pending
from cxrage_ray.write.records import PartRecord
from cxrage_ray.write.spill import Spill

#: The first part's commit window (seconds); each part doubles it, up to `PartCommitter.commit_every_s`.
FIRST_COMMIT_WINDOW_S = 1.0

#: Starts `commit_pending(pending, part_uri, storage)` somewhere and returns its future.
Submit = Callable[[list[str], str, StorageConfig], Future]


def commit_here(pending: list[str], part: str, storage: StorageConfig) -> Future:
    """Commit in this process, now (tests and tools without Ray); the finished future."""
    done: Future = Future()
    try:
        done.set_result(commit_pending(pending, part, storage))
    except Exception as exc:
        done.set_exception(exc)
    return done


def commit_on_ray(pending: list[str], part: str, storage: StorageConfig) -> Future:
    """Commit as a Ray task: no CPU reserved (a few reads and one write), retried if its worker dies (the task is
    idempotent); the rows move between the store and a worker, never through the driver."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=3)(commit_pending)
    return task.remote(pending, part, storage).future()


@dataclass
class PartCommitter:
    """See the module docstring. `add`, `flush` and `flush_if_due` may be called from two threads (the driver's
    loop and the timer of `committing_on_time`)."""

    output: str
    storage: StorageConfig
    submit: Submit
    part_rows: int = 10_000
    commit_every_s: float = 30.0
    spill: Spill | None = None
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    parts_written: int = 0
    rows_written: int = 0
    rows_received: int = 0
    retries: Counter = field(default_factory=Counter)
    audit: AuditTally = field(default_factory=AuditTally)
    failure: OutputError | None = None
    _pending: list[str] = field(default_factory=list)
    _pending_rows: int = 0
    _oldest_at: float = 0.0
    _window_s: float = FIRST_COMMIT_WINDOW_S
    _in_flight: list[tuple[Future, str, int]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def add(self, block: BlockRecord) -> None:
        """Take one block's record; start a commit when the window is full or old enough.

        Raises:
            OutputError: OUTPUT refused a block or a part (now or in an earlier commit); the job must stop.
        """
        with self._lock:
            self._harvest()
            self._raise_failure()
            self.rows_received += block.record.rows
            self.retries.update(block.retries)
            self.audit.take(block.audit_deltas, block.audit_precisions)
            if block.refused:
                self.failure = self._refused(block.refused, f"part-{self.run}-b{uuid.uuid4().hex[:8]}.parquet",
                                             block.data, block.record.rows)
                raise self.failure
            if not self._pending_rows:
                self._oldest_at = time.monotonic()
            self._pending.append(block.pending)
            self._pending_rows += block.record.rows
            if self._pending_rows >= self.part_rows or self._due():
                self._commit()

    def flush(self) -> None:
        """Commit every block received and wait for every commit (raises `OutputError` as `add` does)."""
        with self._lock:
            self._raise_failure()
            self._commit()
            running = [future for future, _, _ in self._in_flight]
        wait(running)  # outside the lock, so the timer thread is not held up meanwhile
        with self._lock:
            self._harvest()
            self._raise_failure()

    def flush_if_due(self) -> None:
        """Start a commit if the window's oldest block has waited long enough; a failure is kept for `add`."""
        with self._lock:
            self._harvest()
            if self.failure is None and self._due():
                self._commit()

    @property
    def commit_window_s(self) -> float:
        """How long the oldest received block may wait now (grows from 1 s to `commit_every_s`)."""
        return min(self._window_s, self.commit_every_s)

    def _due(self) -> bool:
        return bool(self._pending_rows) and time.monotonic() - self._oldest_at >= self.commit_window_s

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _commit(self) -> None:
        if not self._pending:
            return
        name = f"part-{self.run}-{self.parts_written:05d}.parquet"
        part = f"{self.output.rstrip('/')}/parts/{name}"
        self._in_flight.append((self.submit(list(self._pending), part, self.storage), name, self._pending_rows))
        self._pending, self._pending_rows = [], 0
        self.parts_written += 1
        self._window_s = min(2 * self._window_s, self.commit_every_s)

    def _harvest(self) -> None:
        """Count the commits that finished; the first refusal becomes the failure (its rows in the spill)."""
        still = []
        for future, name, rows in self._in_flight:
            if not future.done():
                still.append((future, name, rows))
                continue
            try:
                result = future.result()
            except Exception as exc:  # the commit task failed: its rows are in no part, the rerun scores them
                self.failure = self.failure or OutputError(
                    f"committing {name} failed: {error_reason(exc)}; {rows} scored rows were not committed and "
                    "the rerun scores them")
                continue
            if "refused" in result:
                self.failure = self.failure or self._refused(result["refused"], name, result["data"], rows)
            else:
                self.rows_written += PartRecord.from_json(result["record"]).rows
        self._in_flight = still

    def _refused(self, reason: str, name: str, data: bytes, rows: int) -> OutputError:
        """Keep refused rows in the spill; the error says why OUTPUT refused them and where the rows are."""
        reason = f"{reason}; the job stopped at the first part OUTPUT refused"
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
def committing_on_time(committer: PartCommitter, tick_s: float | None = None) -> Iterator[PartCommitter]:
    """Within the block, a timer thread starts `committer`'s commits once the oldest block has waited its window,
    also while no new block arrives (a slow stage must not keep scored rows uncommitted indefinitely)."""
    stop = threading.Event()
    tick = tick_s if tick_s is not None else min(1.0, committer.commit_every_s / 4)

    def run() -> None:
        while not stop.wait(tick):
            committer.flush_if_due()

    timer = threading.Thread(target=run, name="cxrage-commit-timer", daemon=True)
    timer.start()
    try:
        yield committer
    finally:
        stop.set()
        timer.join()
