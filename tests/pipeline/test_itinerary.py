"""End-to-end `cxrage score` on a real local Ray: contract columns, error rows, CSV, resume, carried columns."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint
from cxrage_ray.model.checkpoint import sha256_file
from cxrage_ray.cli import EXIT_ROW_ERRORS, EXIT_USAGE, main
from cxrage_ray.decode.image import decode_image
from cxrage_ray.model.network import calibrate
from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
from cxrage_ray.preprocess.seed_chain import seed_chain

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

CONTRACT = ["image_id", "uri", "status", "error", "cxr_age", "raw", "raw_sd", "weights_sha256", "preprocess", "tta"]


def _film(seed: int, shape=(600, 520)) -> np.ndarray:
    """A smooth radiograph-like 8-bit picture with a dark border (so the trim has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    body = 120 + 80 * np.sin(x / (40 + seed)) * np.cos(y / 55) + rng.normal(0, 6, shape)
    img = np.clip(body, 0, 255).astype(np.uint8)
    img[:12], img[:, :9] = 0, 0
    return img


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "PLCO_like.pth"
    save_fastai_checkpoint(path, random_state_dict(seed=11), legacy=True, with_opt=True)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, cxr_sample_optional):
    root = tmp_path_factory.mktemp("archive")
    (root / "sub").mkdir()
    Image.fromarray(_film(1)).save(root / "a.png")
    Image.fromarray(np.dstack([_film(2)] * 3)).save(root / "sub" / "b.jpg", quality=92)
    Image.fromarray((_film(3).astype(np.uint16) * 257)).save(root / "c.tif")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (root / "empty.png").write_bytes(b"")
    if cxr_sample_optional is not None:
        for name in sorted(p.name for p in (cxr_sample_optional / "images").iterdir())[:2]:
            shutil.copy(cxr_sample_optional / "images" / name, root / name)
    return root


@pytest.fixture(scope="module")
def cxr_sample_optional():
    from conftest import shared_root

    path = shared_root() / "data" / "cxr-sample"
    return path if path.is_dir() else None


def _read(out) -> pd.DataFrame:
    return pq.read_table(out / "parts").to_pandas().sort_values("image_id").reset_index(drop=True)


def test_score_folder_end_to_end(ray_local, archive, weights, tmp_path):
    out, csv = tmp_path / "out", tmp_path / "orig.csv"
    code = main(["score", str(archive), str(out), "--weights", str(weights), "--no-progress", "--csv", str(csv),
                 "--rotation", "off"])
    assert code == EXIT_ROW_ERRORS  # two bad files -> error rows, job finished
    df = _read(out)
    n_files = sum(1 for p in archive.rglob("*") if p.is_file())
    assert len(df) == n_files and df["row_id"].is_unique
    assert set(CONTRACT) <= set(df.columns)
    errors = df.set_index("image_id")["error"]
    assert errors["empty.png"].startswith("EmptyFileError:")
    assert errors["corrupt.png"].startswith("DecodeError:")
    ok = df[df["status"] == "ok"]
    assert len(ok) == n_files - 2 and ok["error"].isna().all()
    assert ok["weights_sha256"].eq(sha256_file(weights)).all()
    assert ok["preprocess"].eq("seed").all() and ok["tta"].eq("seed").all()
    np.testing.assert_array_equal(ok["cxr_age"].to_numpy(), calibrate(ok["raw"].to_numpy()))
    assert (ok["raw_sd"] > 0).all()
    assert df.loc[df["status"] == "error", "cxr_age"].isna().all()

    # the same numbers as the stages run by hand, without Ray
    predictor = AgePredictor(random_state_dict(seed=11), PredictorConfig(device="cpu"))
    row = ok[ok["image_id"] == "sub/b.jpg"].iloc[0]
    picture = seed_chain(decode_image((archive / "sub" / "b.jpg").read_bytes(), "b.jpg"))
    np.testing.assert_allclose(row["raw"], predictor.predict([picture]).raw[0], atol=1e-5)

    original = pd.read_csv(csv)
    assert list(original.columns) == ["Unnamed: 0", "File", "SD_Prediction", "CXR_Age"]
    assert len(original) == len(ok)
    summary = pd.read_json(out / "_cxrage" / "summary.json", typ="series")
    assert summary["rows_ok"] == len(ok) and summary["rows_error"] == 2 and summary["complete"]


