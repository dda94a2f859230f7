"""Tiny files that would allocate gigabytes are refused before any pixel is allocated (issue 11, part 1).

The hostile files are generated here: a thin PNG whose fill resize explodes, and DICOMs whose codestream (JPEG
SOF, JPEG 2000 SIZ, JPEG-LS SOF55) declares another size than the header. Peak memory is measured in a fresh
process, so the bound covers everything the decode and the seed chain allocate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dicomgen as gen
from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import encoded_first_frame
from cxrage_ray.decode.image import decode_image
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.decode.limits import MAX_FILL_ASPECT, codestream_size
from cxrage_ray.errors import DecodeError, DecompressionBombError
from cxrage_ray.preprocess.seed_chain import seed_chain
from imagegen import pillow_bytes

REPO = Path(__file__).resolve().parents[2]
ANY = DecodeOptions(allow_any_modality=True)


def patch_jpeg_sof(data: bytes, width: int, height: int, marker: bytes = b"\xff\xc0") -> bytes:
    """Rewrite the first frame header's size in place (the file keeps its length)."""
    pos = data.index(marker)
    return data[:pos + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[pos + 9:]


def patch_j2k_siz(data: bytes, width: int, height: int) -> bytes:
    pos = data.index(b"\xff\x4f\xff\x51") + 8  # SOC, SIZ marker, Lsiz, Rsiz -> Xsiz
    return data[:pos] + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[pos + 8:]


def hostile_files(dicom_sample: Path) -> dict[str, bytes]:
    ramp = gen.ramp(64, 64, bits=8).astype(np.uint8)
    jpeg = gen.jpeg_baseline(ramp, Rows=512, Columns=512)  # header 64x64 from the pixels, patched below
    j2k = gen.compressed(gen.make_dataset(gen.ramp(64, 64, bits=12), bits_stored=12), "1.2.840.10008.1.2.4.90")
    jls = (dicom_sample / "cxr" / "WG04_RG1_JLSN.dcm").read_bytes()
    return {
        "thin.png": pillow_bytes(np.full((5, 5000), 200, np.uint8), "PNG"),
        "jpeg_sof_30000.dcm": patch_jpeg_sof(jpeg, 30000, 30000),
        "jpeg_sof_mismatch.dcm": patch_jpeg_sof(jpeg, 640, 64),
        "j2k_siz_20000.dcm": patch_j2k_siz(j2k, 20000, 20000),
        "jls_sof55_30000.dcm": patch_jpeg_sof(jls, 30000, 30000, marker=b"\xff\xf7"),
    }


@pytest.fixture(scope="module")
def hostile(dicom_sample: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, data in hostile_files(dicom_sample).items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def test_codestream_sizes_are_read_from_the_markers(hostile: dict[str, Path]) -> None:
    raw = {name: path.read_bytes() for name, path in hostile.items()}
    jpeg = raw["jpeg_sof_30000.dcm"]
    assert codestream_size(jpeg[jpeg.index(b"\xff\xd8\xff"):]) == (30000, 30000)
    j2k = raw["j2k_siz_20000.dcm"]
    assert codestream_size(j2k[j2k.index(b"\xff\x4f\xff\x51"):]) == (20000, 20000)
    assert codestream_size(b"\x00" * 40) is None


@pytest.mark.parametrize("name, kind, words", [
    ("thin.png", DecompressionBombError, "aspect 1000:1"),
    ("jpeg_sof_30000.dcm", DecompressionBombError, "codestream declares 30000x30000"),
    ("jpeg_sof_mismatch.dcm", DecodeError, "codestream is 640x64 but the DICOM header says 512x512"),
    ("j2k_siz_20000.dcm", DecompressionBombError, "codestream declares 20000x20000"),
    ("jls_sof55_30000.dcm", DecompressionBombError, "codestream declares 30000x30000"),
])
def test_hostile_files_are_refused_with_a_clear_kind(hostile: dict[str, Path], name, kind, words) -> None:
    data = hostile[name].read_bytes()
    with pytest.raises(kind, match=words.replace("(", r"\(")):
        decode_image(data, name, ANY)
    if name.endswith(".dcm"):  # the GPU path's header parse refuses them too, before any decoder sees them
        with pytest.raises(kind):
            encoded_first_frame(data, ANY)


def test_a_sliver_left_by_the_trim_is_refused_before_the_resize() -> None:
    film = np.zeros((600, 600, 1), np.uint16)
    film[300, 10:590] = 50000  # one bright line on black: the trim leaves 1 x 580
    with pytest.raises(DecompressionBombError, match="no radiograph"):
        seed_chain(DecodedImage(pixels=film))
    ok = np.zeros((600, 600, 1), np.uint16)
    ok[100:500, 100:500] = 30000
    assert seed_chain(DecodedImage(pixels=ok)).shape[:2] == (512, 512)
    assert MAX_FILL_ASPECT >= 4  # real films (and the 250 samples) are far from it


def test_every_real_sample_file_still_decodes(dicom_sample: Path, cxr_sample: Path) -> None:
    index = {row.split(",")[0]: row for row in (dicom_sample / "index.csv").read_text().splitlines()[1:]}
    for name, row in index.items():
        data = (dicom_sample / name).read_bytes()
        if ",no (" in row:
            continue  # the corrupt files of the sample
        decode_image(data, name, ANY)


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a 2 GB pytest process
# would report 2 GB before doing anything; VmHWM belongs to the new address space.
PEAK_SCRIPT = """
import json, re, sys
from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.image import decode_image
from cxrage_ray.preprocess.seed_chain import seed_chain
outcome = {}
for path in sys.argv[1:]:
    try:
        seed_chain(decode_image(open(path, "rb").read(), path, DecodeOptions(allow_any_modality=True)))
        outcome[path] = "ok"
    except Exception as exc:
        outcome[path] = type(exc).__name__
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_mb": hwm_kb / 1024, "outcome": outcome}))
"""


def test_peak_memory_of_the_hostile_files_stays_bounded(hostile: dict[str, Path]) -> None:
    """Before: 6.2 GB (thin PNG), 4.4 GB (JPEG SOF), 2.1 GB (J2K SIZ). The bound is the issue's 1.5 GB per film."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, hostile.values())], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["outcome"].values()) <= {"DecompressionBombError", "DecodeError"}, report
    assert report["peak_mb"] < 1500, report
