"""PACS in and out against a real Orthanc + DICOMweb plugin loaded with ../shared/data/dicom-sample:
QIDO-RS query -> manifest, WADO-RS scoring equal to scoring the files from disk, SR write-back (read back with
highdicom), no duplicate SR on rerun, the archive stopping mid-job, and paging through >= 2,000 instances.

One Orthanc for the module (started in ~2 s); the scoring tests use the shared local Ray (`ray_local`).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from checkpoints import random_state_dict, save_fastai_checkpoint
from orthanc_fixtures import ArchiveOutage, OrthancServer, orthanc_binary

from cxrage_ray.cli import EXIT_OK, EXIT_ROW_ERRORS, main
from cxrage_ray.config import StorageConfig, WriteBackConfig
from cxrage_ray.errors import InputError, ReadError
from cxrage_ray.pacs.dicomweb import (
    DicomwebAuth,
    InstanceRef,
    iter_pages,
    parse_instance_uri,
    parse_query,
    retrieve_instance_bytes,
)
from cxrage_ray.pacs.multipart import MultipartError, split_parts
from cxrage_ray.pacs.read import read_bytes
from cxrage_ray.pacs.writeback import (
    RECORDS_DIR,
    read_records,
    sr_instance_uid,
    write_back,
)

pytestmark = [pytest.mark.timeout(300)]


def RAY_SLOW(test):  # noqa: N802 - reads as a mark
    """Marks a test that scores through the shared local Ray (`ray`, `slow`)."""
    return pytest.mark.ray(pytest.mark.slow(test))

#: What a PACS can tell a chest radiograph by: CR/DX with BodyPartExamined CHEST.
CHEST_QUERY = "?Modality=CR,DX&BodyPartExamined=CHEST"


# ---------------------------------------------------------------- URLs and options (no server)


def test_query_and_instance_urls_parse():
    q = parse_query("dicomweb+https://pacs.example:8443/dicom-web/?Modality=CR,DX&StudyDate=20150101-20201231")
    assert q.root == "https://pacs.example:8443/dicom-web"
    assert q.filters == (("Modality", "CR,DX"), ("StudyDate", "20150101-20201231"))
    ref = InstanceRef("http://h:1/p", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert ref.uri == "dicomweb+http://h:1/p/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    assert parse_instance_uri(ref.uri) == ref
    with pytest.raises(InputError, match="credentials"):
        parse_query("dicomweb+https://user:secret@pacs/dicom-web/?Modality=CR")
    with pytest.raises(InputError, match="pages through"):
        parse_query("dicomweb+https://pacs/dicom-web/?Modality=CR&limit=10")


def test_credentials_from_env_are_redacted_and_kept_out_of_filesystems():
    storage = StorageConfig.from_env_and_pairs({"CXRAGE_DICOMWEB_TOKEN": "s3cr3t"}, ["anon=true"])
    assert "s3cr3t" not in repr(storage)
    # (config_kwargs: botocore's own retries off, so that storage.py counts every retry)
    assert storage.fs_options("s3") == {"anon": True, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    auth = DicomwebAuth.from_options(storage.options)
    assert auth.token == "s3cr3t" and "s3cr3t" not in repr(auth)
    explicit = StorageConfig.from_env_and_pairs({"CXRAGE_DICOMWEB_TOKEN": "env"}, ["dicomweb_token=flag"])
    assert DicomwebAuth.from_options(explicit.options).token == "flag"


def test_paging_advances_by_what_the_archive_returned():
    """An archive capping pages below our limit (Orthanc's LimitFindInstances) is still listed whole."""
    items = list(range(1234))
    calls = []

    def search(offset: int, limit: int) -> list:
        calls.append((offset, limit))
        return items[offset : offset + min(limit, 100)]  # the server caps at 100

    pages = list(iter_pages(search, page_size=500))
    assert [x for page in pages for x in page] == items
    assert calls[-1][0] == 1234  # stops on the first empty page


def test_multipart_parts_come_back_byte_for_byte():
    """WADO-RS answers are split by delimiter only: binary bodies holding CRLFs, dashes and bytes that look like
    headers come back unchanged; a part without headers, a preamble, transport padding and a quoted boundary too."""
    films = [b"\x00\r\n--not-it\r\n\r\nDICM\xff\r", b"\r\n\r\n", bytes(range(256)) * 3]
    body = (b"preamble\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\n" + films[0]
            + b"\r\n--b0und  \r\n\r\n" + films[1]
            + b"\r\n--b0und\r\nContent-Type: application/dicom\r\nContent-Length: 768\r\n\r\n" + films[2]
            + b"\r\n--b0und--\r\nepilogue")
    assert split_parts('multipart/related; type="application/dicom"; boundary="b0und"', body) == films
    assert split_parts("Multipart/Related; boundary=b0und", body) == films
    with pytest.raises(MultipartError, match="cut short"):
        split_parts("multipart/related; boundary=b0und", body[: body.index(films[2]) + 10])
    with pytest.raises(MultipartError, match="without a boundary"):
        split_parts("multipart/related", body)


def _output_with_one_dicomweb_row(output: Path, uri: str) -> None:
    """An OUTPUT holding one committed part with one ok row scored from `uri` (what write-back reads)."""
    import pyarrow as pa

    (output / "parts").mkdir(parents=True)
    row = {"row_id": 0, "uri": uri, "status": "ok", "cxr_age": 61.5, "raw": 0.1, "raw_sd": 0.02,
           "saliency_uri": None, "orientation": 0}
    pq.write_table(pa.Table.from_pylist([row], schema=pa.schema([
        ("row_id", pa.int64()), ("uri", pa.string()), ("status", pa.string()), ("cxr_age", pa.float32()),
        ("raw", pa.float32()), ("raw_sd", pa.float32()), ("saliency_uri", pa.string()),
        ("orientation", pa.int8())])), output / "parts" / "part-old-00000.parquet")


def test_records_of_older_outputs_in_parquet_still_count_as_stored(tmp_path):
    """An OUTPUT written before records became JSON Lines holds `records-*.parquet` (without the later
    sc_sop_instance_uid column): its reports count as already stored, so a rerun contacts no archive (this one
    listens nowhere: a store attempt would count as failed) and stores nothing twice."""
    import pyarrow as pa

    sha = "ab" * 32
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        root = f"http://127.0.0.1:{s.getsockname()[1]}/dicom-web"
    ref = InstanceRef(root, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    output = tmp_path / "out"
    _output_with_one_dicomweb_row(output, ref.uri)
    (output / RECORDS_DIR).mkdir(parents=True)
    old = {"row_id": [0], "sop_instance_uid": [ref.sop_instance_uid],
           "sr_sop_instance_uid": [sr_instance_uid(ref.sop_instance_uid, sha)], "archive": [root]}
    pq.write_table(pa.table(old), output / RECORDS_DIR / "records-0ld0ld00-00000001.parquet")

    summary = write_back(str(output), WriteBackConfig(), StorageConfig(retries=0), sha)
    assert (summary.stored, summary.already, summary.failed) == (0, 1, 0)
    records = read_records(str(output), StorageConfig()).to_pylist()
    assert records == [{**{k: v[0] for k, v in old.items()}, "sc_sop_instance_uid": None}]
    assert sorted(p.name for p in (output / RECORDS_DIR).iterdir()) == ["records-0ld0ld00-00000001.parquet"]


def test_records_are_json_lines_read_with_older_parquet_ones(tmp_path):
    """New records are JSON Lines (no `.parquet` under OUTPUT but the parts); `read_records` reads both kinds."""
    import pyarrow as pa

    from cxrage_ray.pacs.writeback import _recorded, _write_records

    output = tmp_path / "out"
    new = {"row_id": 1, "sop_instance_uid": "1.5", "sr_sop_instance_uid": "2.25.9", "archive": "http://a/dw",
           "sc_sop_instance_uid": "2.25.10"}
    _write_records(str(output), StorageConfig(), "abcd1234", 1, [new])
    written = list((output / RECORDS_DIR).iterdir())
    assert [p.name for p in written] == ["records-abcd1234-00000001.jsonl"]
    assert [json.loads(line) for line in written[0].read_text().splitlines()] == [new]
    pq.write_table(pa.table({"row_id": [0], "sop_instance_uid": ["1.4"], "sr_sop_instance_uid": ["2.25.8"],
                             "archive": ["http://a/dw"], "sc_sop_instance_uid": [None]}),
                   output / RECORDS_DIR / "records-0ld0ld00-00000001.parquet")
    records = read_records(str(output), StorageConfig()).to_pandas().sort_values("row_id")
    assert list(records["sr_sop_instance_uid"]) == ["2.25.8", "2.25.9"]
    assert _recorded(str(output), StorageConfig()) == {("2.25.8", "http://a/dw"), ("2.25.9", "http://a/dw")}


# ---------------------------------------------------------------- a real Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> OrthancServer:
    # Orthanc's default: no LimitFindInstances cap. With a cap N, Orthanc 1.10 + DICOMweb 1.7 answers at most
    # N + 1 instances per query whatever the offset (measured), so no client can page past it.
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), orthanc_binary())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loaded(orthanc: OrthancServer, dicom_sample: Path) -> pd.DataFrame:
    """The sample uploaded in index.csv order; returns index.csv plus `stored` (this file is the archive's
    copy of its SOP Instance UID: some files share one, and Orthanc keeps the first)."""
    index = pd.read_csv(dicom_sample / "index.csv", dtype=str, keep_default_na=False)
    answers = [orthanc.upload((dicom_sample / name).read_bytes()) for name in index["file"]]
    index["stored"] = [a["Status"] == "Success" for a in answers]
    return index


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    save_fastai_checkpoint(path, random_state_dict(seed=5), legacy=True, with_opt=False)
    return path


