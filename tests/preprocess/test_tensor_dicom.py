"""The batched dcmj2pnm mapping (`preprocess.tensor_dicom`): the per-frame mapping's very numbers for every real
DICOM in one batch, one host sync for all the frames' ranges, and a frame that fails alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_stored_frame
from cxrage_ray.errors import CxrAgeError
from cxrage_ray.preprocess.tensor import dicom_q16_tensor
from cxrage_ray.preprocess.tensor_dicom import dicom_q16_batch

ANY = DecodeOptions(allow_any_modality=True)


@pytest.fixture(scope="module")
def real_frames(dicom_sample: Path) -> list[tuple[torch.Tensor, object]]:
    frames = []
    for path in sorted(p for p in dicom_sample.rglob("*") if p.is_file() and p.suffix != ".csv"):
        try:
            values, params = decode_stored_frame(path.read_bytes(), ANY)
        except CxrAgeError:
            continue  # the corrupt files
        frames.append((torch.from_numpy(values.astype(np.int32)), params))
    assert len(frames) >= 20
    return frames


def test_a_batch_maps_every_real_frame_as_the_per_frame_mapping(real_frames) -> None:
    from dispatch_counts import count_dispatch

    with count_dispatch() as counts:
        mapped = dicom_q16_batch(real_frames)
    assert counts.syncs["tolist"] == 1  # every grey frame's min and max in one read-back
    for (values, params), q16 in zip(real_frames, mapped):
        assert torch.equal(q16, dicom_q16_tensor(values, params))


def test_a_frame_that_cannot_be_mapped_fails_alone(real_frames) -> None:
    (values, params), (other, other_params) = real_frames[0], real_frames[1]
    broken = replace(params, bits_stored=None)  # no ramp can be planned from it
    mapped = dicom_q16_batch([(values, broken), (other, other_params)])
    assert isinstance(mapped[0], Exception)
    assert torch.equal(mapped[1], dicom_q16_tensor(other, other_params))
