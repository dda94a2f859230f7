"""Safe loading of CXR-Age checkpoints, hashing, and conversion to safetensors (seed spec §2.3-§2.5).

In:  a checkpoint file in any of these forms
       - fastai v1 ``learn.save`` output ``{'model': state_dict, 'opt': Adam state_dict}`` (the published
         ``PLCO_Fine_Tuned_120419.pth``; its ``opt`` holds numpy.float64 ``lr``/``betas``),
       - a bare state dict,
     each in the legacy (torch < 1.6) or the zip ``torch.save`` container, or a ``.safetensors`` file.
Out: the 237-key CXR-Age state dict (key order of spec Appendix A), validated against the network.

Pickles are never unpickled freely: every global a pickle names is looked up in a small allowlist
(spec §2.5 option B) *before* anything is imported or called, and anything else raises
`UnsafeCheckpointError` naming that global. The ``opt`` entry is read (it is part of the same pickle)
and dropped. Files are hashed by the package's one helper, `cxrage_ray.storage.digest.sha256_file` (callers
that load weights, `serve.model` and tests, import it from here too).
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrage_ray.errors import UnsafeCheckpointError, WeightsError
from cxrage_ray.model.network import check_state_dict, expected_shapes
from cxrage_ray.storage.atomic import write_atomic
from cxrage_ray.storage.digest import sha256_file

# numpy 2 moved `numpy.core` to `numpy._core`; pickles written under either name must load.
_np_core = getattr(np, "_core", None) or np.core
_TORCH_STORAGES = (
    "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage",
)
# (module, name) -> the object itself: resolved here, so an allowed name never triggers an import.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    # fastai's OneCycle leaves numpy.float64 lr/betas in the optimizer's param_groups (spec §2.3)
    ("numpy.core.multiarray", "scalar"): _np_core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_core.multiarray.scalar,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{("torch", name): getattr(torch, name) for name in _TORCH_STORAGES if hasattr(torch, name)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves only allowlisted globals and refuses the rest unexecuted."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"checkpoint pickle references the global `{module}.{name}`, which is not allowed in a "
                "weights file (allowed: tensors, OrderedDict, numpy scalars); refusing to load it and nothing "
                "in it was executed. Only load checkpoints from a source you trust; a genuine CXR-Age "
                "checkpoint never needs this global."
            ) from None


# Passed to torch.load as `pickle_module`: torch builds its own Unpickler subclass on top of ours
# (both containers), so every global, including those in the legacy header pickles, goes through
# `_RestrictedUnpickler.find_class`.
_restricted_pickle = types.SimpleNamespace(
    __name__="cxrage_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # header: u64 little-endian length, then a JSON object
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except UnsafeCheckpointError:
        raise
    except RuntimeError as exc:
        if "pickle_module" not in str(exc):
            raise WeightsError(_unreadable(path, exc)) from exc
        # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch refuse any custom unpickler, ours included
        raise WeightsError(
            f"{path}: torch refused the restricted unpickler ({exc}); unset TORCH_FORCE_WEIGHTS_ONLY_LOAD, or "
            "convert the checkpoint elsewhere with `cxrage weights convert SRC DST.safetensors`"
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError,
            zipfile.BadZipFile, AttributeError, TypeError, IndexError) as exc:
        raise WeightsError(_unreadable(path, exc)) from exc


def _unreadable(path: Path, exc: BaseException) -> str:
    return (
        f"{path} could not be read as a torch checkpoint ({type(exc).__name__}: {exc}). Expected a fastai "
        "`learn.save` .pth, a torch.save'd state dict, or a .safetensors file; the file may be truncated — "
        "compare its size and sha256 with the registry (`cxrage weights fetch` re-downloads the published one)."
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} could not be read as a .safetensors file ({exc})") from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """fastai's `learn.load` rule (spec §2.4): {'model','opt'} -> obj['model'], anything else is the state dict."""
    if isinstance(obj, dict) and set(obj.keys()) == {"model", "opt"}:
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(
            f"{path} holds a {type(obj).__name__}, not a state dict or a fastai {{'model','opt'}} checkpoint"
        )
    return obj


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a CXR-Age checkpoint safely and return its model state dict.

    Args:
        path: a fastai ``learn.save`` file or bare state dict (legacy or zip torch container), or a
            ``.safetensors`` file.

    Returns:
        An OrderedDict of the 237 CPU tensors, in the network's key order.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allowlist (nothing was executed).
        WeightsError: the file is missing or unreadable, or is not a CXR-Age checkpoint (which keys differ).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    state_dict = _load_safetensors(path) if _is_safetensors(path) else _unwrap(_load_pickled(path), path)
    check_state_dict(state_dict, source=str(path))
    return OrderedDict((k, state_dict[k]) for k in expected_shapes())


def convert_to_safetensors(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Write the CXR-Age state dict of any supported checkpoint `src` to ``.safetensors`` at `dst`.

    The optimizer state is dropped; the model tensors are bit-identical; the source's sha256 is kept in
    the header metadata (``source_sha256``). The output is deterministic (same source, same bytes). The
    file is written next to `dst` and renamed into place, so `dst` is never half-written.

    Returns:
        The sha256 of the written `dst`.
    """
    from safetensors.torch import save

    state_dict = load_state_dict(src)
    dst = Path(dst).expanduser()
    # One metadata key only: safetensors writes the metadata map in hash order, so with several keys
    # converting the same checkpoint twice would give files with different sha256s.
    metadata = {"source_sha256": sha256_file(src)}
    # serialised in memory, then written whole (parents created; the usual umask permissions)
    write_atomic(dst, save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata))
    return sha256_file(dst)
