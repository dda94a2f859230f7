"""manifest/stream.py: the manifest read batch by batch gives the rows `build_manifest` gives, scanned in bounded
memory (duplicates, fingerprint), minus the rows already scored; resume's finished rows from OUTPUT's parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import PROBLEM_COLUMN, output_schema
from cxrage_ray.manifest import stream
from cxrage_ray.manifest.build import build_manifest, open_manifest
from cxrage_ray.manifest.stream import legacy_fingerprint, manifest_batches, scan_manifest
from cxrage_ray.write.parts import completed_row_id_array, completed_row_ids, write_part

LOCAL = StorageConfig()


def _manifest(path: Path, rows: int, row_group: int) -> Path:
    """`rows` rows over 7 uris (some relative), ids unique but for a repeat every 1000 rows and a blank every 997."""
    ids = [f"id{i}" for i in range(rows)]
    for i in range(1000, rows, 1000):
        ids[i] = f"id{i - 999}"  # repeats an earlier row's id: a duplicate
    uris = [f"sub/p{i % 7}.png" if i % 2 else f"/abs/p{i % 7}.png" for i in range(rows)]
    for i in range(5, rows, 997):
        uris[i] = "  "
    pq.write_table(pa.table({"image_id": ids, "uri": uris, "site": [f"s{i % 3}" for i in range(rows)]}), path,
                   row_group_size=row_group)
    return path


def _old_rules(path: Path) -> pd.DataFrame:
    """What the rows must be, by the rules stated plainly over the whole table (independent of the stream)."""
    table = pq.read_table(path).to_pandas()
    problems, seen = [], {}
    for row, (image_id, uri) in enumerate(zip(table["image_id"], table["uri"])):
        if not uri.strip():
            problems.append(f"row {row}: empty uri")
        elif image_id in seen:
            problems.append(f"row {row}: duplicate image_id {image_id!r} (also row {seen[image_id]})")
        else:
            seen[image_id] = row
            problems.append(None)
    return pd.DataFrame({"problem": problems})


def test_streamed_rows_match_the_rules_across_row_groups_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SCAN_BATCH_ROWS", 1_000)  # many batches per row group, and across them
    path = _manifest(tmp_path / "m.parquet", 25_000, row_group=4_096)
    source = open_manifest(str(path), LOCAL)
    assert source.frame is None and source.num_rows == 25_000 and len(source.units()) == 7  # nothing read yet
    scan = scan_manifest(source)
    rows = pd.concat(list(manifest_batches(source, scan)), ignore_index=True)
    assert rows["row_id"].tolist() == list(range(25_000))
    expected = _old_rules(path)["problem"].tolist()
    assert [None if pd.isna(p) else p for p in rows[PROBLEM_COLUMN]] == expected
    assert scan.problems == sum(p is not None for p in expected)
    assert rows["uri"][1] == str(tmp_path / "sub" / "p1.png") and rows["uri"][0] == "/abs/p0.png"
    assert rows["site"].tolist()[:4] == ["s0", "s1", "s2", "s0"]


def test_rows_already_scored_are_left_out_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SCAN_BATCH_ROWS", 1_000)
    path = _manifest(tmp_path / "m.parquet", 12_000, row_group=5_000)
    source = open_manifest(str(path), LOCAL)
    scan = scan_manifest(source)
    whole = pd.concat(list(manifest_batches(source, scan)), ignore_index=True)
    done = np.unique(np.r_[np.arange(0, 9_000), np.arange(9_500, 9_600), [11_999]]).astype(np.int64)
    rest = pd.concat(list(manifest_batches(source, scan, done)), ignore_index=True)
    assert rest["row_id"].tolist() == sorted(set(range(12_000)) - set(done.tolist()))
    # a duplicate keeps its mark when the row it repeats was scored in an earlier run
    pd.testing.assert_frame_equal(rest, whole[~whole["row_id"].isin(done)].reset_index(drop=True))
    assert rest.loc[rest["row_id"] == 10_000, PROBLEM_COLUMN].item() == \
        "row 10000: duplicate image_id 'id9001' (also row 9001)"


def test_fingerprint_same_for_any_batching_and_legacy_fingerprint_kept(tmp_path, monkeypatch):
    path = _manifest(tmp_path / "m.parquet", 3_000, row_group=1_000)
    source = open_manifest(str(path), LOCAL)
    fingerprint = scan_manifest(source).fingerprint
    monkeypatch.setattr(stream, "SCAN_BATCH_ROWS", 77)
    assert scan_manifest(source).fingerprint == fingerprint
    assert fingerprint.startswith(stream.FINGERPRINT_PREFIX)
    # the number earlier releases recorded: pandas' row hashes of the whole frame, summed
    whole = build_manifest(str(path), LOCAL)
    hashed = pd.util.hash_pandas_object(whole[["row_id", "image_id", "uri"]].astype(str), index=False)
    assert legacy_fingerprint(source) == f"{int(hashed.sum()) & (2**64 - 1):016x}"
    changed = tmp_path / "changed.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "uri", pa.array(["/other.png"] + table["uri"].to_pylist()[1:])), changed)
    assert scan_manifest(open_manifest(str(changed), LOCAL)).fingerprint != fingerprint


def test_the_scan_grows_by_bytes_a_row_not_by_the_rows(tmp_path):
    """Duplicates across the whole manifest from one uint64 per row (and a sorted copy while they are found): the
    scan of twice the rows peaks at ~16 bytes a row more, not at the rows' text (~100 B a row as Python objects)."""
    import tracemalloc

    peaks = []
    for rows in (100_000, 300_000):
        source = open_manifest(str(_manifest(tmp_path / f"m{rows}.parquet", rows, row_group=65_536)), LOCAL)
        tracemalloc.start()
        scan = scan_manifest(source)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(scan.duplicate_rows) == rows // 1000 - 1
    assert peaks[1] - peaks[0] < 24 * 200_000 + 2**20, peaks


@pytest.mark.parametrize("name", ["m.csv", "folder"])
def test_listed_and_csv_manifests_stream_from_their_frame(tmp_path, name):
    (tmp_path / "folder").mkdir()
    for i in range(5):
        (tmp_path / "folder" / f"{i}.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("uri,image_id,age\n" + "".join(f"folder/{i}.png,{i % 4},{i}\n" for i in range(5)))
    source = open_manifest(str(tmp_path / name), LOCAL)
    assert source.frame is not None
    rows = pd.concat(list(manifest_batches(source, scan_manifest(source))), ignore_index=True)
    pd.testing.assert_frame_equal(rows, build_manifest(str(tmp_path / name), LOCAL))
    assert rows["uri"].tolist() == [str(tmp_path / "folder" / f"{i}.png") for i in range(5)]


def test_finished_rows_read_from_the_parts_row_id_column(tmp_path):
    out = str(tmp_path / "out")
    for start in range(0, 1_000, 100):
        ids = np.arange(start, start + 100)[::-1]  # rows arrive out of order
        write_part(out, f"part-x-{start:05d}.parquet", pa.table({"row_id": ids, "status": ["ok"] * 100}),
                   output_schema(pa.schema([])), LOCAL)
    done = completed_row_id_array(out, LOCAL)
    assert done.dtype == np.int64 and done.tolist() == list(range(1_000))
    assert completed_row_ids(out, LOCAL) == set(range(1_000))
    assert completed_row_id_array(str(tmp_path / "empty"), LOCAL).tolist() == []
