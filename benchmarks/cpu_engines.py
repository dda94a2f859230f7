"""Benchmark: the CXR-Age network on this CPU through each inference engine, in one process.

In:  seeded random weights in the published format (`cxrage_ray.model.demo`; speed and rounding only, the ages
     mean nothing), a batch of `--batch` normalised 224² views (smooth random pictures).
Out: per engine, views/s (best of `--repeats`), the ratio against torch eager fp32 NCHW (what `AgePredictor` ran on
     CPU before issue 22), and max |Δ raw| against it. Engines take turns inside every repeat (the order rotates
     each repeat), so a busy machine slows all of them alike.

Engines (an engine whose package is missing is listed as skipped):
    nchw            torch eager fp32, NCHW weights and inputs, no_grad
    nchw-infer      the same under torch.inference_mode
    channels_last   torch eager fp32, channels_last weights and inputs (inference_mode)
    cl-folded       channels_last with the body's batch norms folded into the convolutions
    bf16-autocast   torch bf16 autocast (oneDNN), channels_last
    openvino-fp32   OpenVINO, INFERENCE_PRECISION_HINT f32          (pip install openvino)
    openvino-bf16   OpenVINO, INFERENCE_PRECISION_HINT bf16
    onnxruntime     onnxruntime fp32, CPU provider                  (pip install onnxruntime)

    python benchmarks/cpu_engines.py [--batch 64] [--repeats 3] [--threads 0] [--engines nchw channels_last ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from cxrage_ray.model.demo import demo_state_dict
from cxrage_ray.model.network import build_model
from cxrage_ray.predict.predictor import fold_batchnorm

Engine = Callable[[torch.Tensor], np.ndarray]


def views(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, 14, 14, generator=generator)
    pictures = torch.nn.functional.interpolate(noise, size=224, mode="bicubic", align_corners=False)
    return ((pictures - 0.45) / 0.226).contiguous()


def torch_engine(model: torch.nn.Module, channels_last: bool, inference: bool, bf16: bool = False) -> Engine:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    context = torch.inference_mode if inference else torch.no_grad

    def run(x: torch.Tensor) -> np.ndarray:
        with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return model(x).float()[:, 0].double().numpy()

    return run


def openvino_engine(model: torch.nn.Module, example: torch.Tensor, precision: str) -> Engine:
    import openvino as ov

    converted = ov.convert_model(model, example_input=example[:1])
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                           "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> np.ndarray:
        out = request.infer({0: x.numpy()})
        return np.asarray(next(iter(out.values())), dtype=np.float64)[:, 0]

    return run


def onnxruntime_engine(model: torch.nn.Module, example: torch.Tensor) -> Engine:
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(), "cxrage.onnx")
    torch.onnx.export(model, example[:1], path, input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"x": x.numpy()})[0][:, 0].astype(np.float64)

    return run


def build_engines(names: list[str], example: torch.Tensor) -> tuple[dict[str, Engine], dict[str, str]]:
    state_dict = demo_state_dict(seed=0)
    fresh = lambda: build_model(state_dict).eval()  # noqa: E731 - each engine owns its copy
    makers: dict[str, Callable[[], Engine]] = {
        "nchw": lambda: torch_engine(fresh(), channels_last=False, inference=False),
        "nchw-infer": lambda: torch_engine(fresh(), channels_last=False, inference=True),
        "channels_last": lambda: torch_engine(fresh(), channels_last=True, inference=True),
        "cl-folded": lambda: torch_engine(fold_batchnorm(fresh()), channels_last=True, inference=True),
        "bf16-autocast": lambda: torch_engine(fresh(), channels_last=True, inference=True, bf16=True),
        "openvino-fp32": lambda: openvino_engine(fresh(), example, "f32"),
        "openvino-bf16": lambda: openvino_engine(fresh(), example, "bf16"),
        "onnxruntime": lambda: onnxruntime_engine(fresh(), example),
    }
    engines, skipped = {}, {}
    for name in names:
        try:
            engines[name] = makers[name]()
        except ImportError as exc:
            skipped[name] = f"not installed ({exc.name})"
        except Exception as exc:  # an engine that cannot build here is reported, not fatal
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return engines, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="views per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: every core)")
    parser.add_argument("--engines", nargs="+", default=["nchw", "nchw-infer", "channels_last", "cl-folded",
                                                         "bf16-autocast", "openvino-fp32", "openvino-bf16",
                                                         "onnxruntime"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    x = views(args.batch)
    engines, skipped = build_engines(args.engines, x)
    if "nchw" not in engines:
        raise SystemExit("the nchw baseline is needed for the ratios")
    outputs = {name: run(x) for name, run in engines.items()}  # warm-up (oneDNN primitives, OpenVINO plans)
    best = dict.fromkeys(engines, float("inf"))
    names = list(engines)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            engines[name](x)
            best[name] = min(best[name], time.perf_counter() - start)
    base = args.batch / best["nchw"]
    print(f"CXR-Age network, batch {args.batch} views of 224², {torch.get_num_threads()} torch threads, "
          f"best of {args.repeats}, torch {torch.__version__}")
    print(f"| engine | views/s | vs nchw | max |Δ raw| vs nchw |\n|---|---|---|---|")
    for name in names:
        speed = args.batch / best[name]
        delta = float(np.max(np.abs(outputs[name] - outputs["nchw"])))
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}× | {delta:.2g} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | |")


if __name__ == "__main__":
    main()
