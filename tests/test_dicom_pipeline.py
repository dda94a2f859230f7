"""`cxrage score` over the real DICOM sample: metadata columns, modality refusal, corrupt files as error rows."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from checkpoints import random_state_dict, save_fastai_checkpoint
from cxrage_ray.cli import EXIT_ROW_ERRORS, main

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

FILES = [
    "cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm",  # PatientAge "68", CR
    "cxr/nih-gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",  # "81", DX
    "cxr/barre_CR-MONO1-10-chest_acrnema",  # no preamble, no extension
    "cxr/pylibjpeg-data_966.dcm",  # corrupt J2K stream
    "other/pydicom_MR_small_bigendian.dcm",  # MR: not a radiograph
]


def test_dicom_archive(ray_local, dicom_sample, tmp_path):
    archive = tmp_path / "archive"
    for name in FILES:
        (archive / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dicom_sample / name, archive / name)
    weights = tmp_path / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=5), legacy=True, with_opt=True)
    out = tmp_path / "out"
    code = main(["score", str(archive), str(out), "--weights", str(weights), "--no-progress", "--tta", "none",
                 "--rotation", "off", "--keep-patient-id", "pepper"])
    assert code == EXIT_ROW_ERRORS
    df = pq.read_table(out / "parts").to_pandas().set_index("image_id")
    assert len(df) == len(FILES)

    rsna, nih = df.loc[FILES[0]], df.loc[FILES[1]]
    assert (rsna["status"], rsna["modality"], rsna["chronological_age"]) == ("ok", "CR", 68.0)
    assert (nih["status"], nih["modality"], nih["chronological_age"]) == ("ok", "DX", 81.0)
    assert nih["cxr_age_gap"] == pytest.approx(nih["cxr_age"] - 81.0)
    assert rsna["patient_sex"] == "F" and len(rsna["patient_id_hash"]) == 64
    assert df.loc[FILES[2], "status"] == "ok"  # ACR-NEMA recognised without extension or magic
    assert df.loc[FILES[3], "error"].startswith("DecodeError")
    assert df.loc[FILES[4], "error"].startswith("UnsupportedModalityError")
    assert np.isfinite(df.loc[[FILES[0], FILES[1], FILES[2]], "cxr_age"]).all()
    # no raw identifiers anywhere in the output
    text = pd.DataFrame(df).astype(str).to_csv()
    assert "Covid0000" not in text
