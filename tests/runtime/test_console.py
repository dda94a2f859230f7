"""The console names failed films: by base name (never their folders), with their message, the first few only,
and says where every error row is; `cxrage score` does it after a run (issue 25)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from cxrage_ray.cli import EXIT_ROW_ERRORS, main
from cxrage_ray.runtime.console import (ERROR_ROWS_FILTER, ERRORS_NAMED, failed_film_lines, film_name,
                                        named_error, named_errors)
from imagegen import radiograph

#: A folder named after a patient: the console may name the film, never the folders above it.
PATIENT_FOLDER = "Doe^Jane-1947"


def test_a_film_is_named_by_its_base_name():
    assert film_name("s3://bucket/Doe^Jane/study/film 1.dcm") == "film 1.dcm"
    assert film_name("/archive/a/b/c.png", "a/b/c.png", 7) == "c.png"
    assert film_name(None, "ward/x.jpg", 3) == "x.jpg"
    assert film_name("", None, 12) == "row 12"
    assert film_name(None) == "?"


def test_a_message_quoting_the_full_location_quotes_the_base_name():
    uri = f"/data/{PATIENT_FOLDER}/chest.png"
    assert named_error(uri, f"ReadError: not found: {uri}") == {"film": "chest.png",
                                                                "error": "ReadError: not found: chest.png"}
    assert named_error(uri, None) == {"film": "chest.png", "error": "Error: ?"}


def test_only_the_first_few_are_named_and_the_rest_are_pointed_to():
    rows = [{"uri": f"/x/{i}.png", "error": f"DecodeError: bad {i}", "row_id": i} for i in range(9)]
    named = named_errors(rows)
    assert [n["film"] for n in named] == [f"{i}.png" for i in range(ERRORS_NAMED)]
    lines = failed_film_lines(named, total=9, output="out/")
    assert lines[0] == "cxrage: failed: 0.png: DecodeError: bad 0"
    assert len(lines) == ERRORS_NAMED + 1
    assert lines[-1].startswith(f"cxrage: {9 - ERRORS_NAMED} more; ") and f"`{ERROR_ROWS_FILTER}`" in lines[-1]
    assert "out/" in lines[-1]
    assert "more" not in failed_film_lines(named[:2], total=2, output="o")[-1]
    assert failed_film_lines([], total=0, output="o") == []


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_score_names_the_failed_films_on_stderr(ray_local, tmp_path, capsys):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    Image.fromarray(radiograph(520, 480, seed=2)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"uri": [str(folder / n) for n in ("good.png", "broken.png", "missing.png")]}).to_csv(
        manifest, index=False)
    weights = tmp_path / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=5), legacy=True, with_opt=False)
    out = tmp_path / "out"
    code = main(["score", str(manifest), str(out), "--weights", str(weights), "--no-progress", "--tta", "none",
                 "--rotation", "off"])
    assert code == EXIT_ROW_ERRORS
    err = capsys.readouterr().err
    assert "cxrage: failed: broken.png: DecodeError: " in err
    assert "cxrage: failed: missing.png: ReadError: not found: missing.png" in err
    assert f"`{ERROR_ROWS_FILTER}` in the Parquet under {out}" in err
    assert PATIENT_FOLDER not in err  # the films' folders are never printed
    lines = err.splitlines()
    assert lines.index(next(l for l in lines if "errors by kind" in l)) < lines.index(
        next(l for l in lines if l.startswith("cxrage: failed: ")))
    summary = json.loads((out / "_cxrage" / "summary.json").read_text())
    assert sorted(f["film"] for f in summary["first_errors"]) == ["broken.png", "missing.png"]
    assert PATIENT_FOLDER not in json.dumps(summary["first_errors"])


def test_preprocess_names_a_failed_film_the_same_way(tmp_path, capsys):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    Image.fromarray(radiograph(300, 280, seed=1)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    assert main(["preprocess", str(folder), str(tmp_path / "pngs"), "--workers", "1"]) == EXIT_ROW_ERRORS
    err = capsys.readouterr().err
    assert "cxrage preprocess: broken.png: DecodeError: " in err and PATIENT_FOLDER not in err
