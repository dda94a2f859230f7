"""pipeline/manifest_reads.py on a real local Ray: the read tasks stream every row still to score exactly once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import PROBLEM_COLUMN
from cxrage_ray.manifest.build import open_manifest
from cxrage_ray.manifest.stream import scan_manifest
from cxrage_ray.pipeline.manifest_reads import manifest_dataset, rows_between

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.mark.parametrize("name", ["m.parquet", "m.csv"])
def test_rows_still_to_score_come_once_each_in_blocks(ray_local, tmp_path, name):
    rows = 5_000
    table = pa.table({"image_id": [f"id{i % 4_990}" for i in range(rows)],
                      "uri": [f"p{i % 9}.png" for i in range(rows)], "age": np.arange(rows, dtype=np.float64)})
    if name.endswith(".parquet"):
        pq.write_table(table, tmp_path / name, row_group_size=1_500)  # 4 read units
    else:
        table.to_pandas().to_csv(tmp_path / name, index=False)
    source = open_manifest(str(tmp_path / name), StorageConfig())
    scan = scan_manifest(source)
    done = np.r_[np.arange(0, 1_600), np.arange(4_000, 4_100)].astype(np.int64)
    blocks = list(manifest_dataset(source, scan, done, 64, first_block_rows=16).iter_batches(
        batch_format="pandas", batch_size=None))
    got = pd.concat(blocks, ignore_index=True).sort_values("row_id").reset_index(drop=True)
    assert got["row_id"].tolist() == sorted(set(range(rows)) - set(done.tolist()))
    assert max(len(b) for b in blocks) <= 64
    # the first rows still to score come in a small block of their own, the rest of their unit after them
    assert [b["row_id"].tolist() for b in blocks if b["row_id"].iloc[0] == 1_600] == [list(range(1_600, 1_616))]
    assert any(b["row_id"].iloc[0] == 1_616 for b in blocks)
    assert got.loc[got["row_id"] == 4_990, PROBLEM_COLUMN].item() == "row 4990: duplicate image_id 'id0' (also row 0)"
    assert got["uri"].iloc[0] == str(tmp_path / "p7.png") and got["age"].iloc[0] == 1_600.0


def test_rows_between_skips_and_takes_across_batches():
    batches = [pd.DataFrame({"row_id": range(start, start + 5)}) for start in range(0, 20, 5)]
    rows = lambda skip, take: [r for b in rows_between(iter(batches), skip, take) for r in b["row_id"]]  # noqa: E731
    assert rows(0, 3) == [0, 1, 2]
    assert rows(3, 4) == [3, 4, 5, 6]
    assert rows(7, None) == list(range(7, 20))
    assert rows(10, 100) == list(range(10, 20))
    assert rows(25, None) == []
    consumed = []
    def counted():
        for batch in batches:
            consumed.append(batch["row_id"].iloc[0])
            yield batch
    assert [r for b in rows_between(counted(), 0, 6) for r in b["row_id"]] == list(range(6))
    assert consumed == [0, 5]  # reading stopped once the rows were out
