"""Checkpoint builders for tests and benchmarks: random CXR-Age weights in the published file formats.

- `random_state_dict(seed)`: a 237-key CXR-Age state dict whose raw outputs land roughly in [-3, 3].
- `save_fastai_checkpoint(path, sd, legacy=..., with_opt=...)`: the byte layout fastai 1.0.61's
  `learn.save` produces for this model (seed spec §2.3, Appendix B), legacy or zip container.
- `save_malicious_checkpoint(path, marker_file, legacy=...)`: a checkpoint whose pickle would create
  `marker_file` if it were unpickled without restrictions.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from cxrage_ray.model.demo import demo_state_dict

# Adam state for 108 body params + BN1d(1024) weight/bias (spec §2.3: stale fastai layer groups).
OPT_GROUP_SIZES = (16, 32, 20, 40, 2, 6)
OPT_STATE_ENTRIES = 110


@functools.lru_cache(maxsize=4)
def _random_state_dict(seed: int) -> tuple[tuple[tuple[str, torch.Tensor], ...], dict]:
    state_dict = demo_state_dict(seed)
    return tuple(state_dict.items()), state_dict._metadata


def random_state_dict(seed: int) -> OrderedDict[str, torch.Tensor]:
    """A seeded random CXR-Age state dict (237 keys) whose eval-mode outputs are O(1).

    Deterministic per seed; each call returns fresh tensors (callers may modify them). Like
    `nn.Module.state_dict()`, it carries the `_metadata` attribute, which torch.save pickles too.
    """
    items, metadata = _random_state_dict(seed)
    state_dict = OrderedDict((k, v.clone()) for k, v in items)
    state_dict._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
    return state_dict


def _opt_param_keys(state_dict: dict[str, torch.Tensor]) -> list[list[str | None]]:
    """State-dict keys of the 6 Adam param groups fastai builds (spec §2.3); None = a replaced head param.

    Layer groups (from `_resnet_split`): body children 0-5, body children 6-7, the *old* head; each is split
    into [non-BN weights] and [BN params + biases].
    """
    body = [k[2:] for k in state_dict if k.startswith("0.") and not k.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked"))]

    def split(prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
        keys = [k for k in body if k.startswith(prefixes)]
        # resnet convs have no bias, so every conv weight goes to the weight-decay group
        convs = [f"0.{k}" for k in keys if _is_conv(state_dict[f"0.{k}"])]
        bns = [f"0.{k}" for k in keys if not _is_conv(state_dict[f"0.{k}"])]
        return convs, bns

    g0, g1 = split(("0.", "1.", "4.", "5."))
    g2, g3 = split(("6.", "7."))
    # old head: BN1d(1024) [shared with the new head], Linear(1024,512), BN1d(512), Linear(512,1)
    g4 = [None, None]  # the old Linear weights
    g5 = ["1.2.weight", "1.2.bias", None, None, None, None]
    return [g0, g1, g2, g3, g4, g5]


def _is_conv(t: torch.Tensor) -> bool:
    return t.dim() == 4


def _adam_state_dict(state_dict: dict[str, torch.Tensor], legacy: bool) -> dict:
    groups = _opt_param_keys(state_dict)
    assert tuple(len(g) for g in groups) == OPT_GROUP_SIZES
    generator = torch.Generator().manual_seed(1234)
    state: dict[int, dict] = {}
    param_groups = []
    index = 0
    # discriminative learning rates as fastai's OneCycle leaves them: numpy.float64 values
    lrs = (np.float64(1.0e-6), np.float64(1.0e-6), np.float64(3.3e-6), np.float64(3.3e-6),
           np.float64(1.0e-5), np.float64(1.0e-5))
    for keys, lr in zip(groups, lrs):
        params = []
        for key in keys:
            if key is not None:
                exp_avg = 1e-4 * torch.randn(state_dict[key].shape, generator=generator)
                state[index] = {
                    # torch < 1.12 stored an int step; from 1.12 a 0-d float32 tensor
                    "step": 3750 if legacy else torch.tensor(3750.0),
                    "exp_avg": exp_avg,
                    "exp_avg_sq": exp_avg.square() + 1e-9,
                }
            params.append(index)
            index += 1
        group = {"lr": lr, "betas": (np.float64(0.95), 0.99), "eps": 1e-08, "weight_decay": 0, "amsgrad": False}
        if not legacy:
            group.update(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                         decoupled_weight_decay=False)
        group["params"] = params
        param_groups.append(group)
    assert len(state) == OPT_STATE_ENTRIES
    return {"state": state, "param_groups": param_groups}


def save_fastai_checkpoint(path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], *, legacy: bool,
                           with_opt: bool = True) -> Path:
    """Write `state_dict` as fastai 1.0.61's `learn.save` would (spec §2.3, Appendix B).

    Args:
        path: destination file.
        state_dict: the 237-key CXR-Age state dict.
        legacy: True for the pre-1.6 torch container (as the published file, torch-1.5-style optimizer:
            int step, 5-key param groups); False for the zip container (modern optimizer keys).
        with_opt: True writes ``{'model': sd, 'opt': Adam state}``; False the bare state dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # as in a real `module.state_dict()`: pickled through a BUILD
        model._metadata = state_dict._metadata
    obj = {"model": model, "opt": _adam_state_dict(model, legacy)} if with_opt else model
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class _CreateFile:
    """Unpickling this object creates `marker` through `os.system` (i.e. executes a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import shlex

        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _OpenFile(_CreateFile):
    """Unpickling this object creates `marker` through builtins `open(marker, 'w')`."""

    def __reduce__(self):
        return open, (str(self.marker), "w")


def save_malicious_checkpoint(path: str | os.PathLike[str], marker_file: str | os.PathLike[str], *,
                              legacy: bool = False, payload: str = "system") -> Path:
    """A fastai-shaped checkpoint whose pickle, if unpickled unrestricted, creates `marker_file`.

    Args:
        path: destination file.
        marker_file: the file the payload creates.
        legacy: pre-1.6 container when True, zip otherwise.
        payload: "system" (``os.system("touch ...")``) or "open" (``open(marker, "w")``).
    """
    path = Path(path)
    payload_obj = {"system": _CreateFile, "open": _OpenFile}[payload](Path(marker_file))
    model = OrderedDict([("0.0.weight", torch.zeros(2, 2)), ("evil", payload_obj)])
    torch.save({"model": model, "opt": {"state": {}, "param_groups": []}}, path,
               _use_new_zipfile_serialization=not legacy)
    return path
