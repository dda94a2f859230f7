"""Write-back: CXR-Age of each ok DICOMweb row -> a DICOM Structured Report stored in the archive (STOW-RS).

In:  OUTPUT (committed parts of a `cxrage score` run whose rows came from DICOMweb instance URIs), a
     `WriteBackConfig` and the weights' sha256.
Out: one Comprehensive 3D SR per ok row (TID 1500 Measurement Report: CXR-Age in years, its SD in years when
     TTA gave one, the model and weights sha256 as the algorithm identification, a reference to the source
     image; patient and study modules copied from the source, so the archive files it in the source's study),
     plus OUTPUT/_cxrage/sr/records-<run>-<seq>.jsonl (JSON Lines) listing what was stored (row_id,
     sop_instance_uid, sr_sop_instance_uid, archive, sc_sop_instance_uid). With `saliency`, each row's saliency
     overlay is also stored as an RGB Secondary Capture in the source's study (upright films whose source states
     its PatientOrientation; others are counted in `saliency_skipped`).

Reruns and resumes never duplicate a report: the SR's SOP Instance UID is derived from the source SOP
Instance UID and the weights sha256 (`sr_instance_uid`), so storing it again names the same instance, and
rows already recorded under OUTPUT/_cxrage/sr are skipped. A row whose report could not be stored is counted in
`failed` and left unrecorded, so the next run tries it again.

The records are JSON Lines, not Parquet, so that only score parts match ``OUTPUT/**/*.parquet`` (DuckDB, Spark
and other recursive globs do not skip `_cxrage`). Outputs of older versions hold ``records-*.parquet``: those are
still read (`read_records`), so a rerun on such an OUTPUT stores no report twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrage_ray.config import StorageConfig, WriteBackConfig
from cxrage_ray.pacs.dicomweb import (
    DicomwebAuth,
    InstanceRef,
    client_for,
    is_instance_uri,
    parse_instance_uri,
    parse_query,
    retrieve_instance_metadata,
    translated,
)
from cxrage_ray.storage.files import list_files, read_bytes, write_bytes
from cxrage_ray.storage.retries import with_retries

log = logging.getLogger(__name__)

RECORDS_DIR = "_cxrage/sr"  # out of the data set: `pd.read_parquet(OUTPUT)` reads the parts only
#: What one record holds (the columns of `read_records`).
RECORD_SCHEMA = pa.schema([("row_id", pa.int64()), ("sop_instance_uid", pa.string()),
                           ("sr_sop_instance_uid", pa.string()), ("archive", pa.string()),
                           ("sc_sop_instance_uid", pa.string())])
#: Records written now; `LEGACY_RECORDS_SUFFIX` files (older outputs) are still read.
RECORDS_SUFFIX = ".jsonl"
LEGACY_RECORDS_SUFFIX = ".parquet"
#: SR Series Number of the reports (one series per source study and weights).
SR_SERIES_NUMBER = 9901
#: Series Number of the saliency Secondary Captures.
SALIENCY_SERIES_NUMBER = 9902
#: Reports stored per records file, so an interrupted pass loses little bookkeeping (never reports).
RECORD_BATCH = 500


@dataclass
class WriteBackSummary:
    """Counts of one write-back pass (`stored` this run, `already` recorded before, `failed` to retry)."""

    stored: int = 0
    already: int = 0
    failed: int = 0
    skipped_not_dicomweb: int = 0
    saliency_stored: int = 0
    saliency_skipped: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sr_instance_uid(source_sop_instance_uid: str, weights_sha256: str) -> str:
    """The report's SOP Instance UID: a ``2.25.`` UID derived from the source instance and the weights."""
    return _uid("cxrage-sr", source_sop_instance_uid, weights_sha256)


def sr_series_uid(study_instance_uid: str, weights_sha256: str) -> str:
    """The reports' Series Instance UID: one series per source study and weights."""
    return _uid("cxrage-sr-series", study_instance_uid, weights_sha256)


def sd_in_years(raw: float, raw_sd: float) -> float | None:
    """The TTA spread `raw_sd` (standardised units) as years at `raw`, through the calibration's slope."""
    from cxrage_ray.model.network import AGE_MEAN, AGE_SD, CALIB_A, CALIB_B

    if raw_sd is None or raw is None or not np.isfinite(raw_sd) or not np.isfinite(raw):
        return None
    age_uncalibrated = raw * AGE_SD + AGE_MEAN
    slope = AGE_SD * (CALIB_A - 2 * CALIB_B * age_uncalibrated)
    return float(abs(slope) * raw_sd)


