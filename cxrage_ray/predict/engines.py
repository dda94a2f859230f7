"""Inference engines for the CXR-Age network on the CPU: which one runs a (precision, device) pair, and the
OpenVINO engine that `--precision bf16` runs on a CPU.

In:  the network (`cxrage_ray.model.network.CXRAgeNet`, eval mode), the torch thread count.
Out: a callable (N, 3, 224, 224) float32 views -> (N, 1) float32 outputs, a drop-in for the torch module in
     `AgePredictor._forward`.

Why OpenVINO for CPU bf16: measured on this project's 2-core AVX-512-BF16 machine (`benchmarks/cpu_engines.py`,
benchmarks/README.md), torch's bf16 autocast is *slower* than fp32 (oneDNN reorders every conv's weights per
call), while OpenVINO's bf16 plan runs ~2.5× faster than torch fp32. It is an optional extra
(`pip install 'cxrage-ray[openvino]'`); asking for CPU bf16 without it is a clear error, never a silent
fallback to a slower or different engine.
"""

from __future__ import annotations

import torch

from cxrage_ray.preprocess.fastai import SIZE

OPENVINO_MISSING = ("--precision bf16 on a CPU runs on OpenVINO, which is not installed: "
                    "pip install 'cxrage-ray[openvino]' (or score with --precision fp32)")


class OpenVINOEngine:
    """The network compiled by OpenVINO for this CPU at `precision` ("bf16" or "f32"), dynamic batch size.

    Converted from the torch module itself (no file round trip), so it is the model that was loaded and verified.
    """

    def __init__(self, model: torch.nn.Module, precision: str, num_threads: int):
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeError(OPENVINO_MISSING) from exc
        example = torch.zeros(1, 3, SIZE, SIZE)
        with torch.no_grad():
            converted = ov.convert_model(model.eval(), example_input=example, input=[-1, 3, SIZE, SIZE])
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": num_threads}
        self._compiled = ov.Core().compile_model(converted, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.precision = precision

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        # OpenVINO reads the array in place; it needs a contiguous NCHW float32 buffer
        array = views.float().contiguous().numpy()
        result = self._request.infer({0: array})
        return torch.from_numpy(result[self._compiled.output(0)].copy())


def cpu_bf16_engine(model: torch.nn.Module, num_threads: int) -> OpenVINOEngine:
    """The engine `--precision bf16` runs on a CPU (see the module docstring)."""
    return OpenVINOEngine(model, "bf16", num_threads)