def _chest(index: pd.DataFrame) -> pd.DataFrame:
    return index[index["modality"].isin(["CR", "DX"]) & (index["body_part"] == "CHEST") & index["stored"]]


def test_qido_query_selects_exactly_the_chest_cr_dx_instances(orthanc, loaded, tmp_path):
    out = tmp_path / "manifest.parquet"
    assert main(["manifest", orthanc.dicomweb_root + "/" + CHEST_QUERY, str(out)]) == EXIT_OK
    manifest = pq.read_table(out).to_pandas()
    assert sorted(manifest["sop_instance_uid"]) == sorted(_chest(loaded)["sop_instance_uid"])
    assert manifest["image_id"].is_unique and (manifest["image_id"] == manifest["sop_instance_uid"]).all()
    for row in manifest.itertuples():
        ref = parse_instance_uri(row.uri)
        assert (ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid) == (
            row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
    # the archive holds more CR/DX (extremities, hips, a hand, chest films without BodyPartExamined)
    assert len(orthanc.qido_instances(Modality="CR,DX")) > len(manifest)


@pytest.fixture(scope="module")
def scored(orthanc, loaded, weights, dicom_sample, ray_local, tmp_path_factory) -> dict:
    """The chest query scored through DICOMweb with --write-back sr, and the same files scored from disk."""
    work = tmp_path_factory.mktemp("scored")
    common = ["--weights", str(weights), "--no-progress", "--rotation", "off", "--tta", "seed",
              "--keep-patient-id", "pepper"]
    query = orthanc.dicomweb_root + "/" + CHEST_QUERY
    code_web = main(["score", query, str(work / "web"), "--write-back", "sr", *common,
                     "--saliency", str(work / "saliency"), "--saliency-method", "gradcam", "--write-back-saliency"])
    disk = work / "disk"
    for name in _chest(loaded)["file"]:
        (disk / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dicom_sample / name, disk / name)
    # with saliency maps too, as the DICOMweb run: maps keep one scoring call on every thread (16-view passes),
    # where a run without them scores 8-view passes two at a time, and oneDNN may round those differently
    code_disk = main(["score", str(disk), str(work / "out-disk"), *common, "--saliency", str(work / "saliency-disk"),
                      "--saliency-method", "gradcam"])
    return {"query": query, "work": work, "common": common, "codes": (code_web, code_disk),
            "web": pq.read_table(work / "web" / "parts").to_pandas(),
            "disk": pq.read_table(work / "out-disk" / "parts").to_pandas()}


@RAY_SLOW
def test_scoring_via_dicomweb_equals_scoring_from_disk(scored, loaded):
    web, disk = scored["web"], scored["disk"]
    chest = _chest(loaded).set_index("file")
    disk["sop_instance_uid"] = disk["image_id"].map(chest["sop_instance_uid"])
    merged = web.merge(disk, on="sop_instance_uid", suffixes=("_web", "_disk"))
    assert len(merged) == len(web) == len(disk) == len(chest)
    assert (merged["status_web"] == merged["status_disk"]).all()
    ok = merged[merged["status_web"] == "ok"]
    assert len(ok) >= len(merged) - 1  # the corrupt J2K film (pylibjpeg-data_966) is the archive's copy
    np.testing.assert_array_equal(ok["cxr_age_web"].to_numpy(), ok["cxr_age_disk"].to_numpy())
    np.testing.assert_array_equal(ok["patient_id_hash_web"].to_numpy(), ok["patient_id_hash_disk"].to_numpy())
    assert web["study_instance_uid"].notna().all() and web["series_instance_uid"].notna().all()
    assert scored["codes"] == (EXIT_ROW_ERRORS, EXIT_ROW_ERRORS)
    # no patient identifiers in the Parquet
    text = web.astype(str).to_csv()
    assert "9RG1" not in text and "CompressedSamples" not in text


def _stored_reports(orthanc: OrthancServer) -> list[pydicom.Dataset]:
    """Every SR in the archive, retrieved by WADO-RS."""
    reports = []
    for item in orthanc.qido_instances(Modality="SR"):
        ref = InstanceRef(orthanc.dicomweb_root.removeprefix("dicomweb+"),
                          *(item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")))
        reports.append(pydicom.dcmread(io.BytesIO(retrieve_instance_bytes(ref.uri, StorageConfig()))))
    return reports


@RAY_SLOW
def test_reports_are_stored_with_value_units_and_references(scored, orthanc, loaded, dicom_sample):
    import highdicom as hd

    web = scored["web"]
    ok = web[web["status"] == "ok"].set_index("sop_instance_uid")
    summary = pd.read_json(scored["work"] / "web" / "_cxrage" / "summary.json", typ="series")
    assert summary["write_back"]["stored"] == len(ok) and summary["write_back"]["failed"] == 0
    reports = _stored_reports(orthanc)
    assert len(reports) == len(ok)
    sources = {row.sop_instance_uid: dicom_sample / row.file for row in _chest(loaded).itertuples()}
    for ds in reports:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        group = sr.content.get_image_measurement_groups()[0]
        source_ref = group.source_images[0].referenced_sop_instance_uid
        assert source_ref in ok.index
        age = group.get_measurements(name=hd.sr.CodedConcept("CXRAGE", "99CXRAGE", "CXR-Age"))[0]
        assert age.value == pytest.approx(ok.loc[source_ref, "cxr_age"], abs=1e-6)
        assert age.unit == hd.sr.CodedConcept("a", "UCUM", "year")
        sd = group.get_measurements(name=hd.sr.CodedConcept("386136009", "SCT", "Standard Deviation"))[0]
        assert sd.value > 0 and sd.unit.value == "a"
        texts = {e.value for e in ds.iterall() if e.keyword == "TextValue"}  # TID 4019 algorithm identification
        assert {"CXR-Age (Raghu et al. 2021)", f"weights_sha256={ok.loc[source_ref, 'weights_sha256']}"} <= texts
        assert ds.SOPInstanceUID == sr_instance_uid(source_ref, ok.loc[source_ref, "weights_sha256"])
        source = pydicom.dcmread(sources[source_ref], stop_before_pixels=True, force=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert (ds.PatientID or "") == (source.get("PatientID") or "")  # the ACR-NEMA film has none
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_ref


@RAY_SLOW
def test_saliency_overlays_are_stored_as_secondary_captures(scored, orthanc):
    """--write-back-saliency: the Grad-CAM overlay PNG of each upright film whose source states its
    PatientOrientation becomes an RGB Secondary Capture in the source's study."""
    from PIL import Image

    from cxrage_ray.pacs.writeback import read_records

    web = scored["web"].set_index("sop_instance_uid")
    records = read_records(str(scored["work"] / "web"), StorageConfig()).to_pandas()
    summary = pd.read_json(scored["work"] / "web" / "_cxrage" / "summary.json", typ="series")["write_back"]
    captures = records.dropna(subset=["sc_sop_instance_uid"])
    assert summary["saliency_stored"] == len(captures) >= 4  # the four RG1 chest films say ["L", "F"]
    assert summary["saliency_stored"] + summary["saliency_skipped"] == summary["stored"]
    for rec in captures.itertuples():
        found = orthanc.qido_instances(SOPInstanceUID=rec.sc_sop_instance_uid)
        assert len(found) == 1 and found[0]["0020000D"]["Value"][0] == web.loc[rec.sop_instance_uid, "study_instance_uid"]
        ref = InstanceRef(orthanc.dicomweb_root.removeprefix("dicomweb+"), found[0]["0020000D"]["Value"][0],
                          found[0]["0020000E"]["Value"][0], rec.sc_sop_instance_uid)
        ds = pydicom.dcmread(io.BytesIO(retrieve_instance_bytes(ref.uri, StorageConfig())))
        with Image.open(web.loc[rec.sop_instance_uid, "saliency_uri"]) as png:
            np.testing.assert_array_equal(ds.pixel_array, np.asarray(png.convert("RGB")))


@RAY_SLOW
def test_a_recursive_parquet_glob_reads_only_the_score_rows(scored):
    """After `--write-back sr`, ``read_parquet('OUTPUT/**/*.parquet')`` (DuckDB; globs do not skip `_cxrage`)
    yields exactly the rows `pd.read_parquet(OUTPUT)` does: the write-back records are JSON Lines."""
    import duckdb

    output = scored["work"] / "web"
    assert list((output / RECORDS_DIR).glob("records-*.jsonl"))  # the write-back did record its reports
    rows = pd.read_parquet(output)
    globbed = duckdb.sql(f"SELECT * FROM read_parquet('{output}/**/*.parquet')").df()
    assert len(globbed) == len(rows) == len(scored["web"])
    assert sorted(globbed["row_id"]) == sorted(rows["row_id"])
    assert set(globbed.columns) == set(rows.columns)


def test_instance_uris_and_paths_read_through_one_read_bytes(orthanc, loaded, dicom_sample, tmp_path):
    """`pacs.read.read_bytes` (what scoring reads with): a DICOMweb instance by WADO-RS, byte for byte the stored
    file, counting no retries when none happened; a local path through storage."""
    from cxrage_ray.storage.retries import RetryCounts

    stored = loaded[loaded["stored"]].iloc[0]
    item = orthanc.qido_instances(SOPInstanceUID=stored["sop_instance_uid"])[0]
    ref = InstanceRef(orthanc.dicomweb_root.removeprefix("dicomweb+"),
                      *(item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")))
    counts = RetryCounts()
    assert read_bytes(ref.uri, StorageConfig(), counts) == (dicom_sample / stored["file"]).read_bytes()
    assert counts == {}
    (tmp_path / "x.png").write_bytes(b"png")
    assert read_bytes(str(tmp_path / "x.png"), StorageConfig()) == b"png"
    missing = InstanceRef(ref.root, ref.study_instance_uid, ref.series_instance_uid, "1.2.3.999")
    with pytest.raises(ReadError, match=r"^not found: dicomweb\+http://"):
        read_bytes(missing.uri, StorageConfig())


@RAY_SLOW
def test_rerun_adds_no_second_report(scored, orthanc):
    before = len(orthanc.qido_instances(Modality="SR"))
    code = main(["score", scored["query"], str(scored["work"] / "web"), "--write-back", "sr", *scored["common"],
                 "--saliency", str(scored["work"] / "saliency"), "--saliency-method", "gradcam"])
    assert code == EXIT_ROW_ERRORS  # the corrupt film's error row stands
    summary = pd.read_json(scored["work"] / "web" / "_cxrage" / "summary.json", typ="series")
    assert summary["rows_scored_this_run"] == 0
    assert summary["write_back"]["stored"] == 0 and summary["write_back"]["already"] == before
    assert len(orthanc.qido_instances(Modality="SR")) == before
    # a query broad enough to match the reports still lists only the images
    out = scored["work"] / "all-cr-dx-sr.parquet"
    assert main(["manifest", orthanc.dicomweb_root + "/?Modality=CR,DX,SR", str(out)]) == EXIT_OK
    assert len(pq.read_table(out)) == len(orthanc.qido_instances(Modality="CR,DX"))


@RAY_SLOW
def test_archive_stopped_mid_job_then_resume_completes(scored, orthanc, weights, tmp_path):
    """Orthanc stops after answering 3 of the 9 retrieves: the other rows retry, then become ReadError rows;
    after a restart the resume (--retry-kinds ReadError) completes with one row per instance, equal to the
    uninterrupted run, and stores no second SR."""
    from dataclasses import replace

    from cxrage_ray.config import OrientConfig, RayConfig, ScoreConfig, WriteBackConfig
    from cxrage_ray.manifest.build import build_manifest, write_manifest
    from cxrage_ray.pipeline.itinerary import score
    from cxrage_ray.predict.predictor import PredictorConfig

    storage = StorageConfig(retries=2, backoff_s=0.05)
    reports_before = len(orthanc.qido_instances(Modality="SR"))
    outage = ArchiveOutage(orthanc, retrieves_before_stop=3)
    try:
        manifest = tmp_path / "manifest.parquet"
        write_manifest(build_manifest(outage.root + "/" + CHEST_QUERY, storage), str(manifest), storage)
        cfg = ScoreConfig(input=str(manifest), output=str(tmp_path / "out"), weights=str(weights), storage=storage,
                          predictor=PredictorConfig(tta="seed"), orient=OrientConfig(mode="off"),
                          ray=RayConfig(rows_per_task=1, no_progress_timeout_s=120), progress=False,
                          write_back=WriteBackConfig())
        try:
            down = score(cfg, tmp_path)
        finally:
            if orthanc.process is None:
                orthanc.start()
        web = scored["web"].sort_values("sop_instance_uid")
        assert down["rows_written"] == down["rows_total"] == len(web)
        rows = pq.read_table(tmp_path / "out" / "parts").to_pandas()
        read_errors = rows[rows["error"].fillna("").str.startswith("ReadError")]
        assert len(read_errors) == len(web) - 3  # retrieved before the outage: 3 rows
        assert read_errors["error"].str.contains("after 3 attempts").all()
        assert down["write_back"]["failed"] == (rows["status"] == "ok").sum()  # archive down: retried next run

        resumed = score(replace(cfg, retry_errors=("ReadError",)), tmp_path)
    finally:
        outage.close()
    rows = pq.read_table(tmp_path / "out" / "parts").to_pandas().sort_values("sop_instance_uid")
    assert resumed["complete"] and resumed["rows_unique"] == resumed["rows_written"] == len(web)
    assert list(rows["status"]) == list(web["status"])
    # rows scored in other batches than the uninterrupted run: fp32 sums differ in the last digits
    np.testing.assert_allclose(rows["cxr_age"].to_numpy(), web["cxr_age"].to_numpy(), atol=1e-4)
    # every report stored under its deterministic UID, which the archive already held: still one SR per instance
    assert resumed["write_back"]["stored"] == (web["status"] == "ok").sum()
    assert len(orthanc.qido_instances(Modality="SR")) == reports_before


def test_manifest_pages_through_2000_instances(orthanc, tmp_path):
    """2,000 small synthetic instances (new UIDs) in one study, uploaded in parallel by REST: `cxrage manifest`
    pages through them (limit 500 / offset) and lists each exactly once."""
    from dicomgen import make_dataset, to_bytes
    from pydicom.uid import generate_uid

    study = generate_uid()
    template = make_dataset(np.zeros((8, 8), np.uint16), modality="OT", StudyInstanceUID=study,
                            SeriesInstanceUID=generate_uid())
    files, uids = [], []
    for _ in range(2000):
        uid = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
        files.append(to_bytes(template))
        uids.append(uid)
    answers = orthanc.upload_many(files)
    assert all(a["Status"] == "Success" for a in answers)
    out = tmp_path / "big.parquet"
    assert main(["manifest", f"{orthanc.dicomweb_root}/?StudyInstanceUID={study}", str(out)]) == EXIT_OK
    listed = pq.read_table(out).to_pandas()
    assert len(listed) == 2000 and listed["sop_instance_uid"].is_unique
    assert set(listed["sop_instance_uid"]) == set(uids)