def test_rerun_resumes_without_duplicates(ray_local, archive, weights, tmp_path):
    out = tmp_path / "out"
    args = ["score", str(archive), str(out), "--weights", str(weights), "--no-progress", "--tta", "none",
            "--rotation", "off"]
    main(args)
    first = _read(out)
    # simulate an interruption that lost the last part: drop half the rows from the committed part
    part = next((out / "parts").glob("*.parquet"))
    table = pq.read_table(part)
    keep = table.slice(0, len(table) // 2)
    part.unlink()
    pq.write_table(keep, out / "parts" / "part-kept-00000.parquet")
    main(args)
    second = _read(out)
    assert len(second) == len(first) and second["row_id"].is_unique
    pd.testing.assert_series_equal(second["raw"], first["raw"])
    assert second["raw_sd"].isna().all()  # --tta none
    summary = pd.read_json(out / "_cxrage" / "summary.json", typ="series")
    assert summary["rows_scored_this_run"] == len(first) - len(keep)


def test_manifest_columns_carried_and_age_gap(ray_local, archive, weights, tmp_path):
    manifest = pd.DataFrame(
        {"uri": ["a.png", "c.tif"], "image_id": ["A", "C"], "age": [61.0, None], "site": ["north", "south"]}
    )
    manifest.to_csv(archive / "manifest.csv", index=False)
    out = tmp_path / "out"
    assert main(["score", str(archive / "manifest.csv"), str(out), "--weights", str(weights), "--no-progress"]) == 0
    df = _read(out).set_index("image_id")
    assert df.loc["A", "site"] == "north" and df.loc["C", "site"] == "south"
    assert df.loc["A", "chronological_age"] == 61.0
    assert df.loc["A", "cxr_age_gap"] == pytest.approx(df.loc["A", "cxr_age"] - 61.0)
    assert pd.isna(df.loc["C", "cxr_age_gap"])


def test_changed_settings_refuse_to_mix_results(ray_local, archive, weights, tmp_path):
    out = tmp_path / "out"
    manifest = pd.DataFrame({"uri": ["a.png"]})
    manifest.to_csv(archive / "one.csv", index=False)
    base = ["score", str(archive / "one.csv"), str(out), "--weights", str(weights), "--no-progress"]
    assert main(base) == 0
    assert main(base + ["--tta", "none"]) == EXIT_USAGE
    assert main(base + ["--tta", "none", "--overwrite"]) == 0
    assert _read(out)["tta"].tolist() == ["none"]


def test_missing_input_is_a_usage_error(tmp_path, weights, capsys):
    assert main(["score", str(tmp_path / "nope"), str(tmp_path / "o"), "--weights", str(weights)]) == EXIT_USAGE
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["grad", "gradcam"])
def test_saliency_maps_written_and_scores_unchanged(ray_local, archive, weights, tmp_path, method):
    pd.DataFrame({"uri": ["a.png", "sub/b.jpg", "empty.png"]}).to_csv(archive / "sal.csv", index=False)
    base = ["score", str(archive / "sal.csv"), "--weights", str(weights), "--no-progress", "--tta", "none",
            "--rotation", "off"]
    main([base[0], base[1], str(tmp_path / "plain"), *base[2:]])
    sal_dir = tmp_path / "maps"
    main([base[0], base[1], str(tmp_path / "sal"), *base[2:], "--saliency", str(sal_dir),
          "--saliency-method", method])
    plain, with_maps = _read(tmp_path / "plain"), _read(tmp_path / "sal")
    pd.testing.assert_series_equal(plain["raw"], with_maps["raw"])
    maps = with_maps.set_index("image_id")["saliency_uri"]
    assert pd.isna(maps["empty.png"])
    for image_id in ("a.png", "sub/b.jpg"):
        path = sal_dir / (image_id.rsplit(".", 1)[0] + ".png")
        assert maps[image_id] == str(path)
        picture = seed_chain(decode_image((archive / image_id).read_bytes(), image_id))
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (picture.shape[1], picture.shape[0])
            assert np.asarray(im).std() > 0


