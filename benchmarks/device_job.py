"""A device-itinerary job with bad films among many, chosen by `--gpu-preprocess auto` on the GPU node, then rerun.

Issue 37's "a job with bad films among 1,000 finishes, and its rerun scores nothing twice". A two-node loopback
cluster (`ray.cluster_utils.Cluster`: a 3-CPU head and a node declaring one GPU) whose driver cannot import
nvImageCodec while the nodes' workers can, so auto is decided by the GPU node (as in
tests/test_cluster_placement.py). The films: real NIH radiographs from ../shared shrunk to ~100 px (so the run's
time is the pipeline's, not the network's), good and damaged 12-bit J2K DICOMs (the damaged ones' codestreams
are cut short: the header parses, so the CPU task ships them and the scoring actor's decode fails), and one
truncated PNG (fails in the CPU task). Prints one JSON line: the itinerary, rows, errors by kind, and what the
rerun scored and wrote.

    python benchmarks/device_job.py                    # 1,000 films: 990 PNG, 5 good + 4 damaged J2K, 1 truncated PNG
    python benchmarks/device_job.py --films 200 --damaged 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.modules["nvidia.nvimgcodec"] = None  # this driver cannot load nvImageCodec; the nodes' workers can

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from checkpoints import random_state_dict, save_fastai_checkpoint  # noqa: E402
from test_cluster_placement import _j2k_film  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "cxr-sample" / "images"


def make_films(folder: Path, films: int, damaged: int, good_j2k: int) -> None:
    """`films` films in all: real NIH PNGs shrunk, `good_j2k` + `damaged` J2K DICOMs and one truncated PNG."""
    folder.mkdir(parents=True)
    nih = sorted(SAMPLE.glob("nih_*.png"))
    pngs = films - damaged - good_j2k - 1
    for k in range(pngs):
        Image.open(nih[k % len(nih)]).convert("L").resize((96 + k % 9, 90 + k % 7)).save(folder / f"f{k:05d}.png")
    for k in range(damaged):
        (folder / f"damaged{k}.dcm").write_bytes(_j2k_film(seed=k, keep=0.4))
    for k in range(good_j2k):
        (folder / f"good{k}.dcm").write_bytes(_j2k_film(seed=100 + k))
    (folder / "truncated.png").write_bytes((folder / "f00001.png").read_bytes()[:200])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, default=1000)
    parser.add_argument("--damaged", type=int, default=4, help="J2K films whose codestream is cut short")
    parser.add_argument("--good-j2k", type=int, default=5)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from cxrage_ray.config import RayConfig, ScoreConfig
    from cxrage_ray.pipeline.itinerary import score
    from cxrage_ray.predict.predictor import PredictorConfig

    with tempfile.TemporaryDirectory(prefix="cxrage-device-job-") as tmp:
        root = Path(tmp)
        make_films(root / "films", args.films, args.damaged, args.good_j2k)
        weights = root / "w.pth"
        save_fastai_checkpoint(weights, random_state_dict(seed=2), legacy=False, with_opt=False)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address)
        try:
            cfg = ScoreConfig(input=str(root / "films"), output=str(root / "out"), weights=str(weights),
                              progress=False, gpu_preprocess="auto", predictor=PredictorConfig(tta="none"),
                              ray=RayConfig(address=cluster.address))
            started = time.perf_counter()
            first = score(cfg, root / "home")
            first_s = time.perf_counter() - started
            started = time.perf_counter()
            again = score(cfg, root / "home")
            again_s = time.perf_counter() - started
            rows = pq.read_table(root / "out" / "parts").to_pandas()
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps({
        "films": args.films, "itinerary": first["itinerary"], "rows_written": first["rows_written"],
        "rows_ok": first["rows_ok"], "errors_by_kind": first["errors_by_kind"], "first_run_s": round(first_s, 1),
        "rerun_scored": again["rows_scored_this_run"], "rerun_rows_written": again["rows_written"],
        "rerun_s": round(again_s, 1), "rows_in_output": len(rows), "unique_row_ids": int(rows["row_id"].nunique()),
    }))


if __name__ == "__main__":
    main()
