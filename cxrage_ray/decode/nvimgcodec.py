"""Whether nvImageCodec (the GPU decoder of the device itinerary, `pip install 'cxrage-ray[gpu]'`) loads here.

In:  nothing; Out: the `nvidia.nvimgcodec` module, or None. Torch-free, so a probe task on a GPU node
(`cxrage_ray.runtime.session.probe_gpu_decoders`) answers without importing torch.
"""

from __future__ import annotations

from typing import Any


def load_nvimgcodec() -> Any | None:
    """The `nvidia.nvimgcodec` module when it is installed (`pip install 'cxrage-ray[gpu]'`), else None."""
    try:
        from nvidia import nvimgcodec
    except Exception:  # not installed, or its libraries are missing
        return None
    return nvimgcodec


def nvimgcodec_loads() -> bool:
    """Whether nvImageCodec imports in this process (run on each GPU node by `probe_gpu_decoders`)."""
    return load_nvimgcodec() is not None
