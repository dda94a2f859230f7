"""`cxrage serve` for real: the CLI in a subprocess (Ray Serve on its own local Ray, a free loopback port),
its API against `cxrage score` on the same files and weights, bad inputs, privacy, and the page in Chromium.

One server per module; `cxrage score` runs first (in a subprocess too), so this module never holds two Ray
instances of its own at once.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from conftest import REPO_ROOT
from processes import wait_until_healthy
from cxrage_ray.model.checkpoint import sha256_file

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

#: a few real films of each family: PNG and JPEG from the cxr sample, two chest DICOMs with PatientAge
N_RASTER = 3
DICOMS = [
    "cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm",  # CR, PatientAge 68, JPEG baseline
    "cxr/nih-gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",  # DX, 81, "Covid0000"
]
MR_DICOM = "other/pydicom_MR_small_bigendian.dcm"
PATIENT_IDENTIFIER = "Covid0000"  # PatientID / PatientName of the NIH DICOM
MAX_UPLOAD_MB = 4
START_TIMEOUT_S = 300
ARTIFACTS = Path(os.environ.get("CXRAGE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


def _cli() -> list[str]:
    return [sys.executable, "-m", "cxrage_ray.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def films(cxr_sample: Path, dicom_sample: Path) -> dict[str, Path]:
    """file name -> path: the first PNGs/JPEGs of the sample (sorted) and the chest DICOMs."""
    raster = sorted((cxr_sample / "images").iterdir())
    chosen = [p for p in raster if p.suffix == ".png"][:2] + [p for p in raster if p.suffix == ".jpg"][:1]
    assert len(chosen) == N_RASTER
    return {p.name: p for p in chosen + [dicom_sample / name for name in DICOMS]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "PLCO_like.pth"
    save_fastai_checkpoint(path, random_state_dict(seed=11), legacy=True, with_opt=True)
    return path


@pytest.fixture(scope="module")
def batch_scores(films, weights, tmp_path_factory) -> pd.DataFrame:
    """`cxrage score` on the same files (a manifest of their paths), one film per forward pass.

    `--batch-size 5` (one film's 5 TTA views per forward pass) is what a lone request gets from the server:
    the CPU kernels' fp32 sums differ in the last bit between forward passes of different sizes (up to
    ~5e-6 years), so equality is checked at equal pass sizes; see `test_one_request_of_several_films`. The
    thread counts still differ (score runs a one-thread batch per core, serve one request on every core), which
    moves the last bit too (1.2e-6 years seen), so the check is to 5e-6 years: far below any difference of
    preprocessing, model or calibration (those move ages by 1e-3 years or more).
    """
    root = tmp_path_factory.mktemp("batch")
    manifest = root / "manifest.csv"
    pd.DataFrame({"uri": [str(p) for p in films.values()], "image_id": list(films)}).to_csv(manifest, index=False)
    out = root / "out"
    done = subprocess.run(_cli() + ["score", str(manifest), str(out), "--weights", str(weights), "--no-progress",
                                    "--batch-size", "5"], env=_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    return pq.read_table(out / "parts").to_pandas().set_index("image_id")


@pytest.fixture(scope="module")
def server(batch_scores, weights, tmp_path_factory):
    """`cxrage serve` in a subprocess on a free loopback port; yields (base URL, log path); SIGTERM at the end."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(_cli() + ["serve", "--port", str(port), "--weights", str(weights),
                                      "--max-upload-mb", str(MAX_UPLOAD_MB), "--num-cpus", "4"],
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, log_path, START_TIMEOUT_S)
        yield base, log_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _post(base: str, files: list[tuple[str, bytes]], query: str = "", ages: list[str] | None = None,
          timeout: float = 120):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    parts += [("age", (None, age)) for age in ages or []]
    return requests.post(f"{base}/v1/score{query}", files=parts, timeout=timeout)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares width x height 8-bit grey pixels, with one tiny IDAT: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _png_from_data_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "PNG"
        return np.asarray(im)


# ----------------------------------------------------------------------------------------------- API


def test_served_scores_equal_batch_scorer(server, films, batch_scores, weights):
    base, _ = server
    sha = sha256_file(weights)
    for name, path in films.items():
        answer = _post(base, [(name, path.read_bytes())])
        assert answer.status_code == 200, answer.text[:500]
        (got,) = answer.json()
        want = batch_scores.loc[name]
        assert got["filename"] == name and got["status"] == "ok", got
        for field in ("cxr_age", "raw", "raw_sd"):
            assert abs(got[field] - want[field]) <= 5e-6, (name, field, got[field], want[field])
        assert got["weights_sha256"] == want["weights_sha256"] == sha
        assert got["weights_name"] == want["weights_name"] == weights.name  # one naming rule for both
        assert got["qc"] == list(want["qc"]) and got["orientation"] == want["orientation"]
        assert (got["tta"], got["preprocess"], got["decode"]) == ("seed", "seed", "exact")
    rsna = _post(base, [("rsna.dcm", (films[Path(DICOMS[0]).name]).read_bytes())]).json()[0]
    assert (rsna["chronological_age"], rsna["modality"], rsna["patient_sex"]) == (68.0, "CR", "F")
    assert rsna["cxr_age_gap"] == pytest.approx(rsna["cxr_age"] - 68.0)