def build_report(source: Any, cxr_age: float, sd_years: float | None, weights_sha256: str,
                 tool_version: str) -> Any:
    """A highdicom Comprehensive3DSR holding CXR-Age for `source` (a pydicom Dataset; header is enough).

    Args:
        source: the scored instance (its patient, study and SOP identity are referenced/copied).
        cxr_age: CXR-Age in years.
        sd_years: its standard deviation in years, or None (no TTA).
        weights_sha256: sha256 of the weights file (algorithm parameter; part of the report's UID).
        tool_version: cxrage-ray version (algorithm version).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = _with_type2_patient_study(source)
    cxr_age_code = hd.sr.CodedConcept("CXRAGE", "99CXRAGE", "CXR-Age")
    sd_code = hd.sr.CodedConcept("386136009", "SCT", "Standard Deviation")
    years = hd.sr.CodedConcept("a", "UCUM", "year")
    algorithm = hd.sr.AlgorithmIdentification(name="CXR-Age (Raghu et al. 2021)", version=tool_version,
                                             parameters=[f"weights_sha256={weights_sha256}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("cxrage-device", weights_sha256), name="cxrage-ray", model_name="CXR-Age"),
    )
    measurements = [hd.sr.Measurement(
        name=cxr_age_code, value=float(cxr_age), unit=years, algorithm_id=algorithm,
        referenced_images=[hd.sr.SourceImageForMeasurement.from_source_image(source)])]
    if sd_years is not None:
        measurements.append(hd.sr.Measurement(name=sd_code, value=float(sd_years), unit=years,
                                              algorithm_id=algorithm))
    sop_uid = sr_instance_uid(source.SOPInstanceUID, weights_sha256)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("cxrage-tracking", sop_uid), identifier="CXR-Age"),
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("168731009", "SCT", "Chest X-ray"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report,
        series_instance_uid=sr_series_uid(source.StudyInstanceUID, weights_sha256), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="cxrage-ray", is_complete=True, series_description="CXR-Age",
    )


def build_saliency_capture(source: Any, png: bytes, weights_sha256: str) -> Any | None:
    """A highdicom Secondary Capture (RGB) of the saliency overlay PNG, in `source`'s study; None when the
    source gives no PatientOrientation to state (a Secondary Capture in patient coordinates requires one).

    Its SOP Instance UID is derived from the source instance and the weights, like the report's.
    """
    import highdicom as hd
    from PIL import Image

    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    if len(orientation) != 2 or not all(orientation):
        return None
    with Image.open(io.BytesIO(png)) as im:
        rgb = np.asarray(im.convert("RGB"))
    source = _with_type2_patient_study(source)
    return hd.sc.SCImage.from_ref_dataset(
        source, rgb, "RGB", 8, "PATIENT",
        series_instance_uid=_uid("cxrage-saliency-series", source.StudyInstanceUID, weights_sha256),
        series_number=SALIENCY_SERIES_NUMBER,
        sop_instance_uid=_uid("cxrage-saliency", source.SOPInstanceUID, weights_sha256),
        instance_number=1, manufacturer="cxrage-ray", patient_orientation=tuple(orientation),
        series_description="CXR-Age saliency",
    )


#: Patient/study attributes highdicom copies from the source; Type 2 (may be empty, must be present).
_PATIENT_STUDY_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                        "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2_patient_study(source: Any) -> Any:
    """`source`, or a copy of it with absent Type 2 patient/study attributes present and empty (old files lack them)."""
    missing = [k for k in _PATIENT_STUDY_TYPE2 if k not in source]
    if not missing:
        return source
    import copy

    source = copy.deepcopy(source)
    for keyword in missing:
        setattr(source, keyword, None)
    return source


def _uid(*entropy: str) -> str:
    """A deterministic ``2.25.<128-bit integer>`` UID (PS3.5 B.2) from `entropy`. (pydicom's generate_uid
    ignores its entropy sources when the prefix is None and returns a random UUID UID.)"""
    digest = hashlib.sha256("\x00".join(entropy).encode("utf-8")).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


#: The columns of OUTPUT write-back reads.
WRITE_BACK_COLUMNS = ["row_id", "uri", "status", "cxr_age", "raw", "raw_sd", "saliency_uri", "orientation"]


def write_back(output: str, config: WriteBackConfig, storage: StorageConfig, weights_sha256: str) -> WriteBackSummary:
    """Store a report for every ok DICOMweb row of OUTPUT not yet recorded under OUTPUT/_cxrage/sr (see module docstring).

    Failures (archive down, rejected report) are counted per kind, never raised, and never name patients.
    """
    import cxrage_ray
    from cxrage_ray.write.parts import output_parts

    summary = WriteBackSummary()
    target_root = parse_query(config.target).root if config.target else None
    recorded = _recorded(output, storage)

    def todo_of(part: pa.Table) -> list[tuple[Any, InstanceRef, str]]:
        """The part's ok DICOMweb rows with no report recorded yet (counting the others into the summary)."""
        table = part.to_pandas()
        ok = table[table["status"] == "ok"]
        dicomweb = ok["uri"].map(lambda u: is_instance_uri(str(u)))
        summary.skipped_not_dicomweb += int((~dicomweb).sum())
        todo = []
        for row in ok[dicomweb].itertuples(index=False):
            ref = parse_instance_uri(str(row.uri))
            sr_uid = sr_instance_uid(ref.sop_instance_uid, weights_sha256)
            if (sr_uid, target_root or ref.root) in recorded:
                summary.already += 1
            else:
                todo.append((row, ref, sr_uid))
        return todo

    def store(item: tuple[Any, InstanceRef, str]) -> dict[str, Any] | BaseException:
        row, ref, sr_uid = item
        try:
            source = retrieve_instance_metadata(ref, storage)
            sr = build_report(source, row.cxr_age, sd_in_years(row.raw, row.raw_sd), weights_sha256,
                              cxrage_ray.__version__)
            root = target_root or ref.root
            _stow(sr, root, storage)
            record = {"row_id": int(row.row_id), "sop_instance_uid": ref.sop_instance_uid,
                      "sr_sop_instance_uid": sr_uid, "archive": root, "sc_sop_instance_uid": None}
            if config.saliency and isinstance(row.saliency_uri, str) and not (row.orientation or 0):
                capture = build_saliency_capture(source, read_bytes(row.saliency_uri, storage), weights_sha256)
                if capture is not None:
                    _stow(capture, root, storage)
                    record["sc_sop_instance_uid"] = capture.SOPInstanceUID
            return record
        except Exception as exc:  # counted and retried by the next run; the job's scores stand
            return exc

    run_id = uuid.uuid4().hex[:8]
    batch: list[dict[str, Any]] = []
    # part by part: memory follows one part's rows, not OUTPUT's
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        for part in output_parts(output, storage, WRITE_BACK_COLUMNS):
            for result in pool.map(store, todo_of(part)):
                if isinstance(result, BaseException):
                    summary.failed += 1
                    kind = type(result).__name__
                    summary.failures_by_kind[kind] = summary.failures_by_kind.get(kind, 0) + 1
                    continue
                batch.append(result)
                summary.stored += 1
                if config.saliency:
                    if result["sc_sop_instance_uid"]:
                        summary.saliency_stored += 1
                    else:
                        summary.saliency_skipped += 1
                if len(batch) >= RECORD_BATCH:
                    _write_records(output, storage, run_id, summary.stored, batch)
                    batch = []
    _write_records(output, storage, run_id, summary.stored, batch)
    if summary.failed:
        log.warning("write-back: %d report(s) not stored (%s); rerun the same command to retry them",
                    summary.failed, ", ".join(f"{k}: {v}" for k, v in sorted(summary.failures_by_kind.items())))
    return summary


