"""`FrameDecoder`: nvImageCodec's batch decode with a per-file CPU fallback.

No GPU here, so nvImageCodec runs on its CPU back ends (`nvimgcodec_on_cpu`): the same Python API, batch
semantics and refusals (None for a stream it cannot take) as its GPU back ends; only where the pixels land
differs. Lossless streams must come out identical to pydicom + pylibjpeg on real 12-16-bit films.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_stored_frame, encoded_first_frame
from cxrage_ray.decode.gpu import FrameDecoder
from cxrage_ray.decode.nvimgcodec import load_nvimgcodec
from cxrage_ray.errors import DecodeError

ANY = DecodeOptions(allow_any_modality=True)
CPU = torch.device("cpu")
#: real films: lossless J2K at 15, 16 and 12 bits, lossy J2K, JPEG baseline; and a JPEG-LS one (no nvImageCodec codec)
FILMS = ["cxr/WG04_RG1_J2KR.dcm", "cxr/pylibjpeg-data_JPEG2KLossless_1s_1f_u_16_16.dcm",
         "cxr/pylibjpeg-data_966_fixed.dcm", "cxr/WG04_RG1_J2KI.dcm", "cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm",
         "cxr/WG04_RG1_JLSN.dcm"]


@pytest.fixture(scope="module")
def nvimgcodec_decoder() -> FrameDecoder:
    if load_nvimgcodec() is None:
        pytest.skip("nvImageCodec is not installed (pip install 'cxrage-ray[gpu]'; the test extra includes it)")
    decoder = FrameDecoder(CPU, nvimgcodec_on_cpu=True)
    assert decoder.uses_nvimgcodec
    return decoder


def test_nvimgcodec_decodes_real_films_like_pydicom(nvimgcodec_decoder: FrameDecoder, dicom_sample: Path) -> None:
    data = [(dicom_sample / name).read_bytes() for name in FILMS]
    results = nvimgcodec_decoder.decode([encoded_first_frame(d) for d in data])
    assert [r.decoder for r in results] == ["nvimgcodec"] * 5 + ["pydicom"]  # JPEG-LS: the CPU path
    for name, raw, result in zip(FILMS, data, results):
        expected, params = decode_stored_frame(raw, ANY)
        assert result.values.dtype == torch.int32 and result.device == "cpu"
        assert np.array_equal(result.values.numpy(), expected.astype(np.int32)), name
    assert {params.bits_stored for params in (decode_stored_frame(d, ANY)[1] for d in data[:3])} == {15, 16, 12}


def test_a_refused_stream_falls_back_per_file_and_neighbours_are_unharmed(
        nvimgcodec_decoder: FrameDecoder, dicom_sample: Path) -> None:
    good = encoded_first_frame((dicom_sample / FILMS[0]).read_bytes())
    jpeg = encoded_first_frame((dicom_sample / FILMS[4]).read_bytes())
    truncated = replace(good, codestream=good.codestream[:4000])  # nvImageCodec gives None, pylibjpeg fails
    wrong_size = replace(jpeg, rows=jpeg.rows // 2)  # the header disagrees with the codestream's SOF
    results = nvimgcodec_decoder.decode([good, truncated, jpeg, wrong_size])
    assert results[0].decoder == "nvimgcodec" and results[2].decoder == "nvimgcodec"
    assert isinstance(results[1], DecodeError)
    # nvImageCodec's image has the stream's size, not the header's: never used; the exact path decides
    assert results[3].decoder == "pydicom"


def test_without_nvimgcodec_every_frame_takes_the_exact_cpu_path(dicom_sample: Path) -> None:
    decoder = FrameDecoder(CPU, use_nvimgcodec=False)
    assert not decoder.uses_nvimgcodec
    raw = (dicom_sample / FILMS[3]).read_bytes()
    (result,) = decoder.decode([encoded_first_frame(raw)])
    assert result.decoder == "pydicom" and result.device == "cpu"
    assert np.array_equal(result.values.numpy(), decode_stored_frame(raw, ANY)[0].astype(np.int32))


def test_jpeg_stays_off_the_gpu_idct_unless_asked(dicom_sample: Path) -> None:
    """On a GPU node JPEG takes nvImageCodec's CPU back end (libjpeg-turbo, the exact IDCT), or pydicom when that
    back end did not start; J2K goes to the GPU; only `gpu_jpeg` sends JPEG to nvJPEG. Off a GPU, the CPU paths."""
    from cxrage_ray.decode.gpu import frame_route

    j2k = encoded_first_frame((dicom_sample / FILMS[0]).read_bytes())
    jpeg = encoded_first_frame((dicom_sample / FILMS[4]).read_bytes())
    jpeg_ls = encoded_first_frame((dicom_sample / FILMS[5]).read_bytes())
    gpu_node = dict(codec=True, on_gpu=True, jpeg_on_cpu=True, cpu_codec=True)
    assert [frame_route(f, **gpu_node) for f in (j2k, jpeg, jpeg_ls)] == ["gpu", "codec-cpu", "cpu"]
    assert frame_route(jpeg, **{**gpu_node, "cpu_codec": False}) == "cpu"
    assert frame_route(jpeg, **{**gpu_node, "jpeg_on_cpu": False}) == "gpu"
    assert frame_route(j2k, codec=True, on_gpu=False, jpeg_on_cpu=False, cpu_codec=False) == "codec-cpu"
    assert frame_route(j2k, codec=False, on_gpu=True, jpeg_on_cpu=True, cpu_codec=True) == "cpu"
    assert not FrameDecoder(CPU)._jpeg_on_cpu  # a CPU device has no nvJPEG to avoid
