"""Saliency maps for CXR-Age: the original's vanilla input gradient, or Grad-CAM, blended like the original.

In:  the CXR-Age model (any `nn.Sequential(body, head)` in eval mode) and the seed-chain pictures it scores,
     uint8 (H, W[, C]), C in {1, 3}.
Out: per picture, a PNG (bytes) of the film at its own size with a 'hot' heat map blended over it at 0.5,
     exactly as run_model.py's `blendImage` draws it (spec §6).

What is computed (spec §6). The original's `--saliency` loop is vanilla input-gradient saliency
(Simonyan et al. 2014), not Grad-CAM: the gradient of the raw model output with respect to the *normalised*
224×224 input, reduced by `max over channels of |grad|`, and drawn without any normalisation. Differences:
  - The original fed a randomly augmented view (its train transforms were active); we use the deterministic
    centre view, the same tensor the score's centre pass sees.
  - The original ran one image per backward pass. In eval mode every output y_i depends only on its own
    input x_i (BatchNorm uses running statistics, pooling is per image), so d(sum_j y_j)/dx_i = dy_i/dx_i and
    one backward pass over a batch gives every image's gradient.
  - `method="gradcam"` is an addition (more readable than raw gradients): Grad-CAM (Selvaraju et al. 2017) on
    the body's output, which for CXRAgeNet is body[7] = layer4, the last conv stage (512×7×7).

Neither method changes the model: nothing is switched to train mode, gradients are taken with
`torch.autograd.grad` with respect to the input or the body activation only (parameters' `.grad` stay
untouched), and no hooks are registered. Scores computed before or after are therefore identical.

On CUDA the convolutions follow torch's TF32 defaults; on CPU the maps are plain fp32. Autocast is always off.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxrage_ray.config import SALIENCY_METHODS, SaliencyMethod
from cxrage_ray.predict.predictor import as_hwc, same_shape_chunks
from cxrage_ray.preprocess.fastai import SIZE, batch_tta_views


#: Blend weight of the heat map over the X-ray (blendImage's `alpha=0.5`).
BLEND_ALPHA = 0.5
#: blendImage's colour map.
COLORMAP = "hot"


def input_gradient_saliency(model: nn.Module, views: torch.Tensor, *, device: torch.device | str | None = None
                            ) -> np.ndarray:
    """The original's vanilla saliency: `max_c |d y / d x|` for a batch of views, in one backward pass.

    Args:
        model: maps (N, 3, H, W) -> (N, 1); must be in eval mode (so each output depends only on its input).
        views: normalised model inputs (N, 3, H, W) — for the product, the centre views (N, 3, 224, 224).
        device: where to compute; defaults to the model's device.

    Returns:
        float32 (N, H, W): the raw gradient magnitudes, not normalised (the original drew them as they are).
        Computed in the model's parameter dtype (fp32 for the product), never under autocast.
    """
    device = _device(model, device)
    _require_eval(model)
    with _grad_enabled(device):
        # a fresh copy: views made under inference mode cannot take requires_grad themselves
        x = views.detach().to(device=device, dtype=_dtype(model), copy=True).requires_grad_(True)
        out = model(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    return grad.abs().amax(dim=1).float().cpu().numpy()


def gradcam(model: nn.Sequential, views: torch.Tensor, *, device: torch.device | str | None = None,
            size: int = SIZE) -> np.ndarray:
    """Grad-CAM on the output of `model[0]` (for CXRAgeNet: body[7] = layer4, 512×7×7), batched.

    cam_i = ReLU(sum_k alpha_ik A_ik) with alpha_ik = spatial mean of d y_i / d A_ik, upsampled bilinearly
    (align_corners=False, i.e. pixel centres, like cv2.resize) to `size`×`size`, then divided by its own
    maximum so each map spans [0, 1] with 0 meaning "no positive evidence"; a map with no positive value
    stays all zero.

    Args:
        model: `nn.Sequential(body, head)` in eval mode, head mapping the body's (N, K, h, w) to (N, 1).
        views: normalised model inputs (N, 3, H, W).
        device: where to compute; defaults to the model's device.
        size: side of the returned maps.

    Returns:
        float32 (N, size, size) in [0, 1].
    """
    device = _device(model, device)
    _require_eval(model)
    body, head = model[0], model[1]
    with _grad_enabled(device):
        x = views.detach().to(device=device, dtype=_dtype(model))
        with torch.no_grad():  # the backward pass starts at the activation: no graph through the body
            acts = body(x)
        acts.requires_grad_(True)
        (grads,) = torch.autograd.grad(head(acts).sum(), acts)
    with torch.no_grad():
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts.float()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.amax(dim=(1, 2), keepdim=True)
        cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.clamp_(0, 1).cpu().numpy()


def uint8_like_x86(values: np.ndarray) -> np.ndarray:
    """`np.uint8(values)` as it behaves on x86, made deterministic on every platform.

    C's float -> uint8 conversion is undefined out of range; on x86 numpy converts through a 32-bit integer
    (truncation toward zero, `cvttss2si`) and keeps the low byte, so 256 -> 0, 300.2 -> 44, -3.5 -> 253,
    while NaN and |v| >= 2**31 give the "integer indefinite" 0x80000000, whose low byte is 0.
    """
    v = np.trunc(np.asarray(values, dtype=np.float64))
    ok = np.isfinite(v) & (np.abs(v) < 2.0**31)
    return (np.where(ok, v, 0).astype(np.int64) & 0xFF).astype(np.uint8)


def hot_lut() -> np.ndarray:
    """(256, 3) uint8: `np.uint8(cm(k) * 255)` of matplotlib's 'hot' for k = 0..255, alpha dropped.

    `cm(uint8 array)` indexes the 256-entry table directly, so looking values up here equals the original.
    """
    import matplotlib  # deferred: only saliency needs matplotlib

    rgba = matplotlib.colormaps[COLORMAP](np.arange(256, dtype=np.uint8))
    return np.uint8(rgba * 255)[:, :3]


def blend_like_original(saliency: np.ndarray, picture_u8: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """run_model.py's `blendImage(heatmap, img, alpha=0.5, cmap='hot')` (spec §6), step for step.

    1. `np.uint8(heatmap * 255)` in float32 (the original's heat map was a float32 gradient), with x86's
       wrap-around for values >= 256 (`uint8_like_x86`); values below 1/255 become 0.
    2. `ToPILImage()` -> 'L' -> `resize((W, H), BILINEAR)` to the film's size. The original re-read its input
       PNG, which is the seed-chain picture the model saw; here that picture is `picture_u8`. For a
       non-square film the 224×224 map of the (centre) crop is stretched over the whole film, as the
       original did.
    3. 'hot' colours: LUT indexed by the uint8 values, `np.uint8(rgba * 255)`, RGB.
    4. The X-ray as RGB through `ToTensor()`/`ToPILImage()`: `float32(v) / 255 * 255` truncated by `.byte()`
       (the identity for every 8-bit value under IEEE float32, kept literal).
    5. `PIL.Image.blend(xray, heat, 0.5)`: `uint8(xray + 0.5 * (heat - xray))`, truncated.

    Args:
        saliency: (h, w) map (any float; Grad-CAM maps are in [0, 1]).
        picture_u8: the film, uint8 (H, W), (H, W, 1) or (H, W, 3).
        lut: `hot_lut()`, to skip rebuilding it for every picture.

    Returns:
        uint8 (H, W, 3).
    """
    film = as_hwc(picture_u8)
    h, w = film.shape[:2]
    scaled = np.asarray(saliency, dtype=np.float32) * np.float32(255)
    heat_l = Image.fromarray(uint8_like_x86(scaled)).resize((w, h), Image.Resampling.BILINEAR)
    heat = (hot_lut() if lut is None else lut)[np.asarray(heat_l)]
    rgb = np.repeat(film, 3, axis=2) if film.shape[2] == 1 else film
    as_tensor = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255)  # ToTensor
    xray = as_tensor.mul(255).byte().numpy()  # ToPILImage on a float tensor
    out = Image.blend(Image.fromarray(xray), Image.fromarray(heat), BLEND_ALPHA)
    return np.asarray(out)


def saliency_png(saliency: np.ndarray, picture_u8: np.ndarray, lut: np.ndarray | None = None) -> bytes:
    """PNG bytes of `blend_like_original(saliency, picture_u8)`."""
    buf = io.BytesIO()
    Image.fromarray(blend_like_original(saliency, picture_u8, lut)).save(buf, format="PNG")
    return buf.getvalue()


class SaliencyMaker:
    """Pictures -> blended saliency PNGs, batched on the model's device; leaves the model as it found it.

    Args:
        model: the CXR-Age network in eval mode (e.g. `AgePredictor.model`); shared, not copied.
        method: "grad" (the original's input gradient) or "gradcam" (Grad-CAM on layer4).
        batch_size: pictures per backward pass (activations are kept for the backward, so this bounds memory).

    Example:
        >>> maker = SaliencyMaker(predictor.model, "grad")
        >>> pngs = maker([picture_u8])  # one PNG per picture, at the picture's size
    """

    def __init__(self, model: nn.Sequential, method: SaliencyMethod = "grad", batch_size: int = 16):
        if method not in SALIENCY_METHODS:
            raise ValueError(f"saliency method must be 'grad' or 'gradcam', got {method!r}")
        _require_eval(model)
        self.model = model
        self.method = method
        self.batch_size = batch_size
        self.device = _device(model, None)
        self._lut = hot_lut()

    def maps(self, pictures: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The 224×224 float32 maps of the pictures' centre views, aligned with `pictures`."""
        compute = input_gradient_saliency if self.method == "grad" else gradcam
        out: list[np.ndarray | None] = [None] * len(pictures)
        for positions in same_shape_chunks(pictures, self.batch_size):
            pixels = np.stack([as_hwc(pictures[i]) for i in positions])
            x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            centre = batch_tta_views(x, "none")[:, 0]  # (n, 3, 224, 224), the score's centre pass
            for i, m in zip(positions, compute(self.model, centre, device=self.device)):
                out[i] = m
        return out  # type: ignore[return-value]

    def __call__(self, pictures: Sequence[np.ndarray]) -> list[bytes]:
        """One PNG per picture: its map blended over it at the picture's size."""
        return [saliency_png(m, p, self._lut) for m, p in zip(self.maps(pictures), pictures)]


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    # The model's own precision: fp32 for the product (tests also run a float64 copy against finite differences).
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _require_eval(model: nn.Module) -> None:
    # In train mode BatchNorm would mix the batch (breaking per-image gradients) and update its running
    # statistics (changing later scores); we refuse rather than switch modes behind the caller's back.
    if any(m.training for m in model.modules()):
        raise ValueError("saliency needs the model in eval mode (call model.eval() first)")


@contextmanager
def _grad_enabled(device: torch.device) -> Iterator[None]:
    """Gradients on, inference mode and autocast off (the caller may sit inside either)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield
