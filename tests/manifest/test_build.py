"""manifest.py: folders/prefixes and CSV/Parquet manifests, locally and on S3 (moto on loopback)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrage_ray.errors import InputError
from cxrage_ray.contract import PROBLEM_COLUMN
from cxrage_ray.manifest.build import RESERVED_COLUMNS, build_manifest, is_image_name, write_manifest
from cxrage_ray.config import StorageConfig

LOCAL = StorageConfig()

#: A folder as archives arrive: images in sub-folders, DICOMs named by UID or without extension, clutter.
TREE = {
    "b/2.png": b"png",
    "a.JPG": b"jpg",
    "a/1.jpeg": b"jpeg",
    "c/scan.tif": b"tif",
    "c/scan2.TIFF": b"tiff",
    "d/x.dcm": b"dcm",
    "d/y.dicom": b"dicom",
    "d/z.dic": b"dic",
    "d/IM0001": b"noext",
    "d/1.2.840.113619.2.55.3": b"uid",
    "metadata.csv": b"uri\n",
    "m.parquet": b"PAR1",
    "info.json": b"{}",
    "README.md": b"#",
    "notes.txt": b"t",
    "thumbs.db": b"?",
    ".DS_Store": b"?",
    ".hidden/h.png": b"png",
    "b/._2.png": b"appledouble",
}
KEPT = sorted(["b/2.png", "a.JPG", "a/1.jpeg", "c/scan.tif", "c/scan2.TIFF", "d/x.dcm", "d/y.dicom", "d/z.dic",
               "d/IM0001", "d/1.2.840.113619.2.55.3"])


def _write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _check_contract(df: pd.DataFrame) -> None:
    assert list(df.columns[:3]) == ["row_id", "image_id", "uri"]
    assert str(df["row_id"].dtype) == "int64"
    assert df["row_id"].tolist() == list(range(len(df)))
    assert pd.api.types.is_string_dtype(df["image_id"]) and pd.api.types.is_string_dtype(df["uri"])
    assert df.loc[df[PROBLEM_COLUMN].isna(), "image_id"].is_unique
    assert pa.Schema.from_pandas(df, preserve_index=False).field("image_id").type in (pa.string(), pa.large_string())


@pytest.mark.parametrize("name,kept", [
    ("x.png", True), ("dir/X.DCM", True), ("IM0001", True), ("1.2.840.5", True), ("a/.b/c.png", False),
    (".x.png", False), ("m.csv", False), ("m.parquet", False), ("a.json", False), ("a.md", False),
    ("a.txt", False), ("a.zip", False),
])
def test_is_image_name(name, kept):
    assert is_image_name(name) is kept


# ---------------------------------------------------------------- local folder


def test_local_folder(tmp_path: Path):
    _write_tree(tmp_path, TREE)
    df = build_manifest(str(tmp_path), LOCAL)
    _check_contract(df)
    assert df["image_id"].tolist() == KEPT
    assert df["uri"].tolist() == [str(tmp_path / k) for k in KEPT]
    # a relative INPUT and a file:// INPUT list the same files
    old = os.getcwd()
    os.chdir(tmp_path.parent)
    try:
        rel = build_manifest(tmp_path.name + "/", LOCAL)
    finally:
        os.chdir(old)
    assert rel["uri"].tolist() == df["uri"].tolist()
    url = build_manifest(tmp_path.as_uri(), LOCAL)
    assert url["image_id"].tolist() == KEPT
    assert url["uri"].tolist() == [(tmp_path / k).as_uri() for k in KEPT]


def test_real_sample_folder(cxr_sample: Path):
    df = build_manifest(str(cxr_sample), LOCAL)
    _check_contract(df)
    images = sorted(p.relative_to(cxr_sample).as_posix() for p in cxr_sample.rglob("*")
                    if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(images) >= 250
    assert df["image_id"].tolist() == images  # metadata.csv skipped
    assert all(Path(u).is_file() for u in df["uri"])


def test_local_folder_errors(tmp_path: Path):
    with pytest.raises(InputError, match="input not found"):
        build_manifest(str(tmp_path / "missing"), LOCAL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files under"):
        build_manifest(str(tmp_path / "empty"), LOCAL)
    _write_tree(tmp_path / "docs", {"a.txt": b"x", "b.csv": b"uri\n", ".c.png": b"p"})
    with pytest.raises(InputError, match=r"no images in .*docs: 3 file\(s\) found"):
        build_manifest(str(tmp_path / "docs"), LOCAL)
    (tmp_path / "one.png").write_bytes(b"p")
    with pytest.raises(InputError, match="is a file"):
        build_manifest(str(tmp_path / "one.png"), LOCAL)


# ---------------------------------------------------------------- local manifests


def test_local_csv_manifest_relative_absolute_and_extras(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    csv = (
        "uri,age,sex,note\n"
        "imgs/a.png,61,F,\n"
        "./imgs/../imgs/b.png,70.5,M,x\n"
        f"{tmp_path}/imgs/c.png,55,F,y\n"
        f"{outside},40,M,z\n"
        "s3://bucket/remote/d.png,33,F,w\n"
    )
    (tmp_path / "m.csv").write_text(csv)
    df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    _check_contract(df)
    assert df["uri"].tolist() == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png"),
                                  str(tmp_path / "imgs/c.png"), str(outside), "s3://bucket/remote/d.png"]
    assert df["image_id"].tolist() == ["imgs/a.png", "imgs/b.png", "imgs/c.png", str(outside),
                                       "s3://bucket/remote/d.png"]
    # extra columns carried through with pandas' own reading of the CSV
    expected = pd.read_csv(io.StringIO(csv)).drop(columns=["uri"])
    assert list(df.columns[3:]) == ["age", "sex", "note", PROBLEM_COLUMN]
    pd.testing.assert_frame_equal(df[["age", "sex", "note"]], expected)


def test_image_ids_stay_text(tmp_path: Path):
    (tmp_path / "m.csv").write_text("image_id,uri,score\n00012,a.png,1\n12,b.png,2\n")
    df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    assert df["image_id"].tolist() == ["00012", "12"]
    assert df["score"].tolist() == [1, 2]


def test_local_parquet_manifest_with_image_id(tmp_path: Path):
    table = pa.table({
        "image_id": pa.array([7, 8, 9], pa.int64()),  # ids stored as numbers still come out as text
        "uri": ["x/1.dcm", "/abs/2.dcm", "gs://b/3.dcm"],
        "age": pa.array([60.0, None, 71.25]),
        "visit": pa.array(["2001-01-01", "2002-02-02", None]),
        "followup_years": pa.array([1, 2, 3], pa.int32()),
    })
    pq.write_table(table, tmp_path / "m.parquet")
    df = build_manifest(str(tmp_path / "m.parquet"), LOCAL)
    _check_contract(df)
    assert df["image_id"].tolist() == ["7", "8", "9"]
    assert df["uri"].tolist() == [str(tmp_path / "x/1.dcm"), "/abs/2.dcm", "gs://b/3.dcm"]
    assert df["age"].isna().tolist() == [False, True, False] and df["age"][2] == 71.25
    assert str(df["followup_years"].dtype) == "int32"
    assert df["visit"].tolist()[:2] == ["2001-01-01", "2002-02-02"]


@pytest.mark.parametrize("content,message", [
    ("path,age\na.png,3\n", "has no `uri` column \\(columns: path, age\\)"),
    ("uri,age\n", "has no rows"),
    ("", "is empty"),
    ("uri,status,raw,cxr_age\na.png,ok,1,2\n", "reserved for the output: status, cxr_age, raw"),
    ("uri,row_id\na.png,0\n", "reserved for the output: row_id"),
    ("uri,age\na.png,1\nb.png,1,2,3\n", "cannot parse manifest .*Expected 2 fields"),
])
def test_manifest_errors(tmp_path: Path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(InputError, match=message):
        build_manifest(str(tmp_path / "m.csv"), LOCAL)


@pytest.mark.parametrize("content,problems", [
    ("uri,image_id\na.png,x\nb.png,y\nc.png,x\nd.png,y\ne.png,z\n",
     [None, None, "row 2: duplicate image_id 'x' (also row 0)", "row 3: duplicate image_id 'y' (also row 1)", None]),
    ("uri\na.png\nsub/../a.png\n", [None, "row 1: duplicate image_id 'a.png' (also row 0)"]),
    ("uri,age\na.png,3\n,4\n  ,5\n", [None, "row 1: empty uri", "row 2: empty uri"]),
    ("uri,image_id\na.png,\nb.png,b\n,c\n", ["row 0: empty image_id", None, "row 2: empty uri"]),
    ("uri,image_id\n,x\na.png,x\n", ["row 0: empty uri", None]),  # a row that is no image claims no id
])
def test_bad_rows_are_marked_not_refused(tmp_path: Path, content, problems):
    """Every manifest row yields a row: bad rows carry their problem (naming the row) for the prepare stage."""
    (tmp_path / "m.csv").write_text(content)
    df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    _check_contract(df)
    assert [None if pd.isna(p) else p for p in df[PROBLEM_COLUMN]] == problems
    assert len(df) == len(content.strip().splitlines()) - 1


def test_bad_rows_keep_their_columns(tmp_path: Path):
    (tmp_path / "m.csv").write_text("uri,image_id,site\na.png,x,s1\n,y,s2\nb.png,x,s3\n")
    df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    assert df["site"].tolist() == ["s1", "s2", "s3"]
    assert df["image_id"].tolist() == ["x", "y", "x"]  # the duplicate keeps its id; row_id tells them apart
    assert pd.isna(df["uri"][1]) and df["uri"][2] == str(tmp_path / "b.png")


def test_write_manifest_drops_the_problem_column(tmp_path: Path):
    (tmp_path / "m.csv").write_text("uri,image_id\na.png,x\nb.png,x\n")
    df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    write_manifest(df, str(tmp_path / "again.parquet"), LOCAL)
    assert PROBLEM_COLUMN not in pq.read_table(tmp_path / "again.parquet").column_names
    again = build_manifest(str(tmp_path / "again.parquet"), LOCAL)
    assert again[PROBLEM_COLUMN].tolist()[1] == "row 1: duplicate image_id 'x' (also row 0)"


def test_folder_symlinks_are_not_inputs_file_symlinks_are(tmp_path: Path):
    _write_tree(tmp_path / "in", {"a/1.png": b"p"})
    _write_tree(tmp_path / "elsewhere", {"2.png": b"p", "3.png": b"p"})
    (tmp_path / "in" / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "in" / "linked.png").symlink_to(tmp_path / "elsewhere" / "2.png")
    df = build_manifest(str(tmp_path / "in"), LOCAL)
    assert df["image_id"].tolist() == ["a/1.png", "linked.png"]
    assert df[PROBLEM_COLUMN].isna().all()


def test_every_reserved_column_is_refused(tmp_path: Path):
    for name in RESERVED_COLUMNS:
        pd.DataFrame({"uri": ["a.png"], name: [1]}).to_parquet(tmp_path / "m.parquet")
        with pytest.raises(InputError, match=rf"reserved for the output: {name}"):
            build_manifest(str(tmp_path / "m.parquet"), LOCAL)


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(InputError, match="input not found: .*nope.parquet"):
        build_manifest(str(tmp_path / "nope.parquet"), LOCAL)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot parse manifest"):
        build_manifest(str(tmp_path / "bad.parquet"), LOCAL)


@pytest.mark.parametrize("name", ["manifest.parquet", "manifest.csv"])
def test_write_manifest_roundtrip(tmp_path: Path, name):
    _write_tree(tmp_path / "in", TREE)
    df = build_manifest(str(tmp_path / "in"), LOCAL)
    df["site"] = "A"
    write_manifest(df, str(tmp_path / "out" / name), LOCAL)
    again = build_manifest(str(tmp_path / "out" / name), LOCAL)
    _check_contract(again)
    assert again["image_id"].tolist() == df["image_id"].tolist()
    assert again["uri"].tolist() == df["uri"].tolist()
    assert again["site"].tolist() == ["A"] * len(df)


# ---------------------------------------------------------------- S3


def test_s3_prefix_listing(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("mf-prefix")
    for rel, data in TREE.items():
        s3_env.put(f"s3://{bucket}/archive/{rel}", data)
    s3_env.put(f"s3://{bucket}/archive-2/not-mine.png", b"x")  # shares the string prefix, not the folder
    for given in (f"s3://{bucket}/archive", f"s3://{bucket}/archive/"):
        df = build_manifest(given, cfg)
        _check_contract(df)
        assert df["image_id"].tolist() == KEPT
        assert df["uri"].tolist() == [f"s3://{bucket}/archive/{k}" for k in KEPT]
    with pytest.raises(InputError, match="input not found"):
        build_manifest(f"s3://{bucket}/no-such-prefix", cfg)
    s3_env.put(f"s3://{bucket}/docs/readme.md", b"#")
    with pytest.raises(InputError, match="no images in"):
        build_manifest(f"s3://{bucket}/docs", cfg)


def test_s3_csv_manifest_relative_and_absolute(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("mf-csv")
    s3_env.put(f"s3://{bucket}/study/manifest.csv", (
        "uri,age,event\n"
        "img/a.png,60,1\n"
        "../shared/b.dcm,61,0\n"
        f"s3://{bucket}/study/img/c.png,62,1\n"
        "s3://other-bucket/d.png,63,0\n"
    ).encode())
    df = build_manifest(f"s3://{bucket}/study/manifest.csv", cfg)
    _check_contract(df)
    assert df["uri"].tolist() == [f"s3://{bucket}/study/img/a.png", f"s3://{bucket}/shared/b.dcm",
                                  f"s3://{bucket}/study/img/c.png", "s3://other-bucket/d.png"]
    assert df["image_id"].tolist() == ["img/a.png", f"s3://{bucket}/shared/b.dcm", "img/c.png",
                                       "s3://other-bucket/d.png"]
    assert df["age"].tolist() == [60, 61, 62, 63] and df["event"].tolist() == [1, 0, 1, 0]


def test_s3_parquet_manifest_and_write_back(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("mf-parquet")
    sink = io.BytesIO()
    pq.write_table(pa.table({"uri": ["x/1.png", "/local/2.png"], "image_id": ["one", "two"],
                             "age": [50.5, 51.0]}), sink)
    s3_env.put(f"s3://{bucket}/m/in.parquet", sink.getvalue())
    df = build_manifest(f"s3://{bucket}/m/in.parquet", cfg)
    _check_contract(df)
    assert df["uri"].tolist() == [f"s3://{bucket}/m/x/1.png", "/local/2.png"]
    assert df["image_id"].tolist() == ["one", "two"] and df["age"].tolist() == [50.5, 51.0]
    write_manifest(df, f"s3://{bucket}/m/out.parquet", cfg)
    written = pq.read_table(io.BytesIO(s3_env.get(f"s3://{bucket}/m/out.parquet")))
    assert written.column_names == ["image_id", "uri", "age"]  # row_id is reserved: not written
    again = build_manifest(f"s3://{bucket}/m/out.parquet", cfg)
    assert again["uri"].tolist() == df["uri"].tolist() and again["image_id"].tolist() == ["one", "two"]


def test_s3_manifest_errors(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("mf-errors")
    with pytest.raises(InputError, match=f"input not found: s3://{bucket}/missing.csv"):
        build_manifest(f"s3://{bucket}/missing.csv", cfg)
    s3_env.put(f"s3://{bucket}/empty.csv", b"")
    with pytest.raises(InputError, match="is empty"):
        build_manifest(f"s3://{bucket}/empty.csv", cfg)
    s3_env.put(f"s3://{bucket}/nouri.csv", b"path\na.png\n")
    with pytest.raises(InputError, match="no `uri` column"):
        build_manifest(f"s3://{bucket}/nouri.csv", cfg)
    s3_env.put(f"s3://{bucket}/dup.csv", b"uri,image_id\na.png,same\nb.png,same\n")
    dup = build_manifest(f"s3://{bucket}/dup.csv", cfg)  # a row problem, not a refused job
    assert dup[PROBLEM_COLUMN].tolist()[1] == "row 1: duplicate image_id 'same' (also row 0)"


def test_relative_folder_with_dotdot(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    df = build_manifest("../imgs", StorageConfig())
    assert df["image_id"].tolist() == ["a.png"]
    assert df["uri"].tolist() == [str(tmp_path / "imgs" / "a.png")]


def test_uri_column_names_the_path_column_of_the_real_sample_manifest(cxr_sample):
    """The quick start: metadata.csv keeps its paths in `file`, relative to its own folder."""
    import os

    df = build_manifest(str(cxr_sample / "metadata.csv"), StorageConfig(), uri_column="file")
    assert len(df) == 250 and "file" not in df.columns
    assert all(os.path.isabs(u) and os.path.isfile(u) for u in df["uri"])
    assert df["image_id"].iloc[0].startswith("images/")
    assert df["age"].notna().all()  # carried through: the scorer's chronological age for these films


def test_uri_column_errors_say_what_to_do(tmp_path):
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(InputError, match="--uri-column"):
        build_manifest(str(tmp_path / "m.csv"), StorageConfig())
    with pytest.raises(InputError, match="no `path` column"):
        build_manifest(str(tmp_path / "m.csv"), StorageConfig(), uri_column="path")
    pd.DataFrame({"file": ["a.png"], "uri": ["b.png"]}).to_csv(tmp_path / "both.csv", index=False)
    with pytest.raises(InputError, match="both `file` and `uri`"):
        build_manifest(str(tmp_path / "both.csv"), StorageConfig(), uri_column="file")


def test_marked_rows_are_announced(tmp_path: Path, caplog):
    (tmp_path / "m.csv").write_text("uri,age\na.png,1\nb.png,2\n ,3\n")
    with caplog.at_level("WARNING", logger="cxrage_ray.manifest.build"):
        df = build_manifest(str(tmp_path / "m.csv"), LOCAL)
    assert df[PROBLEM_COLUMN].notna().sum() == 1
    assert "1 manifest row(s) name no readable image and become ManifestError rows (row 2: empty uri)" in caplog.text