def _stow(sr: Any, root: str, storage: StorageConfig) -> None:
    client = client_for(root, DicomwebAuth.from_options(storage.options))
    with_retries(lambda: translated(lambda: client.store_instances([sr]), "STOW-RS store"), root, storage, "read")


def _recorded(output: str, storage: StorageConfig) -> set[tuple[str, str]]:
    """(sr_sop_instance_uid, archive) pairs already stored by earlier runs (JSON Lines and older Parquet records)."""
    table = read_records(output, storage)
    if table is None:
        return set()
    return set(zip(table.column("sr_sop_instance_uid").to_pylist(), table.column("archive").to_pylist()))


def _write_records(output: str, storage: StorageConfig, run_id: str, seq: int, rows: list[dict[str, Any]]) -> None:
    """One records file of `rows`, written whole (temp + rename, or one PUT) through the storage layer."""
    if not rows:
        return
    lines = "".join(json.dumps({f.name: row.get(f.name) for f in RECORD_SCHEMA}, sort_keys=True) + "\n" for row in rows)
    write_bytes(f"{_records_dir(output)}/records-{run_id}-{seq:08d}{RECORDS_SUFFIX}", lines.encode("utf-8"), storage)


def read_records(output: str, storage: StorageConfig) -> pa.Table | None:
    """Every report recorded under OUTPUT/_cxrage/sr (None before the first), e.g. to join `sr_sop_instance_uid` onto rows.

    In:  OUTPUT; its ``records-*.jsonl`` and, from older versions, ``records-*.parquet``.
    Out: one table of `RECORD_SCHEMA` (a column an old file lacks is null).
    """
    tables = [_read_record_file(uri, storage) for uri in list_files(_records_dir(output), storage)
              if uri.endswith((RECORDS_SUFFIX, LEGACY_RECORDS_SUFFIX))]
    return pa.concat_tables(tables) if tables else None


def _read_record_file(uri: str, storage: StorageConfig) -> pa.Table:
    """One records file as a `RECORD_SCHEMA` table."""
    data = read_bytes(uri, storage)
    if uri.endswith(LEGACY_RECORDS_SUFFIX):
        return _conform(pq.read_table(io.BytesIO(data)))
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def _conform(table: pa.Table) -> pa.Table:
    """`table` with `RECORD_SCHEMA`'s columns in order, cast; absent ones null (older records files)."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in RECORD_SCHEMA]
    return pa.Table.from_arrays(columns, schema=RECORD_SCHEMA)


def _records_dir(output: str) -> str:
    return f"{output.rstrip('/')}/{RECORDS_DIR}"
