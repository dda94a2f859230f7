"""The seed chain and the dcmj2pnm mapping as tensor code, for the GPU (and the CPU in tests).

In:  a torch tensor of Q16 pixels (H, W, C), C in {1, 3}, on any device (`TensorSeedChain`), or a frame of
     DICOM stored values plus its `GreyscaleParams` (`dcmtk_8bit_tensor`).
Out: uint8 (H', W', C') on the same device — the same picture as the exact CPU path
     (`cxrage_ray.preprocess.seed_chain`, `cxrage_ray.decode.dicom_greyscale.dcmtk_8bit`).

Only the per-pixel kernels are torch; every parameter comes from the plain-numpy code the CPU path uses:
  trim          three whole-image comparisons against the TL/TR/BL corner colours (no edge scan)
  LUT           `levels.level_table` for the trimmed image's min/max, moved to the device and indexed there
  resize        `resize_weights.fill_plan` and IM's Lanczos/Mitchell contribution rows (`axis_weights`,
                computed once per size) as (output, tap) index/weight tensors; each pass sums tap by tap in
                IM's order over whole rows at once (one gather, multiply, add per tap: never a fused
                multiply-add, which IM's build does not use), float64, IM's Q16
                rounding between passes — so the sums, ties included, are IM's own.
  dcmj2pnm      a host table from `dicom_greyscale`'s own functions over the frame's stored-value range.
Images with an alpha channel (14 of the 250 sample films) take IM's alpha-weighted Mitchell resize, also
tap by tap in IM's order.
`TensorSeedChain.batch` runs the same chain on many films at once, exactly, with per-batch work
(`cxrage_ray.preprocess.tensor_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cxrage_ray.decode.dicom_greyscale import apply_ramp, dcmtk_8bit, modality_values
from cxrage_ray.decode.dicom_window import GreyscaleParams, needs_stored_range, window_plan
from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.preprocess.levels import level_table
from cxrage_ray.preprocess.quantum import MAGICK_EPSILON, QUANTUM
from cxrage_ray.preprocess.resize_weights import FilterName, axis_weights, fill_plan
from cxrage_ray.preprocess.tensor_batch import Item, seed_chain_batch

#: Contribution tables kept per device: archives have many sizes, so the cache is bounded.
MAX_CACHED_TAPS = 64


@dataclass
class TensorSeedChain:
    """The seed chain on one device; holds the device's resize tap tables (per instance).

    Args:
        device: where the tensors live and the work runs.
        group_bytes: `batch`'s bound on the bytes of one tensor of a group of films (None: 1 GiB on a GPU, 16 MB
            on a CPU; `tensor_batch.default_group_bytes`).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group_bytes: int | None = None
    _taps: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------------------------- the chain

    def __call__(self, q16: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Q16 pixels (H, W, C) (any integer dtype) [+ Q16 alpha (H, W)] -> uint8 (H', W', C'), short side 512:
        the seed-chain PNG's colour pixels (what the model reads; `seed_chain.seed_chain`)."""
        return self.picture(q16, alpha)[0]

    def picture(self, q16: torch.Tensor, alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uint8 pixels (H', W', C'), uint8 alpha (H', W') or None): the PNG mogrify writes
        (`seed_chain.seed_picture`)."""
        if q16.dim() != 3 or q16.shape[2] not in (1, 3):
            raise ValueError(f"expected (H, W, 1|3) pixels, got {tuple(q16.shape)}")
        x = q16.to(self.device, torch.int32)
        if alpha is not None:
            alpha = alpha.to(self.device, torch.int32)
        top, bottom, left, right = trim_box_tensor(x if alpha is None else torch.cat([x, alpha[:, :, None]], 2))
        x = x[top:bottom + 1, left:right + 1]
        check_fill_aspect(x.shape[1], x.shape[0])  # as the exact chain: a sliver must not explode the resize
        if alpha is not None:  # -depth 8 quantises opacity (65535 - alpha) as it does colour
            opacity = QUANTUM - alpha[top:bottom + 1, left:right + 1]
            alpha = QUANTUM - torch.div(opacity, 257, rounding_mode="floor") * 257
        # min, max and whether the channels agree, read back in one host sync
        raw_min, raw_max, grey = torch.stack([x.min(), x.max(), _channels_equal_flag(x)]).tolist()
        if x.shape[2] == 3 and grey:
            x = x[:, :, :1]
        levels = self.level_table(raw_min, raw_max)[x.long()]  # 8-bit levels k for Q16 257 k
        out, alpha = self.resize_fill_512(levels, alpha)  # Q16
        out = torch.div(out, 257, rounding_mode="floor").to(torch.uint8)
        if out.shape[2] == 3 and bool(_channels_equal_flag(out)):
            out = out[:, :, :1]
        alpha8 = None
        if alpha is not None and int(alpha.min()) < QUANTUM:  # IM's PNG writer drops an all-opaque alpha
            # the PNG writer truncates IM's opacity (65535 - alpha), not the alpha itself
            alpha8 = (255 - torch.div(QUANTUM - alpha, 257, rounding_mode="floor")).to(torch.uint8)
        return out, alpha8

    def batch(self, items: Sequence[Item], group_bytes: int | None = None) -> list[torch.Tensor | BaseException]:
        """Many films at once: for each (Q16 pixels (H, W, C), Q16 alpha (H, W) or None) item, exactly what
        `self(q16, alpha)` returns, or the exception that call raises for it (in its place; the others go on).

        Costs per batch, not per film: ~2 aten ops a film plus ~65 per chunk and ~100-200 per group of similar
        films, at most two read-backs and two uploads (`tensor_batch`). Films with alpha take the per-film call.

        Args:
            items: the films, each (pixels, alpha or None).
            group_bytes: overrides `self.group_bytes` for this call.
        """
        return seed_chain_batch(self, items, group_bytes or self.group_bytes)

    def level_table(self, raw_min: int, raw_max: int) -> torch.Tensor:
        """uint8 table raw Q16 -> 8-bit level on the device: the CPU path's `levels.level_table` (64 KB moved)."""
        return torch.from_numpy(level_table(raw_min, raw_max)).to(self.device)

    # ------------------------------------------------------------------------------------- the resize

    def resize_fill_512(self, levels: torch.Tensor, alpha: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """8-bit levels (H, W, C) [+ Q16 alpha (H, W)] -> Q16 int64 (H', W', C') [+ alpha] of `-resize 512x512^`."""
        h, w, _ = levels.shape
        plan = fill_plan(w, h, has_alpha=alpha is not None)
        if plan.identity:
            return levels.long() * 257, alpha
        name, out_w, out_h = plan.filter, plan.out_w, plan.out_h
        x = levels.permute(2, 0, 1).to(torch.float64) * 257.0  # (C, H, W) Q16 values
        if alpha is not None:
            opacity = QUANTUM - alpha.to(torch.float64)
            if plan.horizontal_first:
                x, opacity = self._pass_alpha(x.transpose(1, 2), opacity.T, w, out_w, name)
                x, opacity = self._pass_alpha(x.transpose(1, 2), opacity.T, h, out_h, name)
            else:
                x, opacity = self._pass_alpha(x, opacity, h, out_h, name)
                x, opacity = self._pass_alpha(x.transpose(1, 2), opacity.T, w, out_w, name)
                x, opacity = x.transpose(1, 2), opacity.T
            return x.long().permute(1, 2, 0), (QUANTUM - opacity).long()
        if plan.horizontal_first:
            mid = self._pass(x.transpose(1, 2), w, out_w, name)  # (C, out_w, h)
            res = self._pass(mid.transpose(1, 2), h, out_h, name)  # (C, out_h, out_w)
        else:
            mid = self._pass(x, h, out_h, name)  # (C, out_h, w)
            res = self._pass(mid.transpose(1, 2), w, out_w, name).transpose(1, 2)
        return res.long().permute(1, 2, 0), None

    def _pass(self, x: torch.Tensor, n_in: int, n_out: int, name: FilterName) -> torch.Tensor:
        """One resize pass along dim 1 of (C, n_in, m) -> Q16-rounded (C, n_out, m), summed tap by tap in
        IM's order (so it rounds exactly as IM does, ties included)."""
        index, weights = self.taps(n_in, n_out, name)
        x = x.contiguous()
        acc = torch.zeros((x.shape[0], n_out, x.shape[2]), dtype=torch.float64, device=x.device)
        for t in range(weights.shape[1]):
            # a separate multiply and add, as IM's generic x86-64 build rounds twice: `addcmul_` may run as one
            # fused multiply-add on CUDA, which rounds once and moves ties
            acc.add_(x.index_select(1, index[:, t]).mul_(weights[:, t, None]))
        return _round_q16(acc)

    def _pass_alpha(self, color: torch.Tensor, opacity: torch.Tensor, n_in: int, n_out: int, name: FilterName
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass along dim 1 with IM's alpha weighting, in IM's order (as `resize`'s numpy alpha pass).

        Args:
            color: (C, n_in, m) Q16 colour values (float64); opacity: (n_in, m) IM opacity (65535 - alpha).
        """
        index, weights = self.taps(n_in, n_out, name)
        color, opacity = color.contiguous(), opacity.contiguous()
        m = color.shape[2]
        num = torch.zeros((color.shape[0], n_out, m), dtype=torch.float64, device=color.device)
        gamma = torch.zeros((n_out, m), dtype=torch.float64, device=color.device)
        opac = torch.zeros_like(gamma)
        for t in range(weights.shape[1]):
            w = weights[:, t, None]
            op = opacity.index_select(0, index[:, t])
            a = w * (1.0 / QUANTUM) * (QUANTUM - op)
            num = num + a[None] * color.index_select(1, index[:, t])
            opac = opac + w * op
            gamma = gamma + a
        safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
        recip = torch.where(gamma.abs() >= MAGICK_EPSILON, 1.0 / safe,
                            torch.where(gamma < 0, -1.0, 1.0) / MAGICK_EPSILON)
        return _round_q16(recip[None] * num), _round_q16(opac)

    def taps(self, n_in: int, n_out: int, name: FilterName) -> tuple[torch.Tensor, torch.Tensor]:
        """IM's contribution rows n_in -> n_out on the device (cached): input index and weight per
        (output, tap) (`resize_weights.AxisWeights`); padded taps point at a valid row with weight 0."""
        key = (n_in, n_out, name)
        if key not in self._taps:
            aw = axis_weights(n_in, n_out, name)
            if len(self._taps) > MAX_CACHED_TAPS:
                self._taps.clear()
            self._taps[key] = (torch.from_numpy(aw.index.copy()).to(self.device),
                               torch.from_numpy(aw.weights.copy()).to(self.device))
        return self._taps[key]


def _round_q16(value: torch.Tensor) -> torch.Tensor:
    """IM's `ClampToQuantum` between passes: floor(clamp(v, 0, 65535) + 0.5)."""
    return torch.floor(value.clamp(0.0, QUANTUM) + 0.5)


def _channels_equal_flag(x: torch.Tensor) -> torch.Tensor:
    """On the device, without a sync: 1 when a 3-channel picture's channels are all equal, else 0 (0 for grey)."""
    if x.shape[2] != 3:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return ((x[:, :, 0] == x[:, :, 1]) & (x[:, :, 1] == x[:, :, 2])).all().to(x.dtype)


def trim_box_tensor(x: torch.Tensor) -> tuple[int, int, int, int]:
    """`trim.trim_box` (IM's bounding box, fuzz 0, no alpha) on a (H, W, C) tensor: inclusive
    (top, bottom, left, right); the whole image when nothing differs from the top-left colour.

    The four edges are reduced on the device and read back together: one host sync, not one per edge."""
    h, w = x.shape[:2]
    differs_tl = (x != x[0, 0]).any(dim=2)
    cols_tl, rows_tl = differs_tl.any(dim=0), differs_tl.any(dim=1)
    cols_tr = (x != x[0, w - 1]).any(dim=2).any(dim=0)
    rows_bl = (x != x[h - 1, 0]).any(dim=2).any(dim=1)
    across = torch.arange(w, device=x.device)
    down = torch.arange(h, device=x.device)
    edges = torch.stack([cols_tl.any().long(),
                         torch.where(cols_tl, across, w).min(), torch.where(rows_tl, down, h).min(),
                         torch.where(cols_tr, across, -1).max(), torch.where(rows_bl, down, -1).max()])
    found, left, top, right, bottom = edges.tolist()
    if not found:
        return 0, h - 1, 0, w - 1
    # IM starts right/bottom at 0 and only raises them
    right, bottom = max(right, 0), max(bottom, 0)
    if right < left or bottom < top:
        return 0, h - 1, 0, w - 1
    return top, bottom, left, right


# ----------------------------------------------------------------------------- the dcmj2pnm mapping


def dcmtk_8bit_tensor(frame: torch.Tensor, params: GreyscaleParams) -> torch.Tensor:
    """`dicom_greyscale.dcmtk_8bit` on a tensor: stored values (H, W) or RGB (H, W, 3) -> uint8 (H, W).

    A grey frame is mapped through a table built on the host by the CPU path's own functions for every stored
    value between the frame's min and max (at most 2^16 entries) and indexed on the device: exact by
    construction, one reduction and one gather, and no float64 arithmetic on the device, where a compiler may
    fuse a multiply-add the CPU rounds twice. The rare colour frame is mapped on the host.

    Args:
        frame: stored values, sign-extended to BitsStored (`cxrage_ray.decode.gpu.sign_extend`), any integer dtype.
        params: the header's `GreyscaleParams`.
    """
    if params.colour:
        return torch.from_numpy(dcmtk_8bit(frame.cpu().numpy(), params)).to(frame.device)
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(frame)).tolist())  # one host sync for both
    stored_range = (float(lo), float(hi)) if needs_stored_range(params) else None
    ramp = window_plan(params, frame.shape[0] * frame.shape[1], stored_range).ramp()
    table = apply_ramp(modality_values(np.arange(lo, hi + 1, dtype=np.int64), params), ramp)
    return torch.from_numpy(table).to(frame.device)[(frame.to(torch.int64) - lo)]


def dicom_q16_tensor(frame: torch.Tensor, params: GreyscaleParams) -> torch.Tensor:
    """Stored values -> the Q16 (H, W, 1) form of the 8-bit picture `decode_dicom` hands the seed chain (v as 257 v)."""
    return dcmtk_8bit_tensor(frame, params).to(torch.int32)[..., None] * 257