def test_rotated_films_score_like_their_upright_originals(ray_local, cxr_sample, weights, tmp_path):
    """Correction happens before the seed chain, so a turned film's score equals its upright original's."""
    meta = pd.read_csv(cxr_sample / "metadata.csv")
    names = meta[(meta["view"] == "PA") & (meta["age"] >= 18)]["file"].head(2).tolist()
    folder = tmp_path / "films"
    folder.mkdir()
    for i, name in enumerate(names):
        with Image.open(cxr_sample / name) as im:
            upright = np.asarray(im.convert("L"))
        Image.fromarray(upright).save(folder / f"upright{i}.png")
        Image.fromarray(np.rot90(upright, k=-1)).save(folder / f"turned{i}.png")  # input lying 90 cw
    Image.fromarray(np.rot90(upright, k=2)).save(folder / "listed.png")
    (tmp_path / "rotations.csv").write_text("file,degrees\nlisted.png,180\n")
    out = tmp_path / "out"
    main(["score", str(folder), str(out), "--weights", str(weights), "--no-progress", "--tta", "none",
          "--rotation-list", str(tmp_path / "rotations.csv")])
    df = _read(out).set_index("image_id")
    for i in range(len(names)):
        up, turned = df.loc[f"upright{i}.png"], df.loc[f"turned{i}.png"]
        assert (up["orientation"], up["rotation_source"]) == (0, "model")
        assert (turned["orientation"], turned["rotation_source"]) == (90, "model")
        # identical pictures; only batch composition differs (oneDNN sums by batch size): float error
        assert turned["raw"] == pytest.approx(up["raw"], abs=1e-5)
    listed = df.loc["listed.png"]
    assert (listed["orientation"], listed["rotation_source"]) == (180, "list")
    assert listed["raw"] == pytest.approx(df.loc[f"upright{len(names) - 1}.png", "raw"], abs=1e-5)


