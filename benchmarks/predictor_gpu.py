"""AgePredictor vs the bare model in a loop, on one GPU (no Ray; runs with torch >= 2.4).

    PYTHONPATH=. python benchmarks/predictor_gpu.py [--batches 128 256 512 1024] [--images 2048]
    PYTHONPATH=. python benchmarks/predictor_gpu.py --device cpu --images 2 --batches 10 --precisions bf16  # script check

For each precision (bf16, fp16) and batch size (in model views; 5 views per image with TTA) it times
  * baseline: the bare CXR-Age network on pre-made normalised views already on the GPU, in a plain loop,
    under autocast + channels_last (the fastest thing one could write by hand), and
  * ours: `AgePredictor.predict` on uint8 512x512 seed-chain pictures in host memory — including the
    host->device copy, the fastai transform, TTA and calibration,
and prints images/s for both and the ratio (target >= 0.9). Weights are seeded random (speed only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cxrage_ray.model.demo import demo_state_dict
from cxrage_ray.model.network import build_model
from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
from cxrage_ray.preprocess.fastai import batch_tta_views


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_bare(model, views: torch.Tensor, batch: int, dtype, n_images: int) -> float:
    n_views = n_images * 5
    with torch.inference_mode(), torch.autocast(views.device.type, dtype=dtype):
        model(views[:batch])  # warm-up
        _sync()
        t = time.perf_counter()
        done = 0
        while done < n_views:
            model(views[:batch]).float().cpu()
            done += batch
        _sync()
    return n_images / (time.perf_counter() - t)


def bench_predictor(predictor: AgePredictor, pictures: list[np.ndarray], batch_images: int) -> float:
    predictor.predict(pictures[:batch_images])  # warm-up
    _sync()
    t = time.perf_counter()
    for start in range(0, len(pictures), batch_images):
        predictor.predict(pictures[start : start + batch_images])
    _sync()
    return len(pictures) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--precisions", nargs="+", choices=["bf16", "fp16"], default=["bf16", "fp16"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu only checks that the script runs (the figures mean nothing there)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (--device cpu only checks the script)")
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (script check only, not a benchmark)"
    print(f"device: {card}; torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    state_dict = demo_state_dict(seed=0)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (512, 512, 1), dtype=np.uint8) for _ in range(args.images)]
    x = torch.from_numpy(np.stack(pictures[:256])).to(device).permute(0, 3, 1, 2).float().div_(255)
    views = batch_tta_views(x).flatten(0, 1).contiguous(memory_format=torch.channels_last)
    views = views.repeat(max(1, max(args.batches) // len(views) + 1), 1, 1, 1)
    model = build_model(state_dict).to(device).to(memory_format=torch.channels_last).eval()
    print(f"{'precision':>9} {'batch':>6} {'bare img/s':>11} {'ours img/s':>11} {'ratio':>6}")
    for name in args.precisions:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        for batch in args.batches:
            bare = bench_bare(model, views, batch, dtype, args.images)
            predictor = AgePredictor(state_dict, PredictorConfig(device=args.device, precision=name, batch_size=batch))
            ours = bench_predictor(predictor, pictures, batch // 5)
            print(f"{name:>9} {batch:>6} {bare:>11.1f} {ours:>11.1f} {ours / bare:>6.2f}")


if __name__ == "__main__":
    main()
