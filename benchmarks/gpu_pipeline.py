"""GPU node throughput: the device itinerary vs the CPU itinerary on the same machine, and the predictor vs the
bare model. One process plus a CPU process pool; no Ray (the GPU machine has none).

    PYTHONPATH=. python benchmarks/gpu_pipeline.py                       # on a CUDA machine, ~3-5 minutes
    PYTHONPATH=. python benchmarks/gpu_pipeline.py --device cpu --cases png --films 2 --seconds 1 \
        --bare-views 10 --batch-views 10 --workers 1                   # script check (tests/test_benchmarks.py)

Per case — (a) JPEG 2000 lossless DICOM of a real 2k CR film (15 bit), (b) JPEG baseline DICOM of real chest
films, (c) 1024² 8-bit PNGs (NIH) — it scores the same films two ways, each end to end from bytes in memory
to ages, with seed TTA and orientation:

  * cpu path: `stages.prepare_batch` (decode, seed chain, orientation on the CPU) in a process pool over all
    cores, feeding `ScoreActor` (the model on the device) in this process — today's GPU-node topology;
  * device path: `payloads.prepare_encoded_batch` (fetch + header parse; PNG inflate) in the same pool,
    feeding `ScoreActor` with `DevicePictures` (GPU decode via nvImageCodec, mapping, tensor seed chain, orientation, model).

It prints films/s for both, the ratio, how many films each decoder took (`decode_device`), whether the device
path's pictures equal the exact path's (pixel by pixel, orientation included) and that both paths gave the same
ages (max |Δ cxr_age|). On a GPU, JPEG is measured twice: as shipped (decoded on the CPU, the exact IDCT) and on
nvJPEG's GPU IDCT (`gpu_jpeg`), with its pixel agreement, so the cost of exactness is a number. Then the
predictor (`AgePredictor.predict` on uint8 512² pictures in host memory) vs the bare network on ready-made
views, eager and `torch.compile`d. On a GPU it stops at once, saying why, if nvImageCodec does not really decode
on the GPU (every figure after would be the CPU's).

Inputs (real films, by path): `--j2k` / `--jpeg` DICOM files (repeated to make up `--films`) and `--png-dir`.
Defaults read `$CXRAGE_SHARED` (`../shared`). On a bare GPU machine run `bash bench-kit/run.sh` (built by
`bash benchmarks/gpu_kit.sh`: pinned wheels and films; see docs/gpu.md). Needs torch, numpy, pillow, pandas,
pydicom + pylibjpeg(-openjpeg, -libjpeg) and, for GPU decode, nvidia-nvimgcodec-cu13 + nvJPEG2000 + nvJPEG
(`pip install 'cxrage-ray[gpu]'`). Weights are seeded random (speed only).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrage_ray.model.demo import demo_state_dict
from cxrage_ray.pipeline.device_pictures import DevicePictures
from cxrage_ray.pipeline.payloads import prepare_encoded_batch
from cxrage_ray.model.network import build_model
from cxrage_ray.config import OrientConfig
from cxrage_ray.predict.predictor import AgePredictor, PredictorConfig
from cxrage_ray.preprocess.fastai import batch_tta_views
from cxrage_ray.config import PrepareSettings
from cxrage_ray.predict.scoring import PreparedPictures, ScoreActor
from cxrage_ray.pipeline.prepare import prepare_batch
from cxrage_ray.config import StorageConfig

SHARED = Path(os.environ.get("CXRAGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
LABELS = {"weights_sha256": "bench", "preprocess": "seed", "tta": "seed", "decode": "exact"}
#: The CPU side works on groups of this many rows (one Ray task's worth in the pipeline).
ROWS_PER_TASK = 16


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def manifest(paths: list[Path], films: int) -> pd.DataFrame:
    """`films` rows cycling through `paths` (the bytes are real; repeating them is what an archive does)."""
    uris = [str(paths[i % len(paths)]) for i in range(films)]
    return pd.DataFrame({"row_id": range(films), "image_id": [f"{i}-{Path(u).name}" for i, u in enumerate(uris)],
                         "uri": uris})


def run_path(rows: pd.DataFrame, prepare, scorer, settings: PrepareSettings, pool: ProcessPoolExecutor,
             images_per_batch: int) -> tuple[float, pd.DataFrame]:
    """Films/s of CPU prepare (pool, in flight all at once) feeding the scorer in this process, and its rows."""
    blocks = [rows.iloc[i:i + ROWS_PER_TASK] for i in range(0, len(rows), ROWS_PER_TASK)]
    sync()
    started = time.perf_counter()
    futures = [pool.submit(prepare, block, settings) for block in blocks]
    pending, scored = [], []
    for future in futures:
        pending.append(future.result())
        while sum(len(p) for p in pending) >= images_per_batch:
            batch = pd.concat(pending)
            scored.append(scorer(batch.iloc[:images_per_batch]))
            pending = [batch.iloc[images_per_batch:]] if len(batch) > images_per_batch else []
    if pending:
        scored.append(scorer(pd.concat(pending)))
    sync()
    elapsed = time.perf_counter() - started
    return len(rows) / elapsed, pd.concat(scored)


def check_gpu_decode(j2k: Path, device: torch.device) -> None:
    """Exit at once, saying why, unless nvImageCodec decodes a real J2K film on this GPU."""
    from cxrage_ray.decode.dicom import encoded_first_frame
    from cxrage_ray.decode.gpu import FrameDecoder

    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception as exc:
        sys.exit(f"STOP: nvImageCodec does not import ({type(exc).__name__}: {exc}); install the kit's wheels "
                 "(bench-kit/run.sh does) — without it every film decodes on the CPU and no figure is the GPU's")
    decoder = FrameDecoder(device)
    if not decoder.uses_nvimgcodec:
        sys.exit("STOP: nvImageCodec imports but its GPU decoder did not start (see the warning above)")
    result = decoder.decode([encoded_first_frame(j2k.read_bytes())])[0]
    if isinstance(result, BaseException) or result.device != "gpu":
        sys.exit(f"STOP: nvImageCodec did not decode {j2k.name} on the GPU: {result!r:.200}")
    print(f"nvImageCodec decodes on {torch.cuda.get_device_name(device)}: ok", flush=True)


def picture_agreement(paths: list[Path], settings: PrepareSettings, device: torch.device, gpu_jpeg: bool) -> str:
    """How many of these films' device-path pictures equal the exact path's, pixel for pixel (and the worst
    difference in 8-bit levels where they differ)."""
    rows = manifest(paths, len(paths))
    exact = PreparedPictures().pictures(prepare_batch(rows, settings))
    source = DevicePictures(orient=settings.orient, gpu_jpeg=gpu_jpeg).start(device)
    made = source.pictures(prepare_encoded_batch(rows, settings))
    equal, worst = 0, 0
    for i, picture in exact.items():
        other = made[i].cpu().numpy() if i in made else None
        if other is not None and other.shape == picture.shape:
            diff = int(np.abs(other.astype(np.int16) - picture.astype(np.int16)).max())
            equal, worst = equal + (diff == 0), max(worst, diff)
        else:
            worst = 255
    return f"{equal}/{len(paths)}" + (f" (max |Δ| {worst})" if worst else "")


def bench_case(name: str, paths: list[Path], args, state_dict, pool, gpu_jpeg: bool = False) -> dict:
    rows = manifest(paths, args.films)
    settings = PrepareSettings(storage=StorageConfig(), orient=OrientConfig())
    config = PredictorConfig(device=args.device, batch_size=args.batch_views)
    images = max(1, args.batch_views // 5)
    cpu_stage = ScoreActor([state_dict], config, {**LABELS, "decode_device": "cpu", "preprocess_engine": "exact"})
    device_stage = ScoreActor([state_dict], config, {**LABELS, "preprocess_engine": "tensor"},
                              source=DevicePictures(orient=OrientConfig(), gpu_jpeg=gpu_jpeg))
    warm = rows.iloc[: min(len(rows), images)]
    cpu_stage(prepare_batch(warm, settings))  # model load, compile, codec start-up: not part of the figure
    device_stage(prepare_encoded_batch(warm, settings))
    cpu_rate, cpu_rows = run_path(rows, prepare_batch, cpu_stage, settings, pool, images)
    dev_rate, dev_rows = run_path(rows, prepare_encoded_batch, device_stage, settings, pool, images)
    ok = (cpu_rows["status"] == "ok").to_numpy() & (dev_rows["status"] == "ok").to_numpy()
    diff = np.abs(cpu_rows["cxr_age"].to_numpy()[ok] - dev_rows["cxr_age"].to_numpy()[ok])
    decoded = dev_rows["decode_device"].fillna("none").value_counts()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    return {"case": name, "films": len(rows), "cpu_path": cpu_rate, "device_path": dev_rate,
            "ratio": dev_rate / cpu_rate, "decode_device": ",".join(f"{k}:{v}" for k, v in sorted(decoded.items())),
            "pictures_equal": picture_agreement(sorted(set(paths))[:args.agree_films], settings, device, gpu_jpeg),
            "ok": f"{int(ok.sum())}/{len(rows)}", "max_age_diff": float(diff.max()) if ok.any() else float("nan")}


def bench_predictor(args, state_dict) -> list[dict]:
    """AgePredictor on host pictures vs the bare network on ready views (eager and compiled), views/s -> films/s."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.bare_views
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(max(1, batch // 5) * 4)]
    model = build_model(state_dict).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.stack(pictures[: max(1, batch // 5)]))[:, None].to(device).float().div_(255)
    views = batch_tta_views(x).flatten(0, 1)[:batch].contiguous(
        memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)

    def bare_rate(net) -> float:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            net(views)
            sync()
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < args.seconds:
                net(views).float().cpu()
                done += len(views)
            sync()
        return done / 5 / (time.perf_counter() - started)

    results = [{"what": "bare network, eager", "films_per_s": bare_rate(model)}]
    if device.type == "cuda":
        results.append({"what": "bare network, torch.compile", "films_per_s": bare_rate(torch.compile(model))})
    predictor = AgePredictor(state_dict, PredictorConfig(device=device.type, batch_size=batch))
    per_call = max(1, batch // 5)
    predictor.predict(pictures[:per_call])
    sync()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        chunk = pictures[(done % len(pictures)):][:per_call] or pictures[:per_call]
        predictor.predict(chunk)
        done += len(chunk)
    sync()
    rate = done / (time.perf_counter() - started)
    results.append({"what": f"AgePredictor (compiled={predictor.compiled})", "films_per_s": rate})
    reference = results[-2]["films_per_s"]
    for r in results:
        r["vs_best_bare"] = r["films_per_s"] / reference
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = SHARED / "data"
    parser.add_argument("--j2k", type=Path, nargs="+", default=[data / "dicom-sample/cxr/WG04_RG1_J2KR.dcm"])
    parser.add_argument("--jpeg", type=Path, nargs="+", default=[
        data / "dicom-sample/cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm",
        data / "dicom-sample/cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm"])
    parser.add_argument("--png-dir", type=Path, default=data / "cxr-sample/images")
    parser.add_argument("--films", type=int, default=256, help="films per case and path")
    parser.add_argument("--batch-views", type=int, default=640, help="model views per forward pass")
    parser.add_argument("--bare-views", type=int, default=1020, help="views per forward pass in the predictor check")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per predictor/bare measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU processes (all cores)")
    parser.add_argument("--agree-films", type=int, default=12, help="distinct films per case compared pixel by pixel")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--cases", nargs="+", choices=["j2k", "jpeg", "png"], default=["j2k", "jpeg", "png"])
    args = parser.parse_args()

    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'CPU (script check only: no GPU figures)'}; "
          f"{args.workers} CPU workers; torch {torch.__version__}")
    if on_gpu:
        check_gpu_decode(Path(args.j2k[0]), torch.device("cuda"))
    state_dict = demo_state_dict()
    pngs = sorted(args.png_dir.glob("nih_*.png"))[:32]
    cases = [(title, paths) for key, title, paths in (("j2k", "J2K-lossless DICOM 2k 15-bit", args.j2k),
                                                       ("jpeg", "JPEG DICOM", args.jpeg), ("png", "1024² PNG", pngs))
             if key in args.cases]
    rows = []
    # spawned, not forked: a fork of a process whose torch threads are running can hang in the child
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, paths in cases:
            variants = [False, True] if on_gpu and name == "JPEG DICOM" else [False]
            for gpu_jpeg in variants:  # on a GPU, JPEG as shipped (CPU IDCT) and on nvJPEG's GPU IDCT
                label = f"{name} (nvJPEG GPU IDCT)" if gpu_jpeg else name
                rows.append(bench_case(label, [Path(p) for p in paths], args, state_dict, pool, gpu_jpeg))
                print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)
    print("\nend to end, films/s (bytes in memory -> ages, seed TTA, orientation):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\npredictor vs bare network:")
    print(pd.DataFrame(bench_predictor(args, state_dict)).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
