"""On a two-node cluster (head + a node declaring one GPU) the predictor lands on the GPU node and decode elsewhere,
and `--gpu-preprocess on` (the device itinerary) scores the same films to the same ages there. `--gpu-preprocess
auto` asks the GPU node, not the driver, whether nvImageCodec loads: here the driver cannot import it (hidden in
its own process) while the GPU node can, and auto picks the device itinerary; a film whose codestream is damaged
is one error row there, and a rerun scores nothing twice.

Runs in a subprocess because the test session already holds an embedded Ray. The "GPU" node has no CUDA
device here, so the predictor must also fall back to CPU there (environment.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from checkpoints import random_state_dict, save_fastai_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["nvidia.nvimgcodec"] = None  # this driver cannot load nvImageCodec; the nodes' workers can
    from pathlib import Path
    import pyarrow.parquet as pq
    import ray, ray._private.state
    from ray.cluster_utils import Cluster
    from cxrage_ray.config import RayConfig, ScoreConfig
    from cxrage_ray.pipeline.itinerary import score
    from cxrage_ray.predict.predictor import PredictorConfig

    from dataclasses import replace
    from cxrage_ray.decode.nvimgcodec import load_nvimgcodec
    assert load_nvimgcodec() is None
    films, weights, out, out_device, mixed, out_auto = sys.argv[1:7]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    # the GPU node's only CPU is taken by the predictor actor, so CPU tasks cannot run there
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cfg = ScoreConfig(input=films, output=out, weights=weights, progress=False, gpu_preprocess="off",
                      predictor=PredictorConfig(tta="none"), ray=RayConfig(address=cluster.address))
    summary = score(cfg, Path(out) / "home")
    actors = [a for a in ray._private.state.actors().values() if "MapWorker" in a["ActorClassName"]]
    rows = pq.read_table(Path(out) / "parts").to_pandas()
    device_summary = score(replace(cfg, output=out_device, gpu_preprocess="on"), Path(out) / "home")
    device_rows = pq.read_table(Path(out_device) / "parts").to_pandas()
    actors = [a for a in ray._private.state.actors().values() if "MapWorker" in a["ActorClassName"]]
    auto = replace(cfg, input=mixed, output=out_auto, gpu_preprocess="auto")
    auto_summary = score(auto, Path(out) / "home")
    auto_rows = pq.read_table(Path(out_auto) / "parts").to_pandas()
    auto_rerun = score(auto, Path(out) / "home")
    pair = rows.merge(device_rows, on="row_id", suffixes=("", "_device"))
    print(json.dumps({
        "device_summary": device_summary,
        "auto_summary": auto_summary,
        "auto_rerun": auto_rerun,
        "auto_rows": sorted(zip(auto_rows["image_id"], auto_rows["status"], auto_rows["error"].fillna(""),
                                auto_rows["preprocess_engine"])),
        "max_age_diff": float((pair["cxr_age"] - pair["cxr_age_device"]).abs().max()),
        "device_columns": sorted(set(zip(device_rows["decode_device"], device_rows["preprocess_engine"]))),
        "cpu_columns": sorted(set(zip(rows["decode_device"], rows["preprocess_engine"]))),
        "summary": summary,
        "actor_nodes": [a["Address"]["NodeID"] for a in actors],
        "gpu_node": gpu_node.node_id,
        "devices": sorted(set(rows["device"])),
        "gpu_node_cpus": [n["Resources"].get("CPU") for n in ray.nodes() if n["NodeID"] == gpu_node.node_id],
    }))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_predictor_on_gpu_node_decode_elsewhere(tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(40, 220, (300, 280), dtype=np.uint8)).save(films / f"f{i}.png")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(3):
        (mixed / f"f{i}.png").write_bytes((films / f"f{i}.png").read_bytes())
    (mixed / "good.dcm").write_bytes(_j2k_film(seed=1))
    (mixed / "damaged.dcm").write_bytes(_j2k_film(seed=2, keep=0.4))
    weights = tmp_path / "w.pth"
    save_fastai_checkpoint(weights, random_state_dict(seed=2), legacy=False, with_opt=False)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(films), str(weights), str(tmp_path / "out"),
                             str(tmp_path / "out-device"), str(mixed), str(tmp_path / "out-auto")],
                            env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["summary"]["rows_ok"] == 6
    assert report["actor_nodes"], "no Ray Data actor found"
    assert set(report["actor_nodes"]) == {report["gpu_node"]}  # the predictor, and only it, on the GPU node
    assert report["gpu_node_cpus"] == [1.0]
    assert report["devices"] == ["cpu/float32"]  # no CUDA there: CPU fallback
    assert report["summary"]["itinerary"] == {"path": "cpu", "reason": "--gpu-preprocess off"}
    assert report["device_summary"]["itinerary"]["path"] == "device"
    assert report["device_summary"]["rows_ok"] == 6
    assert report["max_age_diff"] == 0.0  # same pictures, same CPU fp32 network
    assert report["cpu_columns"] == [["cpu", "exact"]]
    assert report["device_columns"] == [["cpu", "tensor"]]  # no GPU decoder here: the CPU decoded the bytes
    # auto: the driver could not load nvImageCodec, the GPU node could, and auto went by the node
    assert report["auto_summary"]["itinerary"] == {
        "path": "device", "reason": "auto: nvImageCodec loads on 1 of 1 GPU node(s) (asked on the nodes)"}
    assert report["auto_summary"]["rows_ok"] == 4 and report["auto_summary"]["rows_error"] == 1
    damaged = [row for row in report["auto_rows"] if row[0] == "damaged.dcm"]
    assert len(damaged) == 1 and damaged[0][1] == "error" and damaged[0][2].startswith("DecodeError")
    assert {row[3] for row in report["auto_rows"]} == {"tensor"} and len(report["auto_rows"]) == 5
    assert report["auto_rerun"]["rows_scored_this_run"] == 0 and report["auto_rerun"]["rows_written"] == 5


def _j2k_film(seed: int, keep: float = 1.0) -> bytes:
    """A 12-bit J2K DICOM; with `keep` < 1 its codestream is cut short inside the tile data (the header still
    parses, so the CPU task ships it and the scoring actor's decode fails)."""
    from pydicom.encaps import encapsulate, generate_frames

    from dicomgen import compressed, make_dataset, read, ramp, to_bytes

    ds = read(compressed(make_dataset(ramp(120, 100, bits=12, seed=seed)), "1.2.840.10008.1.2.4.90"))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream[: int(len(stream) * keep)] if keep < 1 else stream])
    return to_bytes(ds)