def test_one_request_of_several_films(server, films, batch_scores):
    """Several files in one request: answers in upload order; typed ages for raster files, PatientAge wins."""
    base, _ = server
    names = list(films)
    answer = _post(base, [(n, films[n].read_bytes()) for n in names], ages=["70", "", "45.5", "99", ""])
    assert answer.status_code == 200
    results = answer.json()
    assert [r["filename"] for r in results] == names and [r["row_id"] for r in results] == list(range(len(names)))
    for r in results:
        # films of one request may share a forward pass: the same score up to fp32 summation order
        assert r["cxr_age"] == pytest.approx(batch_scores.loc[r["filename"], "cxr_age"], abs=1e-4)
    assert [r["chronological_age"] for r in results] == [70.0, None, 45.5, 68.0, 81.0]
    assert results[0]["cxr_age_gap"] == pytest.approx(results[0]["cxr_age"] - 70.0)


def test_saliency_and_picture_are_added_without_changing_the_score(server, films):
    base, _ = server
    name = next(iter(films))
    data = films[name].read_bytes()
    plain = _post(base, [(name, data)]).json()[0]
    cam = _post(base, [(name, data)], "?saliency=gradcam&picture=true").json()[0]
    grad = _post(base, [(name, data)], "?saliency=grad").json()[0]
    assert cam["cxr_age"] == plain["cxr_age"] == grad["cxr_age"]
    picture = _png_from_data_uri(cam["picture"])
    assert min(picture.shape[:2]) == 512  # the seed chain's picture, as scored
    cam_map, grad_map = _png_from_data_uri(cam["saliency"]), _png_from_data_uri(grad["saliency"])
    assert cam_map.shape[:2] == grad_map.shape[:2] == picture.shape[:2] and cam_map.shape[2] == 3
    assert (cam["saliency_method"], grad["saliency_method"]) == ("gradcam", "grad")
    assert not np.array_equal(cam_map, grad_map)
    assert "saliency" not in plain and "picture" not in plain
    assert _post(base, [(name, data)], "?saliency=lime").status_code == 422  # unknown method: a clear 422


