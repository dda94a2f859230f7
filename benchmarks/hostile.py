"""Benchmark: peak memory of hostile files, one prepare at a time and in one `cxrage score` run (issue 11).

In:  nothing but the code; the corpus is generated into a temporary folder: a 5 x 5000 PNG (fill-aspect bomb),
     1-bit, 8-bit and 16-bit grey PNGs exactly at the pixel limit (16384² by default), a PNG whose IDAT CRC is
     wrong, a 12-bit uncompressed DICOM of a quarter of the limit (8192², 128 MB), and DICOMs whose codestream (JPEG SOF, JPEG 2000 SIZ, JPEG-LS SOF55) declares another size than the
     header (the JPEG-LS one needs $CXRAGE_SHARED/data/dicom-sample; without it that file is left out).
Out: a table on stdout — per file: the outcome (`ok` or the error kind), seconds and peak RSS (VmHWM) of a fresh
     process that decodes it and runs the seed chain (what one prepare task does), then the peak summed PSS and
     RSS of one `cxrage score` run over the whole folder (driver + every descendant: raylet, GCS, workers),
     sampled from /proc every 0.2 s, its exit status and row count.

    python benchmarks/hostile.py                # the whole corpus at the default limit (~2 min here)
    python benchmarks/hostile.py --skip-score   # per-file figures only

`build_corpus`, `prepare_peak` and `run_tree_measured` are imported by tests/chaos/test_hostile_files.py, so the
test and the benchmark measure the same files the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: The decoders' default pixel limit (`cxrage_ray.config.DEFAULT_MAX_PIXELS`): the worst films a run accepts.
LIMIT_SIDE = 16384
#: /proc is sampled this often: a prepare at the limit lasts seconds, so 0.2 s catches its peak.
SAMPLE_INTERVAL_S = 0.2


# ------------------------------------------------------------------------------------------ the corpus


def _png(image) -> bytes:
    """A Pillow image -> PNG bytes (compress level 9: the files stay small, as a hostile one would)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def one_bit_png(side: int) -> bytes:
    """A `side`² 1-bit PNG: a white disc on black (a few tens of KB at the limit)."""
    from PIL import Image, ImageDraw

    image = Image.new("1", (side, side), 0)
    ImageDraw.Draw(image).ellipse((side // 8, side // 8, side - side // 8, side - side // 5), fill=1)
    return _png(image)


def grey_png(side: int, bits: int) -> bytes:
    """A `side`² 8- or 16-bit grey PNG: a smooth vertical ramp with a dark frame (compresses well)."""
    from PIL import Image

    top = (1 << bits) - 1
    ramp = (np.arange(side, dtype=np.float64) * (top / side)).astype(np.uint16 if bits == 16 else np.uint8)
    rows = np.broadcast_to(ramp[:, None], (side, side))
    frame = np.ascontiguousarray(rows)
    frame[: side // 16], frame[:, : side // 16] = 0, 0
    image = Image.fromarray(frame)  # uint16 -> I;16
    data = _png(image)
    del frame, image
    return data


def corrupt_idat_crc(png: bytes) -> bytes:
    """The same PNG with its first IDAT chunk's CRC flipped (the pixels themselves intact)."""
    pos = png.index(b"IDAT") - 4
    length = int.from_bytes(png[pos:pos + 4], "big")
    crc_at = pos + 8 + length
    return png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at:crc_at + 4]) + png[crc_at + 4:]


def native_dicom(side: int) -> bytes:
    """A `side`² 12-bit uncompressed MONOCHROME2 DICOM (2 bytes a pixel on disk): a vertical ramp."""
    sys.path.insert(0, str(REPO / "tests"))
    import dicomgen as gen

    ramp = (np.arange(side, dtype=np.uint32) * 4095 // side).astype(np.uint16)
    frame = np.repeat(ramp[:, None], side, axis=1)
    frame[0, 0], frame[0, 1] = 0, 4095
    return gen.make_dicom(frame, bits_stored=12)


def build_corpus(folder: Path, side: int = LIMIT_SIDE, dicom_sample: Path | None = None) -> dict[str, str]:
    """Write the hostile files into `folder`; returns {file name: the outcome expected of it}.

    Expected outcomes are `ok` or an error kind (`DecodeError`, `DecompressionBombError`).
    """
    sys.path.insert(0, str(REPO / "tests"))
    import dicomgen as gen
    from decode.test_limits import patch_j2k_siz, patch_jpeg_sof
    from imagegen import pillow_bytes, radiograph

    ramp = gen.ramp(64, 64, bits=8).astype(np.uint8)
    jpeg = gen.jpeg_baseline(ramp, Rows=512, Columns=512)  # header 64x64 from the pixels, patched below
    j2k = gen.compressed(gen.make_dataset(gen.ramp(64, 64, bits=12), bits_stored=12), "1.2.840.10008.1.2.4.90")
    normal = pillow_bytes(radiograph(600, 500, seed=3), "PNG")
    files = {
        "normal.png": (normal, "ok"),
        "thin_5x5000.png": (pillow_bytes(np.full((5, 5000), 200, np.uint8), "PNG"), "DecompressionBombError"),
        "onebit_limit.png": (one_bit_png(side), "ok"),
        "grey8_limit.png": (grey_png(side, 8), "ok"),
        "grey16_limit.png": (grey_png(side, 16), "ok"),
        "idat_crc.png": (corrupt_idat_crc(normal), "DecodeError"),
        "jpeg_sof_30000.dcm": (patch_jpeg_sof(jpeg, 30000, 30000), "DecompressionBombError"),
        "jpeg_sof_mismatch.dcm": (patch_jpeg_sof(jpeg, 640, 64), "DecodeError"),
        "j2k_siz_20000.dcm": (patch_j2k_siz(j2k, 20000, 20000), "DecompressionBombError"),
        "j2k_siz_mismatch.dcm": (patch_j2k_siz(j2k, 640, 64), "DecodeError"),
        # a quarter of the limit: at the limit the file alone is 512 MB (see benchmarks/README.md)
        "native12_quarter.dcm": (native_dicom(side // 2), "ok"),
    }
    jls_source = None if dicom_sample is None else dicom_sample / "cxr" / "WG04_RG1_JLSN.dcm"
    if jls_source is not None and jls_source.is_file():
        files["jls_sof55_30000.dcm"] = (patch_jpeg_sof(jls_source.read_bytes(), 30000, 30000, marker=b"\xff\xf7"),
                                        "DecompressionBombError")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


def default_dicom_sample() -> Path:
    return Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared")) / "data" / "dicom-sample"


# ------------------------------------------------------------------------------- one prepare, one process

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec (see tests/decode/test_limits.py).
PREPARE_SCRIPT = """
import json, re, sys, time
from cxrage_ray.config import PrepareSettings, StorageConfig
from cxrage_ray.pipeline.prepare import picture_from_bytes
path = sys.argv[1]
data = open(path, "rb").read()
start = time.perf_counter()
try:
    picture, _ = picture_from_bytes(data, path, PrepareSettings(storage=StorageConfig()))
    outcome, message = "ok", f"{picture.shape}"
except Exception as exc:
    outcome, message = type(exc).__name__, str(exc)
seconds = time.perf_counter() - start
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_mb": hwm_kb / 1024, "outcome": outcome, "message": message, "seconds": seconds}))
"""


def prepare_peak(path: Path, timeout: float = 300) -> dict:
    """Decode + seed chain of one file in a fresh interpreter: {peak_mb, outcome, message, seconds}."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:  # killed (e.g. out of memory) or crashed: report it, do not hide it
        return {"peak_mb": float("nan"), "outcome": f"exit {result.returncode}", "message": result.stderr[-300:],
                "seconds": float("nan")}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- the whole job tree


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, read from /proc/*/stat (the parent pid is the 4th field after the name)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pss_rss_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB from /proc/PID/smaps_rollup; (0, 0) when it has gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    pss = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    rss = re.search(r"^Rss:\s+(\d+) kB", text, re.M)
    return (int(pss.group(1)) if pss else 0), (int(rss.group(1)) if rss else 0)


@dataclass
class TreePeak:
    """Peaks of one command's process tree, in MiB; `returncode` and the output of the command."""

    returncode: int
    seconds: float
    peak_pss_mb: float
    peak_rss_mb: float
    peak_process_mb: float
    stdout: str
    stderr: str


def run_tree_measured(command: list[str], env: dict[str, str], timeout: float = 600) -> TreePeak:
    """Run `command` from the repository root, sampling the summed PSS/RSS of it and all its descendants."""
    peaks = {"pss": 0, "rss": 0, "one": 0}
    done = threading.Event()

    def sample(root: int) -> None:
        while not done.is_set():
            figures = [_pss_rss_kb(pid) for pid in [root, *_children(root)]]
            peaks["pss"] = max(peaks["pss"], sum(p for p, _ in figures))
            peaks["rss"] = max(peaks["rss"], sum(r for _, r in figures))
            peaks["one"] = max(peaks["one"], max((r for _, r in figures), default=0))
            done.wait(SAMPLE_INTERVAL_S)

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        return TreePeak(returncode, seconds, peaks["pss"] / 1024, peaks["rss"] / 1024, peaks["one"] / 1024,
                        out.read(), err.read())


def score_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def demo_weights(path: Path) -> Path:
    """Random CXR-Age weights in the published format (the ages mean nothing; memory is what is measured)."""
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import random_state_dict, save_fastai_checkpoint

    save_fastai_checkpoint(path, random_state_dict(seed=11), legacy=True, with_opt=True)
    return path


def score_command(folder: Path, out: Path, weights: Path) -> list[str]:
    return [sys.executable, "-m", "cxrage_ray.cli", "score", str(folder), str(out), "--weights", str(weights),
            "--no-progress", "--tta", "none"]


def output_rows(out: Path) -> list[dict]:
    """The run's rows as dicts (image_id, status, error)."""
    from cxrage_ray.write.parts import read_output
    from cxrage_ray.config import StorageConfig

    table = read_output(str(out), StorageConfig()).select(["image_id", "status", "error"]).to_pandas()
    return table.to_dict("records")


# -------------------------------------------------------------------------------------------- the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=LIMIT_SIDE, help="side of the at-the-limit PNGs")
    parser.add_argument("--skip-score", action="store_true", help="per-file figures only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxrage-hostile-") as tmp:
        folder = Path(tmp) / "hostile"
        expected = build_corpus(folder, args.side, default_dicom_sample())
        figures: dict = {"files": {}}
        print(f"{'file':24} {'KB':>8} {'expected':>22} {'outcome':>22} {'s':>6} {'peak RSS MiB':>12}")
        for name in sorted(expected):
            path = folder / name
            result = prepare_peak(path)
            figures["files"][name] = result
            print(f"{name:24} {path.stat().st_size / 1024:8.1f} {expected[name]:>22} {result['outcome']:>22} "
                  f"{result['seconds']:6.1f} {result['peak_mb']:12.0f}", flush=True)
        if not args.skip_score:
            out = Path(tmp) / "out"
            run = run_tree_measured(score_command(folder, out, demo_weights(Path(tmp) / "w.pth")), score_env())
            rows = output_rows(out) if out.exists() else []
            figures["score"] = {"returncode": run.returncode, "seconds": round(run.seconds, 1),
                                "peak_tree_pss_mb": round(run.peak_pss_mb), "peak_tree_rss_mb": round(run.peak_rss_mb),
                                "peak_one_process_rss_mb": round(run.peak_process_mb), "rows": len(rows),
                                "files": len(expected)}
            print(f"cxrage score over the folder: exit {run.returncode}, {run.seconds:.0f} s, {len(rows)} rows for "
                  f"{len(expected)} files, job tree peak PSS {run.peak_pss_mb:.0f} MiB (summed RSS "
                  f"{run.peak_rss_mb:.0f} MiB, largest process {run.peak_process_mb:.0f} MiB)")
            for row in sorted(rows, key=lambda r: r["image_id"]):
                print(f"  {row['image_id']:24} {row['status']:6} {(row['error'] or '')[:110]}")
            if run.returncode not in (0, 3):
                print(run.stderr[-3000:])
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
