"""Fail fast: every mistake that can be seen before Ray starts is answered by the real `cxrage` process in
seconds, with `cxrage: error: ...` and exit 2, and leaves nothing behind (no OUTPUT folder, no job.json)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrage_ray.runtime.preflight import cuda_devices

#: Wall-time bound for a refused command (the check itself takes ~0.5 s; the rest is slack for a loaded CI box).
FAST_S = 5.0


def _run(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CXRAGE_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cxrage_ray.cli", *args], env=env, capture_output=True,
                            text=True, timeout=120)
    return result, time.monotonic() - started


@pytest.fixture()
def films(tmp_path: Path) -> Path:
    folder = tmp_path / "films"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "a.png")
    return folder


def _case(name: str, tmp_path: Path, films: Path) -> tuple[list[str], str]:
    """(argv, a phrase the error must contain) for each mistake; OUTPUT is tmp_path/out unless it is the mistake."""
    out = str(tmp_path / "out")
    if name == "input_missing":
        return ["score", str(tmp_path / "nope"), out], "input not found"
    if name == "manifest_without_uri":
        pd.DataFrame({"file": ["films/a.png"]}).to_csv(tmp_path / "m.csv", index=False)
        return ["score", str(tmp_path / "m.csv"), out], "--uri-column"
    if name == "empty_folder":
        (tmp_path / "empty").mkdir()
        return ["score", str(tmp_path / "empty"), out], "no files under"
    if name == "cuda_without_gpu":
        if cuda_devices():
            pytest.skip("this machine has a CUDA GPU")
        return ["score", str(films), out, "--device", "cuda", "--weights", "demo"], "no CUDA GPU"
    if name == "output_is_a_file":
        (tmp_path / "out").write_text("a file\n")
        return ["score", str(films), out], "is an existing file"
    if name == "bad_part_rows":
        return ["score", str(films), out, "--part-rows", "0"], "--part-rows"
    if name == "weights_missing":
        return ["score", str(films), out, "--weights", str(tmp_path / "w.pth")], "no such file"
    if name == "csv_is_a_folder":
        return ["score", str(films), out, "--csv", str(tmp_path)], "--csv"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["input_missing", "manifest_without_uri", "empty_folder", "cuda_without_gpu",
                                  "output_is_a_file", "bad_part_rows", "weights_missing", "csv_is_a_folder"])
def test_mistakes_are_refused_fast_and_leave_nothing(name, tmp_path, films):
    argv, phrase = _case(name, tmp_path, films)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result, wall = _run(argv, tmp_path / "home")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("cxrage: error: "), result.stderr
    assert phrase in result.stderr
    assert "Traceback" not in result.stderr
    assert wall < FAST_S, f"{name}: refused after {wall:.1f}s (Ray or torch started first?)"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "home"))
    assert [p for p in after if p != Path("home")] == before, "the refused command wrote something"