def test_bad_inputs_get_clear_answers_and_never_hurt_the_server(server, films, dicom_sample):
    base, _ = server
    good_name = next(iter(films))
    good = films[good_name].read_bytes()
    corrupt = b"\x89PNG\r\n\x1a\n" + b"garbage" * 50
    mr = (dicom_sample / MR_DICOM).read_bytes()

    too_big = _post(base, [("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_UPLOAD_MB * 1024 * 1024))])
    assert too_big.status_code == 413 and "exceeds the limit" in too_big.json()["detail"]

    not_image = _post(base, [("notes.txt", b"patient notes, not a picture\n" * 20)])
    assert not_image.status_code == 415
    assert not_image.json()["error"].startswith("NotAnImageError: not a PNG, JPEG, TIFF or DICOM")
    empty = _post(base, [("empty.png", b"")])
    assert empty.status_code == 415 and empty.json()["error"].startswith("EmptyFileError")

    expected_422 = {"corrupt.png": (corrupt, "DecodeError: "), "mr.dcm": (mr, "UnsupportedModalityError: "),
                    "bomb.png": (_bomb_png(), "DecompressionBombError: ")}
    for name, (data, kind) in expected_422.items():
        started = time.monotonic()
        answer = _post(base, [(name, data)])
        assert answer.status_code == 422, (name, answer.status_code, answer.text[:300])
        body = answer.json()
        assert body["error"].startswith(kind) and body["detail"] == body["error"] and body["status"] == "error"
        assert body["filename"] == name
    assert time.monotonic() - started < 30  # the bomb is refused from its header, not decoded
    assert "100000x100000" in body["error"]

    mixed = _post(base, [(good_name, good), ("corrupt.png", corrupt), ("notes.txt", b"hello"), ("mr.dcm", mr),
                         ("bomb.png", _bomb_png())])
    assert mixed.status_code == 200
    statuses = [(r["filename"], r["status"], (r["error"] or "").split(":")[0]) for r in mixed.json()]
    assert statuses == [(good_name, "ok", ""), ("corrupt.png", "error", "DecodeError"),
                        ("notes.txt", "error", "NotAnImageError"), ("mr.dcm", "error", "UnsupportedModalityError"),
                        ("bomb.png", "error", "DecompressionBombError")]

    assert requests.post(f"{base}/v1/score", data=b"x", timeout=30).status_code == 400  # not multipart
    assert _post(base, [], ages=["50"]).status_code == 400  # no files
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    again = _post(base, [(good_name, good)])
    assert again.status_code == 200 and again.json()[0]["status"] == "ok"


def test_no_patient_identifier_is_returned_or_logged(server, films):
    base, log_path = server
    name = Path(DICOMS[1]).name
    answer = _post(base, [("upload-with-identifying-name.dcm", films[name].read_bytes())], "?picture=true")
    assert answer.status_code == 200
    result = answer.json()[0]
    assert result["status"] == "ok" and result["chronological_age"] == 81.0 and result["patient_sex"] == "M"
    assert PATIENT_IDENTIFIER not in answer.text
    assert result["patient_id_hash"] is None and result["study_date"] is None and result["uri"] is None
    time.sleep(1)  # let the replicas' log lines reach the driver's output
    log = log_path.read_text(errors="replace")
    assert PATIENT_IDENTIFIER not in log and "upload-with-identifying-name" not in log


def test_model_health_and_docs_are_served_locally(server, weights):
    base, _ = server
    model = requests.get(f"{base}/v1/model", timeout=60).json()
    assert model["weights_sha256"] == sha256_file(weights)
    assert model["tta"] == "seed" and model["preprocess"]["decode"] == "exact"
    assert {"cxrage_ray", "torch", "ray", "python"} <= set(model["versions"])
    assert requests.get(f"{base}/healthz", timeout=60).json() == {"status": "ok"}
    stats = requests.get(f"{base}/v1/stats", timeout=60).json()
    assert stats["batches_run"] >= 1 and stats["mean_batch_size"] >= 1
    schema = requests.get(f"{base}/openapi.json", timeout=60).json()
    assert "multipart/form-data" in schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    for path in ("/docs", "/"):
        page = requests.get(f"{base}{path}", timeout=60)
        assert page.status_code == 200
        assert "https://" not in page.text and "http://" not in page.text  # no CDN: works offline
    assert "research use only" in requests.get(base, timeout=60).text.lower()
    assert "demo-weights-banner" not in requests.get(base, timeout=60).text  # real weights: no demo banner
    assert model["weights_name"] == weights.name
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/static/app.js", "/static/app.css"):
        assert requests.get(f"{base}{asset}", timeout=60).status_code == 200


# ------------------------------------------------------------------------------------------ browser


def test_page_in_headless_chromium(server, films, tmp_path):
    """Upload real films on the page (one after the other), compare the age shown with the API's; screenshot."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("chromium is not installed (CI installs Debian's chromium: see .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    base, _ = server
    dicom, raster = films[Path(DICOMS[0]).name], next(iter(films.values()))
    expected = {p.name: _post(base, [(p.name, p.read_bytes())]).json()[0] for p in (dicom, raster)}
    errors: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844}, accept_downloads=True)  # a phone
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/", wait_until="networkidle")
            assert "research use only" in page.inner_text("body").lower()
            page.wait_for_function("document.querySelector('#weights-sha').textContent.length === 64")
            for i, path in enumerate((dicom, raster)):
                page.set_input_files("#file-input", str(path))
                page.wait_for_function(
                    f"document.querySelectorAll('.card [data-field=cxr_age][data-value]:not([data-value=\"\"])')"
                    f".length === {i + 1}", timeout=120_000)
            cards = {c.query_selector(".filename").inner_text(): c for c in page.query_selector_all(".card")}
            for name, want in expected.items():
                shown = cards[name].query_selector("[data-field=cxr_age]")
                assert float(shown.get_attribute("data-value")) == want["cxr_age"]
                assert shown.inner_text() == f"{want['cxr_age']:.1f}"
                assert cards[name].query_selector("img.film").get_attribute("src").startswith("data:image/png")
            assert cards[dicom.name].query_selector("input[data-field=chronological_age]").input_value() == "68"
            gap = cards[dicom.name].query_selector("[data-field=cxr_age_gap]").inner_text()
            assert gap.startswith(f"{expected[dicom.name]['cxr_age'] - 68:+.1f}")
            page.fill(f".card:has-text('{raster.name}') input[data-field=chronological_age]", "60")
            assert cards[raster.name].query_selector("[data-field=cxr_age_gap]").inner_text().startswith(
                f"{expected[raster.name]['cxr_age'] - 60:+.1f}")

            film_src = cards[raster.name].query_selector("img.film").get_attribute("src")
            page.check("input[name=overlay][value=gradcam]")
            page.wait_for_function(
                "src => [...document.querySelectorAll('.card img.film')].every(i => i.src !== src)",
                arg=film_src, timeout=120_000)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll

            with page.expect_download() as download:
                page.click("#csv")
            csv = pd.read_csv(download.value.path())
            assert sorted(csv["filename"]) == sorted(expected)
            row = csv.set_index("filename").loc[raster.name]
            assert row["cxr_age"] == pytest.approx(expected[raster.name]["cxr_age"], abs=1e-9)
            assert row["chronological_age"] == 60 and row["chronological_age_source"] == "typed"

            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
            shutil.copy(tmp_path / "serve-page.png", ARTIFACTS / "serve-page.png")
        finally:
            browser.close()
    assert errors == [], errors
