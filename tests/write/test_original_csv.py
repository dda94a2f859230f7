"""`--csv`: the original tool's CSV streamed from the parts in row order, pass by pass, whole or not at all."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import cxrage_ray.write.original_csv as original_csv
from cxrage_ray.config import StorageConfig
from cxrage_ray.contract import output_schema
from cxrage_ray.write.original_csv import write_original_csv
from cxrage_ray.write.parts import write_part

SCHEMA = output_schema(pa.schema([]))
LOCAL = StorageConfig()


def _output(out: str, storage: StorageConfig) -> pd.DataFrame:
    """Three parts whose row_ids interleave (as concurrent commit windows do); every 4th row an error."""
    rng = np.random.default_rng(3)
    ids = rng.permutation(30)
    rows = pd.DataFrame({"row_id": ids, "image_id": [f"sub/f{i:02d}.png" for i in ids],
                         "status": ["error" if i % 4 == 0 else "ok" for i in ids],
                         "raw_sd": rng.normal(size=30), "cxr_age": rng.uniform(20, 90, size=30)})
    for k in range(3):
        chunk = pa.Table.from_pandas(rows.iloc[10 * k:10 * (k + 1)], preserve_index=False)
        write_part(out, f"part-x-{k:05d}.parquet", chunk, SCHEMA, storage)
    return rows


def _expected(rows: pd.DataFrame) -> str:
    """The CSV as the one-shot writer made it from the whole table."""
    ok = rows[rows["status"] == "ok"].sort_values("row_id").reset_index(drop=True)
    return ok.rename(columns={"image_id": "File", "raw_sd": "SD_Prediction", "cxr_age": "CXR_Age"})[
        ["File", "SD_Prediction", "CXR_Age"]].to_csv(index=True)


@pytest.mark.parametrize("rows_per_pass", [1_000_000, 7, 1])
def test_the_csv_is_the_ok_rows_in_row_order_whatever_the_passes(tmp_path, rows_per_pass):
    out, path = str(tmp_path / "out"), tmp_path / "orig.csv"
    rows = _output(out, LOCAL)
    assert write_original_csv(out, str(path), LOCAL, rows_per_pass=rows_per_pass) == 22
    assert path.read_text() == _expected(rows)
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["Unnamed: 0", "File", "SD_Prediction", "CXR_Age"]


def test_demo_weights_say_so_on_every_line_and_an_empty_output_has_the_header(tmp_path):
    out = str(tmp_path / "out")
    _output(out, LOCAL)
    write_original_csv(out, str(tmp_path / "demo.csv"), LOCAL, weights_name="demo", rows_per_pass=5)
    assert set(pd.read_csv(tmp_path / "demo.csv")["Weights"]) == {"demo"}
    write_original_csv(str(tmp_path / "empty"), str(tmp_path / "empty.csv"), LOCAL)
    assert (tmp_path / "empty.csv").read_text() == ",File,SD_Prediction,CXR_Age\n"


def test_a_csv_interrupted_half_way_leaves_nothing(tmp_path, monkeypatch):
    out, path = str(tmp_path / "out"), tmp_path / "orig.csv"
    _output(out, LOCAL)
    real, calls = original_csv._ok_rows, []

    def fails_in_the_second_pass(uri, start, stop, storage):
        calls.append(start)
        if start > 0:
            raise OSError("the disk went away")
        return real(uri, start, stop, storage)

    monkeypatch.setattr(original_csv, "_ok_rows", fails_in_the_second_pass)
    with pytest.raises(OSError):
        write_original_csv(out, str(path), LOCAL, rows_per_pass=10)
    assert not path.exists() and os.listdir(tmp_path) == ["out"]


def test_on_object_storage_the_csv_appears_whole_or_not_at_all(s3_env, monkeypatch):
    storage = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("csv")
    out = f"s3://{bucket}/job"
    rows = _output(out, storage)
    write_original_csv(out, f"s3://{bucket}/orig.csv", storage, rows_per_pass=4)
    assert s3_env.get(f"s3://{bucket}/orig.csv").decode() == _expected(rows)

    monkeypatch.setattr(original_csv, "_lines", lambda *a, **k: (_ for _ in ()).throw(OSError("interrupted")))
    with pytest.raises(OSError):
        write_original_csv(out, f"s3://{bucket}/broken.csv", storage)
    assert pd.read_csv(io.BytesIO(s3_env.get(f"s3://{bucket}/orig.csv"))).shape[0] == 22
    with pytest.raises(Exception):
        s3_env.get(f"s3://{bucket}/broken.csv")
