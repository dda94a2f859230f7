"""The dcmj2pnm mapping for a batch of frames on the device: stored values -> the seed chain's Q16 input.

In:  decoded frames (int32 stored values (H, W) on the device, sign-extended to BitsStored) with each frame's
     `GreyscaleParams`.
Out: per frame, the Q16 (H, W, 1) int32 picture `decode_dicom` hands the seed chain (8-bit v as 257 v), or the
     exception that frame raised, in its place.

The same numbers as `cxrage_ray.preprocess.tensor.dicom_q16_tensor` film by film (a host table built by the CPU
path's own functions for every stored value between the frame's min and max, indexed on the device), but per batch:
every frame's min and max come back in one host sync, the tables are built on the host and uploaded as one tensor
(page-locked, without blocking the host, on a GPU), and each frame costs one reduction, one offset and one gather.
Colour frames (rare in chest radiography) keep the per-frame host mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cxrage_ray.decode.dicom_greyscale import apply_ramp, modality_values
from cxrage_ray.decode.dicom_window import GreyscaleParams, needs_stored_range, window_plan
from cxrage_ray.decode.gpu import to_device
from cxrage_ray.preprocess.tensor import dicom_q16_tensor

#: Q16 for an 8-bit level v: the seed chain reads 8-bit DICOM output as 257 v (`decode_dicom`).
Q16_PER_LEVEL = 257


def dicom_q16_batch(frames: Sequence[tuple[torch.Tensor, GreyscaleParams]]) -> list[torch.Tensor | BaseException]:
    """Each (stored values, params) -> Q16 (H, W, 1) int32 on the frame's device, or its exception in place."""
    out: list[torch.Tensor | BaseException | None] = [None] * len(frames)
    grey: list[int] = []
    for k, (values, params) in enumerate(frames):
        if params.colour or values.dim() != 2:  # colour: mapped on the host, frame by frame
            out[k] = _tried(lambda: dicom_q16_tensor(values, params))
        else:
            grey.append(k)
    if grey:
        device = frames[grey[0]][0].device
        lows, highs = zip(*(torch.aminmax(frames[k][0]) for k in grey))
        ranges = torch.stack([torch.stack(lows), torch.stack(highs)], dim=1).tolist()  # one host sync for all
        tables, offsets, start = [], [], 0
        for k, (lo, hi) in zip(grey, ranges):
            table = _tried(lambda: _q16_table(frames[k][0], frames[k][1], int(lo), int(hi)))
            if isinstance(table, BaseException):
                out[k] = table
                continue
            tables.append(table)
            offsets.append((k, start - int(lo)))
            start += table.size
        if tables:
            joined = to_device(np.concatenate(tables), device)
            for k, offset in offsets:
                out[k] = _tried(lambda: joined[frames[k][0] + offset][..., None])  # int32 indices: no widening
    return out  # type: ignore[return-value]


def _q16_table(values: torch.Tensor, params: GreyscaleParams, lo: int, hi: int) -> np.ndarray:
    """int32 Q16 of the mapped level for every stored value lo..hi (`dcmtk_8bit_tensor`'s table, times 257)."""
    stored_range = (float(lo), float(hi)) if needs_stored_range(params) else None
    ramp = window_plan(params, values.shape[0] * values.shape[1], stored_range).ramp()
    levels = apply_ramp(modality_values(np.arange(lo, hi + 1, dtype=np.int64), params), ramp)
    return levels.astype(np.int32) * Q16_PER_LEVEL


def _tried(step) -> object:
    """`step()`, or the exception it raised (one frame's failure stays that frame's)."""
    try:
        return step()
    except Exception as exc:
        return exc
