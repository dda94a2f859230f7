"""The `cxrage` commands a user meets first: weights handling, preprocess, manifest, usage errors."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from cxrage_ray.model.checkpoint import load_state_dict, sha256_file
from cxrage_ray.cli import EXIT_OK, EXIT_ROW_ERRORS, EXIT_USAGE, main
from cxrage_ray.decode.image import decode_image
from cxrage_ray.preprocess.seed_chain import seed_chain


def test_score_without_cached_weights_says_how_to_get_them(tmp_path, capsys):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a.png")
    env = {"CXRAGE_HOME": str(tmp_path / "home")}
    code = main(["score", str(tmp_path), str(tmp_path / "out"), "--no-fetch"], env=env)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "cxrage weights fetch" in err and "--weights PATH" in err
    assert "0b5a0dbcb91709420c261c749bb9e8f9a8f9287617c2713b86a183c8dbfb7aa7" in err
    assert not (tmp_path / "out" / "parts").exists()


def test_weights_where_and_convert(tmp_path, capsys):
    assert main(["weights", "where"], env={"CXRAGE_HOME": str(tmp_path)}) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(tmp_path / "weights")
    src = tmp_path / "legacy.pth"
    save_fastai_checkpoint(src, random_state_dict(seed=0), legacy=True, with_opt=True)
    dst = tmp_path / "model.safetensors"
    assert main(["weights", "convert", str(src), str(dst)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == sha256_file(dst)
    a, b = load_state_dict(src), load_state_dict(dst)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_demo_weights_are_explicit_and_deterministic(tmp_path):
    main(["weights", "demo", str(tmp_path / "a.pth")])
    main(["weights", "demo", str(tmp_path / "b.pth")])
    a, b = load_state_dict(tmp_path / "a.pth"), load_state_dict(tmp_path / "b.pth")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_preprocess_writes_seed_chain_pngs(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (300, 420), dtype=np.uint8)
    colour = rng.integers(0, 256, (640, 600, 3), dtype=np.uint8)
    Image.fromarray(grey).save(src / "film.png")
    Image.fromarray(colour).save(src / "sub" / "film.tif")  # same stem, other folder: must not collide
    (src / "broken.png").write_bytes(b"not an image")
    code = main(["preprocess", str(src), str(tmp_path / "out"), "--workers", "1"])
    assert code == EXIT_ROW_ERRORS
    for name, out_name, mode in (("film.png", "film.png", "L"), ("sub/film.tif", "sub/film.png", "RGB")):
        expected = seed_chain(decode_image((src / name).read_bytes(), name))
        with Image.open(tmp_path / "out" / out_name) as im:
            assert im.mode == mode
            got = np.asarray(im)
        assert np.array_equal(got.reshape(expected.shape), expected)
        assert min(got.shape[:2]) == 512
    assert not (tmp_path / "out" / "broken.png").exists()


def test_manifest_command_round_trips(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "m.parquet"
    assert main(["manifest", str(tmp_path), str(out)]) == EXIT_OK
    df = pd.read_parquet(out)
    assert sorted(df["image_id"]) == ["0.png", "1.png", "2.png"]


@pytest.mark.parametrize("argv", [["score"], ["score", "a"], ["weights"], ["bogus"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_preprocess_tensor_engine_writes_the_same_pictures(tmp_path, cxr_sample, dicom_sample):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("nih_00002578_000.png", "ieee_000001-24.jpg"):  # an RGBA PNG and a JPEG
        (src / name).write_bytes((cxr_sample / "images" / name).read_bytes())
    (src / "j2k.dcm").write_bytes((dicom_sample / "cxr" / "WG04_RG1_J2KI.dcm").read_bytes())
    (src / "broken.png").write_bytes(b"not an image")
    assert main(["preprocess", str(src), str(tmp_path / "exact"), "--workers", "1"]) == EXIT_ROW_ERRORS
    assert main(["preprocess", str(src), str(tmp_path / "tensor"), "--engine", "tensor"]) == EXIT_ROW_ERRORS
    written = sorted(p.name for p in (tmp_path / "tensor").iterdir())
    assert written == ["ieee_000001-24.png", "j2k.png", "nih_00002578_000.png"]
    for name in written:
        with Image.open(tmp_path / "exact" / name) as a, Image.open(tmp_path / "tensor" / name) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)), name


def test_gpu_preprocess_on_without_a_gpu_is_a_usage_error_before_anything_starts(tmp_path):
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(tmp_path / "film.png")
    started = time.perf_counter()
    code = main(["score", str(tmp_path / "film.png"), str(tmp_path / "out"), "--weights", "demo",
                 "--gpu-preprocess", "on"], env={**os.environ, "CXRAGE_HOME": str(tmp_path / "home")})
    assert code == 2
    assert time.perf_counter() - started < 30  # refused before Ray starts (Ray alone takes longer here)
    assert not (tmp_path / "out").exists()  # nothing left behind
def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_every_option_has_help_and_shows_its_default():
    from cxrage_ray.cli import build_parser

    parser = build_parser()
    for name, sub in [("cxrage", parser), *_subparsers(parser)]:
        for action in sub._actions:
            if action.dest == "help" or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
    text = dict(_subparsers(parser))["score"].format_help()
    for shown in ("(default: seed)", "(default: 10000)", "(default: exact)", "(default: 600.0)", "(default: uri)"):
        assert shown in " ".join(text.split()), shown


def test_version(capsys):
    import cxrage_ray

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"cxrage {cxrage_ray.__version__}"


def test_readme_usage_block_is_the_score_help(monkeypatch):
    """README's `cxrage score --help` block is the parser's help (80 columns), word for word."""
    from conftest import REPO_ROOT
    from cxrage_ray.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    help_text = dict(_subparsers(build_parser()))["score"].format_help()
    readme = (REPO_ROOT / "README.md").read_text()
    marker = "```text\n$ cxrage score --help\n"
    assert marker in readme
    block = readme.split(marker, 1)[1].split("```", 1)[0]
    assert block == help_text


def test_readme_starts_with_exactly_two_commands_and_the_first_scores_the_sample_manifest():
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    head = readme.split("\n## ", 1)[0]
    commands = [block.strip() for block in head.split("```bash\n")[1:]]
    assert len(commands) == 2
    assert "cxrage score ../shared/data/cxr-sample/metadata.csv" in commands[0]
    assert "--uri-column file" in commands[0] and "--weights demo" in commands[0]