def test_skip_flagged_rows_are_kept_as_error_rows(ray_local, weights, tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    Image.fromarray(np.full((600, 600), 128, np.uint8)).save(folder / "blank.png")
    Image.fromarray(_film(5)).save(folder / "film.png")
    out = tmp_path / "out"
    main(["score", str(folder), str(out), "--weights", str(weights), "--no-progress", "--tta", "none",
          "--rotation", "off", "--skip-flagged"])
    df = _read(out).set_index("image_id")
    assert df.loc["blank.png", "status"] == "error"
    assert df.loc["blank.png", "error"].startswith("FlaggedSkipped:")
    assert "blank" in list(df.loc["blank.png", "qc"])


def test_retry_errors_rescores_only_error_rows(ray_local, archive, weights, tmp_path):
    late = tmp_path / "late.png"  # missing at first: a ReadError row
    manifest = pd.DataFrame({"uri": [str(archive / "a.png"), str(late), str(archive / "corrupt.png")]})
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    base = ["score", str(tmp_path / "m.csv"), str(out), "--weights", str(weights), "--no-progress", "--tta", "none"]
    assert main(base) == EXIT_ROW_ERRORS
    first = _read(out).set_index("uri")
    assert first.loc[str(late), "error"].startswith("ReadError")

    Image.fromarray(_film(4)).save(late)  # the file arrives
    assert main(base) == EXIT_ROW_ERRORS  # a plain rerun keeps committed error rows
    assert pd.read_json(out / "_cxrage" / "summary.json", typ="series")["rows_scored_this_run"] == 0

    assert main(base + ["--retry-kinds", "in.csv"]) == EXIT_USAGE  # not an error kind
    assert main(base + ["--retry-kinds", "ReadError"]) == EXIT_ROW_ERRORS  # the corrupt file is still bad
    summary = pd.read_json(out / "_cxrage" / "summary.json", typ="series")
    assert summary["rows_scored_this_run"] == 1
    after = _read(out)
    assert sorted(after["row_id"]) == [0, 1, 2]  # one row per manifest row, no duplicates
    after = after.set_index("uri")
    assert after.loc[str(late), "status"] == "ok" and np.isfinite(after.loc[str(late), "cxr_age"])
    assert after.loc[str(archive / "a.png"), "cxr_age"] == first.loc[str(archive / "a.png"), "cxr_age"]
    assert after.loc[str(archive / "corrupt.png"), "error"].startswith("DecodeError")

    assert main(base + ["--retry-errors"]) == EXIT_ROW_ERRORS  # every kind: the corrupt row is scored again
    assert pd.read_json(out / "_cxrage" / "summary.json", typ="series")["rows_scored_this_run"] == 1
    assert sorted(_read(out)["row_id"]) == [0, 1, 2]


def test_choose_itinerary_auto_needs_a_gpu_and_nvimgcodec_on_the_gpu_nodes_and_says_why():
    from cxrage_ray.config import ScoreConfig
    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.errors import InputError
    from cxrage_ray.pipeline.plan import GpuDecoders, check_gpu_request, choose_itinerary, wants_decoder_probe
    from cxrage_ray.predict.predictor import PredictorConfig

    auto = ScoreConfig(input="in", output="out")
    everywhere, one_of_two = GpuDecoders(nodes=2, loaded=2), GpuDecoders(nodes=2, loaded=1, unanswered=1)
    chosen = choose_itinerary(auto, cluster_gpus=2, decoders=everywhere)
    assert (chosen.path, chosen.reason) == ("device", "auto: nvImageCodec loads on 2 of 2 GPU node(s) (asked on the nodes)")
    assert choose_itinerary(auto, cluster_gpus=0, decoders=GpuDecoders()).reason == "auto: no GPU in the cluster"
    partial = choose_itinerary(auto, cluster_gpus=2, decoders=one_of_two)
    assert partial.path == "cpu" and "1 of 2 GPU node(s)" in partial.reason and "1 did not answer" in partial.reason
    assert "nobody" not in partial.reason and "[gpu]" in partial.reason
    assert choose_itinerary(auto, cluster_gpus=1, decoders=GpuDecoders()).path == "cpu"
    assert wants_decoder_probe(auto)
    for changed, reason in ((dict(preprocess="none"), "--preprocess none"),
                            (dict(decode=DecodeOptions(mode="fast")), "--decode fast"),
                            (dict(predictor=PredictorConfig(device="cpu")), "--device cpu")):
        chosen = choose_itinerary(replace(auto, **changed), cluster_gpus=1, decoders=everywhere)
        assert (chosen.path, chosen.reason) == ("cpu", f"auto: {reason}")
        assert not wants_decoder_probe(replace(auto, **changed))  # nobody is asked when the answer cannot matter
    assert choose_itinerary(replace(auto, gpu_preprocess="off"), cluster_gpus=1, decoders=everywhere).path == "cpu"
    on = replace(auto, gpu_preprocess="on")
    assert not wants_decoder_probe(on)
    assert choose_itinerary(on, cluster_gpus=1, decoders=GpuDecoders()).path == "device"  # decodes on CPUs if it must
    with pytest.raises(InputError, match="no GPU resources"):
        choose_itinerary(on, cluster_gpus=0, decoders=everywhere)
    check_gpu_request(on, local_cuda=lambda: True)
    with pytest.raises(InputError, match="no CUDA GPU"):
        check_gpu_request(on, local_cuda=lambda: False)
    for changed in (dict(preprocess="none"), dict(decode=DecodeOptions(mode="fast")),
                    dict(predictor=PredictorConfig(device="cpu"))):
        with pytest.raises(InputError):
            check_gpu_request(replace(on, **changed), local_cuda=lambda: True)


def test_the_driver_reaches_ray_init_without_importing_torch():
    """Importing torch (+ torchvision) costs the driver ~2.5 s on a 2-core machine; on the way to `ray.init` it
    must not happen, so Ray starts while a thread loads the weights (issue 15)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "import cxrage_ray.cli, cxrage_ray.pipeline.itinerary, cxrage_ray.manifest.build, cxrage_ray.runtime.preflight, cxrage_ray.write.spill\n"
        "from cxrage_ray.config import PredictorConfig, RayConfig, ScoreConfig\n"
        "from cxrage_ray.config import OrientConfig\n"
        "ScoreConfig(input='in', output='out', predictor=PredictorConfig(device='cpu'), ray=RayConfig(),\n"
        "            orient=OrientConfig(mode='off'))\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    from cxrage_ray.config import PredictorConfig as defined
    from cxrage_ray.predict.predictor import PredictorConfig as exported

    assert exported is defined  # `from cxrage_ray.predict.predictor import PredictorConfig` keeps working


def test_cpu_predictor_actors_share_the_embedded_nodes_cores():
    from cxrage_ray.pipeline.plan import CpuInference, cpu_inference_layout

    assert cpu_inference_layout(1, cores=2) == CpuInference(actors=1, threads=2)
    assert cpu_inference_layout(2, cores=2) == CpuInference(actors=2, threads=1)
    assert cpu_inference_layout(3, cores=8) == CpuInference(actors=3, threads=2)
    assert cpu_inference_layout(4, cores=2) == CpuInference(actors=4, threads=1)  # never fewer than one thread
    # on a cluster the actors' nodes are not this machine: every core of the actor's own node
    assert cpu_inference_layout(2, cores=None) == CpuInference(actors=2, threads=0)


def test_the_first_block_holds_a_whole_predictor_batch():
    """The predictor's actor waits for a whole batch of rows: a smaller first block would only wait for the
    second; and it stays no larger than a seed-chain task's where the batch allows."""
    from cxrage_ray.config import LIGHT_ROWS_PER_TASK, SEED_ROWS_PER_TASK
    from cxrage_ray.pipeline.plan import first_block_rows

    assert first_block_rows(LIGHT_ROWS_PER_TASK, images_per_batch=32) == 32  # --preprocess none --batch-size 32
    assert first_block_rows(LIGHT_ROWS_PER_TASK, images_per_batch=12) == SEED_ROWS_PER_TASK  # small batches
    assert first_block_rows(SEED_ROWS_PER_TASK, images_per_batch=12) == SEED_ROWS_PER_TASK  # seed chain + TTA
    assert first_block_rows(SEED_ROWS_PER_TASK, images_per_batch=128) == SEED_ROWS_PER_TASK  # never over a task
    assert first_block_rows(LIGHT_ROWS_PER_TASK, images_per_batch=500) == LIGHT_ROWS_PER_TASK


def test_a_scoring_batch_holds_the_films_that_fill_whole_passes():
    """Films per actor batch: the fewest whose views fill whole forward passes, so only a batch's last pass is
    padded (`PredictorConfig.fixed_shape`)."""
    from cxrage_ray.pipeline.plan import CPU_BATCH_VIEWS, CPU_CONCURRENT_VIEWS, GPU_BATCH_VIEWS, films_per_batch

    assert films_per_batch(CPU_BATCH_VIEWS, 5) == 16 and films_per_batch(CPU_BATCH_VIEWS, 1) == 16
    assert films_per_batch(GPU_BATCH_VIEWS, 5) == 128 and films_per_batch(GPU_BATCH_VIEWS, 1) == 640
    assert films_per_batch(64, 5) == 64  # 320 views: 5 passes of 64
    assert films_per_batch(10, 5) == 2 and films_per_batch(7, 5) == 7
    assert films_per_batch(CPU_CONCURRENT_VIEWS, 5) == 8 and films_per_batch(CPU_CONCURRENT_VIEWS, 1) == 8


def test_a_cpu_actor_on_the_embedded_node_scores_a_one_thread_batch_per_core():
    from cxrage_ray.config import PredictorConfig
    from cxrage_ray.pipeline.plan import CpuInference, cpu_predictor

    auto = PredictorConfig(device="cpu")
    assert cpu_predictor(auto, CpuInference(1, 2)) == (replace(auto, num_threads=1), 2)
    assert cpu_predictor(auto, CpuInference(2, 1)) == (replace(auto, num_threads=1), 1)  # a core each: one call
    assert cpu_predictor(auto, CpuInference(1, 0)) == (replace(auto, num_threads=0), 1)  # a cluster node
    chosen = replace(auto, num_threads=3)
    assert cpu_predictor(chosen, CpuInference(1, 2)) == (chosen, 1)  # the caller's thread count is kept
    bf16 = replace(auto, precision="bf16")  # OpenVINO schedules its own threads
    assert cpu_predictor(bf16, CpuInference(1, 2)) == (replace(bf16, num_threads=2), 1)
    # saliency maps hook the one model: one call at a time
    assert cpu_predictor(auto, CpuInference(1, 2), concurrent_safe=False) == (replace(auto, num_threads=2), 1)


def test_two_predictor_actors_share_the_cores_and_score_like_one(ray_local, archive, weights, tmp_path, caplog):
    """Two CPU actors (batch 2, no TTA) get half this machine's cores each: every row scored once, the same ages
    as one actor's."""
    import logging
    import os

    films = [archive / "a.png", archive / "sub" / "b.jpg", archive / "c.tif"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image_id": [f"r{i}" for i in range(24)],
                  "uri": [str(films[i % len(films)]) for i in range(24)]}).to_csv(manifest, index=False)
    common = [str(manifest), "--weights", str(weights), "--no-progress", "--tta", "none", "--batch-size", "2",
              "--rotation", "off", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="cxrage_ray.pipeline.itinerary"):
        assert main(["score", common[0], str(tmp_path / "two"), *common[1:], "--predict-actors", "2"]) == 0
    half = max(1, len(os.sched_getaffinity(0)) // 2)  # one each on this project's 2-core machines
    calls = half if half > 1 else 1  # more than a core each: a one-thread batch per core (plan.cpu_predictor)
    threads = 1
    assert (f"CPU inference: 2 predictor actor(s), {calls} batch(es) at once each, torch threads each: {threads}"
            in caplog.text)
    assert main(["score", common[0], str(tmp_path / "one"), *common[1:], "--predict-actors", "1"]) == 0
    two, one = _read(tmp_path / "two"), _read(tmp_path / "one")
    assert len(two) == 24 and two["row_id"].is_unique and (two["status"] == "ok").all()
    ages = two.set_index("image_id")["cxr_age"].sort_index()
    assert np.allclose(ages, one.set_index("image_id")["cxr_age"].sort_index(), rtol=0, atol=1e-4)


def test_each_scored_block_reaches_the_driver_before_the_next_is_done(ray_local, tmp_path):
    """The driver commits a block as soon as it is done: the second block's task waits for the driver to have
    the first's record (Ray Data's default prefetch held the first back until the second was there)."""
    import ray

    from cxrage_ray.pipeline.itinerary import arriving_blocks
    from cxrage_ray.write.pending import BlockRecord
    from cxrage_ray.write.records import PartRecord

    seen_first = tmp_path / "driver-has-the-first-block"

    def second_waits(batch: pd.DataFrame) -> pd.DataFrame:
        import time

        waited = False
        if batch["id"].iloc[0] == 1:
            deadline = time.monotonic() + 30
            while not seen_first.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            waited = not seen_first.exists()
        block = BlockRecord(f"pending-{batch['id'].iloc[0]}-timed-out-{waited}", PartRecord(rows=1, ok=1))
        return pd.DataFrame([block.as_row()])

    dataset = ray.data.range(2, override_num_blocks=2).map_batches(
        second_waits, batch_format="pandas", batch_size=None, concurrency=2)
    blocks = []
    for block in arriving_blocks(dataset):
        blocks.append(block.pending)
        seen_first.touch()
    assert sorted(blocks) == ["pending-0-timed-out-False", "pending-1-timed-out-False"]
