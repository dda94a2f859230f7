"""The manifest as Ray Data's source: read units of a `ManifestSource` -> blocks of the rows still to score.

In:  the opened manifest, its scan (duplicate marks), the sorted row_ids OUTPUT already holds, rows per block.
Out: a Ray Dataset read by one read task per read unit (a Parquet row group, or a slice of a listed/CSV
     manifest); each task streams its unit batch by batch (`cxrage_ray.manifest.stream.unit_batches`), and its
     rows are cut into blocks of one prepare task's rows as they come, so the first prepare task starts once the
     first unit is read, whatever the manifest's size, and the driver never holds the rows.

The first unit is read by two tasks: a head task yields its first `first_block_rows` rows still to score as a
block of their own, the other task the rest. Everything one task yields is joined into one block before it is
cut, so only a task of its own gives the predictor a small first block, and the first scored rows reach OUTPUT
after one small batch instead of a whole block's (issue 23).

The read tasks ask for no CPU (reading and shaping rows is light, and a head node without CPUs must still run
them); a request different from the prepare tasks' one CPU also keeps Ray Data from fusing the two, which would
run a whole row group's films inside one read task. Ray Data runs `READ_CONCURRENCY` of them at a time, so at most
that many units are held in memory. A local manifest is read on the driver's node, where the file is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.manifest.stream import ManifestScan, ManifestSource, unit_batches
from cxrage_ray.storage.files import is_local

#: Read units read at the same time (each holds one Parquet row group, ~65k rows, while it streams).
READ_CONCURRENCY = 2


def manifest_dataset(source: ManifestSource, scan: ManifestScan, done: np.ndarray, rows_per_block: int,
                     first_block_rows: int | None = None) -> Any:
    """A Ray Dataset of the manifest rows not in `done`, in blocks of `rows_per_block`, the first of
    `first_block_rows` (default: `rows_per_block`; see the module docstring)."""
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    units = [(start, rows) for start, rows in source.units() if _todo(done, start, rows)]
    # a listed/CSV manifest's rows go to the object store once, unit by unit, not into the read tasks' arguments
    frames = [None if source.frame is None else ray.put(source.frame.iloc[start:start + rows])
              for start, rows in units]
    light = ManifestSource(**{**source.__dict__, "frame": None})
    scan_ref, done_ref = ray.put(scan), ray.put(done)

    todo = [_todo(done, start, rows) for start, rows in units]  # rows still to score, per unit
    head = first_block_rows or rows_per_block
    # (unit, rows of it skipped, rows of it taken: None for the rest); the first unit split in head and rest
    tasks: list[tuple[int, int, int | None]] = [(i, 0, None) for i in range(len(units))]
    if units and 0 < head < min(rows_per_block, todo[0]):
        tasks[0:1] = [(0, 0, head), (0, head, None)]

    def read_unit(index: int, skip: int, take: int | None) -> Iterator[pd.DataFrame]:
        start, rows = units[index]
        unit_source = light if frames[index] is None else \
            ManifestSource(**{**light.__dict__, "frame": ray.get(frames[index]), "frame_start": start})
        yield from rows_between(unit_batches(unit_source, ray.get(scan_ref), start, rows, ray.get(done_ref)),
                                skip, take)

    def task_rows(index: int, skip: int, take: int | None) -> int:
        rows = todo[index] - skip
        return rows if take is None else min(take, rows)

    class ManifestRows(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            return [ReadTask(lambda task=task: read_unit(*task),
                             BlockMetadata(num_rows=task_rows(*task), size_bytes=None, exec_stats=None,
                                           input_files=None))
                    for task in tasks]

    here = None
    if source.frame is None and is_local(source.input):  # the file is on this machine only
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    rows = ray.data.read_datasource(ManifestRows(), num_cpus=0, concurrency=max(1, min(READ_CONCURRENCY, len(tasks))),
                                    override_num_blocks=max(1, len(tasks)), label_selector=here)
    # Ray Data joins what one read task yields into blocks of up to 128 MiB (a whole unit): cut them to one prepare
    # task's rows as they stream by
    return rows.repartition(target_num_rows_per_block=rows_per_block)


def rows_between(batches: Iterable[pd.DataFrame], skip: int, take: int | None) -> Iterator[pd.DataFrame]:
    """The rows of `batches` after the first `skip`, at most `take` of them (all: None), batch by batch; reading
    stops once `take` rows are out."""
    passed, left = 0, take
    for batch in batches:
        first = max(0, skip - passed)
        passed += len(batch)
        if first >= len(batch):
            continue
        part = batch.iloc[first:] if left is None else batch.iloc[first:first + left]
        if left is not None:
            left -= len(part)
        yield part.reset_index(drop=True)
        if left == 0:
            return


def _todo(done: np.ndarray, start: int, rows: int) -> int:
    """Rows of [start, start + rows) not in the sorted array `done`."""
    lo, hi = np.searchsorted(done, [start, start + rows])
    return int(rows - (hi - lo))
