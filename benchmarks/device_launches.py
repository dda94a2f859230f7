"""What the device itinerary's scoring actor would launch on a GPU, and how often it would wait for it, counted
on a CPU: GPU launches per film and host syncs per batch, in total and per stage, for J2K DICOM, JPEG DICOM and
1024² PNG films at several batch sizes. No Ray (it also runs on the GPU machine, which has none).

    PYTHONPATH=. python benchmarks/device_launches.py                               # 8, 32, 128 films, 3 kinds
    PYTHONPATH=. python benchmarks/device_launches.py --films 4 8 --tta none --batch-size 40   # quick check
    PYTHONPATH=. python benchmarks/device_launches.py --budget-launches 15 --budget-syncs 16  # exit 1 if over

What runs: payload rows from `pipeline.payloads.prepare_encoded_batch` (uncounted, as the CPU tasks make them),
then one `ScoreActor.__call__(batch)` with `source=DevicePictures(orient=OrientConfig(mode="auto"))` and
`PredictorConfig(device="cpu", batch_size=640, fixed_shape=True)`, demo weights (`model.demo`), seed TTA. The
actor, its decoders and its caches are built first and one uncounted warm-up call on the same batch runs before
the counted call.

The GPU routes, emulated on the CPU: J2K frames are decoded by nvImageCodec's CPU back end standing in for its
GPU back end (`EmulatedGpuFrameDecoder`: the decoded frame is taken as already on the device, as
`torch.as_tensor(image, device=cuda)` takes it there: no copy); JPEG frames take the default GPU-node route
(nvImageCodec's CPU decoder, then a copy to the device); PNG films arrive as CPU-decoded 'grey8' pictures.

Counting rules (one `TorchDispatchMode` sees every aten op the actor dispatches, in its thread and in any thread
started while it runs; Python wrappers on a few `torch.Tensor` methods see the host-device traffic, which a CPU
run cannot show):

* The emulated device: a tensor is "on the device" when a counted op made it from device tensors (or from no
  tensor: a factory such as `zeros`, `arange`), when it was moved there (below), or when it is a parameter or
  buffer of the model. Anything else (`torch.from_numpy`, module constants, `.cpu()` results) is on the host.
* Launch: every aten op with a device input (or none: a factory), except `NO_KERNEL_OPS` — views and metadata
  (new strides over the same storage) and allocations (the caching allocator), which start no kernel on a GPU,
  and an op that hands back one of its inputs untouched (eval-mode `dropout`).
  An op whose inputs are all on the host is host work, not a launch (reported as `host_ops`). One aten op counts
  as one launch even where a GPU library runs several kernels for it (cuDNN, reductions).
* Copies: a host -> device copy (`Tensor.to(device)` of a host tensor, `torch.tensor(..., device=)`,
  `torch.as_tensor(non-tensor, device=)`) is one launch, and one sync unless `non_blocking=True`; a device ->
  host copy (`.cpu()`, `.numpy()`, `.tolist()`, `np.asarray(t)`) is one launch and one sync, however many
  elements it reads (`.tolist()` of 5 numbers is one sync, not 5). A move spelt `.to("cpu")` cannot be told
  from a `.to(device)` on a CPU and is not counted: downloads must be spelt as above.
* Sync: `aten._local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`) on a device tensor,
  plus the copies above. The copy or scalar read's own ops are not counted again.
* Stage: the innermost of the wrapped stage functions (`STAGES`) running in the op's thread; ops outside them
  count as "other" (`ScoreActor` glue, the predictor's view queue, its TTA combination and read-back). A seed
  chain rerun for a turned film counts as "seed chain", not "orientation".
* Python calls: Python frames entered during the counted call (`sys.setprofile` / `threading.setprofile` 'call'
  events, all threads), not counting this file's frames, what the counting itself calls, and the rule registry
  torch's dispatcher looks up before it calls the mode (`torch._library.simple_registry`).

Flat per batch or per film: for each kind, ratio = (count at the most films / count at the fewest) / (most /
fewest): 1 means the count grows with the films (a per-film launch or sync), fewest/most (1/16 for 8 -> 128) that
it is paid once per batch; printed with a least-squares split into a per-batch and a per-film part.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import inspect
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/device_launches.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._library import simple_registry  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

SHARED = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
THIS_FILE = str(Path(__file__).resolve())

#: aten ops that start no kernel on a GPU: views and metadata (a new tensor header over the same storage, or a
#: question about one) and allocations (the caching allocator hands out memory without a kernel). Matched by the
#: op's name without its overload (`aten.view.default` and `aten.view.dtype` are both `view`).
NO_KERNEL_OPS = frozenset({
    # views: same storage, new sizes/strides/offset
    "view", "_unsafe_view", "view_as", "as_strided", "expand", "expand_as", "permute", "t", "transpose",
    "swapaxes", "movedim", "slice", "select", "narrow", "unsqueeze", "squeeze", "alias", "detach", "_reshape_alias",
    "unbind", "split", "split_with_sizes", "chunk", "tensor_split", "diagonal", "unfold", "view_as_real",
    "view_as_complex", "_conj", "_neg_view", "real", "imag", "indices", "values", "lift_fresh",
    # metadata questions
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
    "is_contiguous", "is_same_size", "is_nonzero", "_nested_tensor_size",
    # allocations
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
})
#: aten ops that read a device value on the host: the host waits for the device (one sync each).
SYNC_OPS = frozenset({"_local_scalar_dense", "item"})

STAGE_NAMES = ("decode/upload", "dicom mapping", "seed chain", "orientation", "views", "model forward", "other")
#: stage -> the functions and methods whose ops it counts ("module:qualified.name"); innermost wins. Names of
#: both the per-film and the batched code are listed: a name this checkout lacks is skipped (`stages_unfound` says
#: which stage has none left, its ops then counting as "other").
STAGES: dict[str, tuple[str, ...]] = {
    "decode/upload": ("cxrage_ray.decode.gpu:FrameDecoder.decode",
                      "cxrage_ray.pipeline.device_pictures:PayloadDecoder._picture_payloads",
                      "cxrage_ray.pipeline.device_pictures:PayloadDecoder._picture_payload",
                      "cxrage_ray.pipeline.device_pictures:PayloadDecoder._upload"),
    "dicom mapping": ("cxrage_ray.preprocess.tensor_dicom:dicom_q16_batch",
                      "cxrage_ray.preprocess.tensor:dicom_q16_tensor",
                      "cxrage_ray.preprocess.tensor:dcmtk_8bit_tensor"),
    "seed chain": ("cxrage_ray.preprocess.tensor:TensorSeedChain.batch",
                   "cxrage_ray.preprocess.tensor_batch:seed_chain_batch",
                   "cxrage_ray.preprocess.tensor:TensorSeedChain.__call__",
                   "cxrage_ray.preprocess.tensor:TensorSeedChain.picture"),
    "orientation": ("cxrage_ray.pipeline.device_pictures:PayloadDecoder._oriented",
                    "cxrage_ray.orient.stage:orient_batch"),
    "views": ("cxrage_ray.predict.predictor:AgePredictor._stage", "cxrage_ray.preprocess.fastai:batch_tta_views"),
    "model forward": ("cxrage_ray.predict.predictor:AgePredictor._forward",),
}
KIND_TITLES = {"j2k": "J2K DICOM", "jpeg": "JPEG DICOM", "png": "1024² PNG"}
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


# ------------------------------------------------------------------------------------------- the counter


@dataclass
class Counts:
    """What one counted region dispatched: launches and syncs per stage, the ops behind them, host work."""

    launches: Counter = field(default_factory=Counter)  # stage -> launches
    syncs: Counter = field(default_factory=Counter)  # stage -> syncs
    ops: dict[str, Counter] = field(default_factory=dict)  # stage -> {op name: launches}
    sync_ops: dict[str, Counter] = field(default_factory=dict)  # stage -> {what: syncs}
    host_ops: Counter = field(default_factory=Counter)  # op name -> ops on host tensors only
    uploads: int = 0
    downloads: int = 0
    python_calls: int | None = None

    def launch(self, stage: str, what: str) -> None:
        self.launches[stage] += 1
        self.ops.setdefault(stage, Counter())[what] += 1

    def sync(self, stage: str, what: str) -> None:
        self.syncs[stage] += 1
        self.sync_ops.setdefault(stage, Counter())[what] += 1

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


class _State(threading.local):
    """Per thread: the stage stack, how deep inside a copy wrapper (whose inner ops are not counted again),
    whether a zero-copy hand-over is running (the emulated GPU decoder's output is already on the device), and
    whether the counting itself is running (its Python calls are not counted)."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.quiet = 0
        self.zero_copy = False
        self.bookkeeping = 0  # > 0 while this file's counting code runs: its Python calls are not the actor's


_TLS = _State()
_LOCK = threading.Lock()
#: The counter of the region being counted (one at a time), or None.
_ACTIVE: list[Counts | None] = [None]
_DEVICE_TAG = "_cxrage_on_emulated_device"


def on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and bool(getattr(t, _DEVICE_TAG, False))


def mark_on_device(t: torch.Tensor, value: bool = True) -> torch.Tensor:
    setattr(t, _DEVICE_TAG, value)
    return t


def current_stage() -> str:
    return _TLS.stages[-1] if _TLS.stages else "other"


def _record(kind: str, what: str) -> None:
    counts = _ACTIVE[0]
    if counts is None or _TLS.quiet:
        return
    with _LOCK, _bookkeeping():
        if kind == "launch":
            counts.launch(current_stage(), what)
        elif kind == "sync":
            counts.sync(current_stage(), what)
        elif kind == "host":
            counts.host_ops[what] += 1
        elif kind == "upload":
            counts.uploads += 1
        elif kind == "download":
            counts.downloads += 1


class _Depth:
    """`with _Depth("quiet"):` raises a per-thread depth for the block (a class, not a generator: no Python frames
    outside this file, which the Python-call count would see)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        setattr(_TLS, self.name, getattr(_TLS, self.name) + 1)

    def __exit__(self, *exc: Any) -> None:
        setattr(_TLS, self.name, getattr(_TLS, self.name) - 1)


def _quiet() -> _Depth:
    return _Depth("quiet")


def _bookkeeping() -> _Depth:
    return _Depth("bookkeeping")


class _DispatchCounter(TorchDispatchMode):
    """Tags each op's outputs with where they live (see the module docstring) and records the op."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no `torch._disable_dynamo` wrapper around `__torch_dispatch__`: 4 Python frames an op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with _bookkeeping():
            out = func(*args, **kwargs)
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            device = not inputs or any(on_device(t) for t in inputs)
            if device:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        mark_on_device(t)
            name = func.overloadpacket.__name__ if func.namespace == "aten" else str(func)
            # a non-in-place op that hands back one of its inputs ran nothing (eval-mode dropout, a no-op cast)
            identity = (isinstance(out, torch.Tensor) and not name.endswith("_") and "out" not in kwargs
                        and any(out is t for t in inputs))
            if name in SYNC_OPS:
                if device:
                    _record("sync", f"aten.{name}")
            elif (name in NO_KERNEL_OPS and func.namespace == "aten") or identity:
                pass
            elif device:
                _record("launch", name)
            else:
                _record("host", name)
        return out

    @classmethod
    def entered(cls) -> _DispatchCounter:
        """A new mode, entered without counting the Python calls that takes."""
        with _bookkeeping():
            mode = cls()
            mode.__enter__()
        return mode

    def leave(self) -> None:
        with _bookkeeping():
            self.__exit__(None, None, None)


class counting:  # noqa: N801 (used as a function: `with counting(counts):`)
    """Count into `counts` in this thread, and in threads started while it runs (`instrumented` must be on);
    with `python_calls`, also the Python frames entered (`counts.python_calls`). A class, not a generator: no
    contextlib frame of its own in the Python-call count."""

    def __init__(self, counts: Counts, python_calls: bool = False) -> None:
        self.counts, self.python_calls = counts, python_calls
        self.calls = itertools.count()
        # this file, and the rule registry the dispatcher asks (in Python) before it calls a mode, once an op
        self.not_the_actors = {THIS_FILE, inspect.getsourcefile(simple_registry)}

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and not _TLS.bookkeeping and frame.f_code.co_filename not in self.not_the_actors:
            next(self.calls)

    def __enter__(self) -> Counts:
        if _ACTIVE[0] is not None:
            raise RuntimeError("one counted region at a time")
        _ACTIVE[0] = self.counts
        self.mode = _DispatchCounter.entered()
        if self.python_calls:
            threading.setprofile(self._profile)
            sys.setprofile(self._profile)
        return self.counts

    def __exit__(self, *exc: Any) -> None:
        if self.python_calls:
            sys.setprofile(None)
            threading.setprofile(None)
            self.counts.python_calls = next(self.calls)
        self.mode.leave()
        _ACTIVE[0] = None


def count_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Counts]:
    """fn(*args, **kwargs) counted (the instrumentation installed around it if it is not on yet)."""
    with instrumented(), counting(Counts()) as counts:
        result = fn(*args, **kwargs)
    return result, counts


# ------------------------------------------------------------------------- host <-> device traffic

#: (owner, attribute) -> the original, called by the wrappers; and what to put back on uninstall
_ORIGINALS: dict[tuple[Any, str], Any] = {}
_SAVED: dict[tuple[Any, str], tuple[bool, Any]] = {}
_INSTALLED = [0]


def _parse_to(tensor: torch.Tensor, args: tuple, kwargs: dict) -> tuple[Any, Any, bool, Any]:
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, bool(non_blocking), memory_format


def _upload(host: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    """The device copy of a host tensor (a fresh tensor here, so host and device tags never share an object)."""
    if _TLS.zero_copy:  # the emulated GPU decoder's output: already on the device, no copy
        with _quiet():
            moved = host.detach()
        return mark_on_device(moved)
    with _quiet():
        moved = host.clone()
    _record("launch", "copy host->device")
    _record("upload", "")
    if not non_blocking:
        _record("sync", "blocking copy host->device")
    return mark_on_device(moved)


def _download(t: torch.Tensor, what: str) -> None:
    _record("launch", f"copy device->host ({what})")
    _record("download", "")
    _record("sync", what)


def _tensor_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    original = _ORIGINALS[(torch.Tensor, "to")]
    if on_device(self):
        return original(self, *args, **kwargs)  # on the device already (or a `.to("cpu")`: see the docstring)
    device, dtype, non_blocking, memory_format = _parse_to(self, args, kwargs)
    if device is None:
        return original(self, *args, **kwargs)  # dtype/layout on the host
    moved = _upload(self, non_blocking)
    if dtype is not None and dtype != moved.dtype or memory_format not in (None, torch.preserve_format):
        rest = {"dtype": dtype} if dtype is not None else {}
        if memory_format is not None:
            rest["memory_format"] = memory_format
        moved = original(moved, **rest)  # the conversion runs on the device: a counted op
    return moved


def _tensor_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    original = _ORIGINALS[(torch.Tensor, "cpu")]
    if not on_device(self):
        return original(self, *args, **kwargs)
    _download(self, ".cpu()")
    with _quiet():
        host = original(self, *args, **kwargs).clone()
    return mark_on_device(host, False)


def _tensor_numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
    original = _ORIGINALS[(torch.Tensor, "numpy")]
    if not on_device(self):
        return original(self, *args, **kwargs)
    _download(self, ".numpy()")  # raises on a CUDA tensor; counted as the `.cpu().numpy()` it needs
    with _quiet():
        return original(self.detach().clone(), *args, **kwargs)


def _tensor_tolist(self: torch.Tensor) -> Any:
    original = _ORIGINALS[(torch.Tensor, "tolist")]
    if on_device(self):
        _download(self, ".tolist()")
    with _quiet():
        return original(self)


def _tensor_item(self: torch.Tensor) -> Any:
    original = _ORIGINALS[(torch.Tensor, "item")]
    if on_device(self):
        _record("sync", ".item()")
    with _quiet():
        return original(self)


def _factory(name: str) -> Callable[..., torch.Tensor]:
    """`torch.tensor` / `torch.as_tensor` with `device=`: a host -> device copy of the data (blocking)."""

    def make(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        original = _ORIGINALS[(torch, name)]
        device = kwargs.get("device")
        if device is None or on_device(data):
            return original(data, *args, **kwargs)
        if isinstance(data, torch.Tensor) and name == "as_tensor":
            return _tensor_to(data, device=device, **({"dtype": kwargs["dtype"]} if kwargs.get("dtype") else {}))
        host = original(data, *args, **{k: v for k, v in kwargs.items() if k != "device"})
        return _upload(host, non_blocking=False)

    return make


def _thread_run(self: threading.Thread) -> None:
    """Threads started while instrumented count their ops too (a dispatch mode is per thread)."""
    original = _ORIGINALS[(threading.Thread, "run")]
    mode = _DispatchCounter.entered()
    try:
        return original(self)
    finally:
        mode.leave()


def staged(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, its ops (in its thread) counted under `stage` unless a stage inside it claims them."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        _TLS.stages.append(stage)
        try:
            return fn(*args, **kwargs)
        finally:
            _TLS.stages.pop()

    return run


def _resolve(target: str) -> tuple[Any, str, Any] | None:
    """"module:Class.attr" or "module:function" -> (owner, attribute name, value), or None when it is gone."""
    module_name, _, qualified = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    *path, attr = qualified.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    value = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    return None if value is None else (owner, attr, value)


def stage_targets_missing() -> list[str]:
    """The `STAGES` targets this checkout does not have."""
    return [t for targets in STAGES.values() for t in targets if _resolve(t) is None]


def stages_unfound() -> list[str]:
    """The stages none of whose targets this checkout has (their ops would count as "other")."""
    return [stage for stage, targets in STAGES.items() if all(_resolve(t) is None for t in targets)]


def _patch(owner: Any, attr: str, value: Any) -> None:
    """Set owner.attr = value, keeping what to restore: a class's own attribute, or none (then it is deleted)."""
    if (owner, attr) not in _SAVED:
        own = attr in owner.__dict__ if isinstance(owner, type) else True
        _SAVED[(owner, attr)] = (own, owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr))
        _ORIGINALS[(owner, attr)] = getattr(owner, attr)
    setattr(owner, attr, value)


def _install() -> None:
    for name, wrapper in (("to", _tensor_to), ("cpu", _tensor_cpu), ("numpy", _tensor_numpy),
                          ("tolist", _tensor_tolist), ("item", _tensor_item)):
        _patch(torch.Tensor, name, wrapper)
    for name in ("tensor", "as_tensor"):
        _patch(torch, name, _factory(name))
    _patch(threading.Thread, "run", _thread_run)
    for stage, targets in STAGES.items():
        for target in targets:
            found = _resolve(target)
            if found is None:
                continue
            owner, attr, value = found
            wrapped = staged(stage, value)
            _patch(owner, attr, wrapped)
            if not isinstance(owner, type):  # a function: every cxrage_ray module that imported it by name
                for module in [m for n, m in sys.modules.items() if n.startswith("cxrage_ray") and m is not owner]:
                    if getattr(module, attr, None) is value:
                        _patch(module, attr, wrapped)


def _uninstall() -> None:
    for (owner, attr), (own, value) in _SAVED.items():
        if own:
            setattr(owner, attr, value)
        else:
            delattr(owner, attr)
    _SAVED.clear()
    _ORIGINALS.clear()


@contextmanager
def instrumented() -> Iterator[None]:
    """The wrappers above installed (re-entrant): tags and stages are kept; counting needs `counting` too."""
    if _INSTALLED[0] == 0:
        _install()
    _INSTALLED[0] += 1
    try:
        yield
    finally:
        _INSTALLED[0] -= 1
        if _INSTALLED[0] == 0:
            _uninstall()


# ------------------------------------------------------------------------------- the GPU routes on a CPU


def emulated_gpu_decoder(device: torch.device) -> Any:
    """A `FrameDecoder` that routes frames as on a GPU node (J2K: nvImageCodec's GPU back end; JPEG: its CPU
    back end, then a copy to the device) but decodes both on nvImageCodec's CPU back end, the J2K output taken
    as already on the device (zero-copy, as `torch.as_tensor(image, device=cuda)`)."""
    from cxrage_ray.decode.gpu import FrameDecoder, frame_route

    class EmulatedGpuFrameDecoder(FrameDecoder):
        def __init__(self) -> None:
            super().__init__(device, use_nvimgcodec=True, nvimgcodec_on_cpu=True, gpu_jpeg=False)
            self.fell_back = 0  # frames the pydicom CPU path decoded (nvImageCodec refused them)

        def route(self, frame: Any) -> str:
            return frame_route(frame, codec=self._decoder is not None, on_gpu=True, jpeg_on_cpu=True, cpu_codec=True)

        def decode(self, frames: Any) -> list:
            results = super().decode(frames)
            self.fell_back += sum(1 for r in results if getattr(r, "decoder", None) == "pydicom")
            return results

        def _decode_batch(self, frames: Any, decoder: Any, on_gpu: bool) -> list:
            if not on_gpu:
                return super()._decode_batch(frames, decoder, False)
            _TLS.zero_copy = True
            try:
                return super()._decode_batch(frames, decoder, False)
            finally:
                _TLS.zero_copy = False

    decoder = EmulatedGpuFrameDecoder()
    if not decoder.uses_nvimgcodec:
        sys.exit("STOP: nvImageCodec's CPU back end did not start (pip install 'cxrage-ray[gpu]'): every frame "
                 "would take the pydicom path, which is not the GPU route")
    return decoder


# --------------------------------------------------------------------------------------------- films


def default_films(kind: str) -> list[Path]:
    """Real films of a kind: the DICOM sample's decodable chest J2K / JPEG-baseline files, the NIH 1024² grey
    PNGs of the cxr sample."""
    if kind == "png":
        root = SHARED / "data" / "cxr-sample"
        with open(root / "metadata.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [root / r["file"] for r in rows if r["file"].startswith("images/nih_") and r["width"] == "1024"
                and r["height"] == "1024" and r["mode"] == "L"]
    root = SHARED / "data" / "dicom-sample"
    with open(root / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    syntaxes = J2K_SYNTAXES if kind == "j2k" else (JPEG_BASELINE,)
    return [root / r["file"] for r in rows if r["transfer_syntax"] in syntaxes and r["is_cxr"] == "True"
            and r["photometric"].startswith("MONOCHROME") and r["decodes_pydicom_pylibjpeg"].startswith("yes")]


def payload_rows(paths: list[Path], films: int) -> Any:
    """`films` payload rows cycling through `paths` (prepared on the CPU as the itinerary's CPU tasks do)."""
    import pandas as pd

    from cxrage_ray.config import PrepareSettings, StorageConfig
    from cxrage_ray.pipeline.payloads import prepare_encoded_batch

    uris = [str(paths[i % len(paths)]) for i in range(films)]
    rows = pd.DataFrame({"row_id": range(films), "image_id": [f"{i}-{Path(u).name}" for i, u in enumerate(uris)],
                         "uri": uris})
    return prepare_encoded_batch(rows, PrepareSettings(storage=StorageConfig()))


# ------------------------------------------------------------------------------------------ one case


def build_actor(tta: str, batch_size: int) -> Any:
    from cxrage_ray.config import OrientConfig
    from cxrage_ray.model.demo import demo_state_dict
    from cxrage_ray.pipeline.device_pictures import DevicePictures
    from cxrage_ray.predict.predictor import PredictorConfig
    from cxrage_ray.predict.scoring import ScoreActor
    from cxrage_ray.preprocess.tensor_batch import DEFAULT_GROUP_BYTES

    labels = {"weights_sha256": "bench", "preprocess": "seed", "tta": tta, "decode": "exact"}
    config = PredictorConfig(device="cpu", batch_size=batch_size, fixed_shape=True, tta=tta)
    actor = ScoreActor([demo_state_dict(0)], config, labels, source=DevicePictures(orient=OrientConfig(mode="auto")))
    actor.source.decoder = emulated_gpu_decoder(actor.source.device)
    # a GPU's group budget: on a CPU the chain keeps groups within 16 MB (CPU_GROUP_BYTES), which at full size is
    # a film or two a group, so the tap loop would be counted as a CPU runs it, not as a GPU would
    actor.source.chain.group_bytes = DEFAULT_GROUP_BYTES
    for value in vars(actor.predictor).values():  # the model's weights live on the device
        if isinstance(value, torch.nn.Module):
            for t in itertools.chain(value.parameters(), value.buffers()):
                mark_on_device(t)
    return actor


def count_case(actor: Any, rows: Any, with_python_calls: bool) -> dict[str, Any]:
    """Warm-up, then the counted call of one batch; the figures as plain data."""
    n = len(rows)
    with instrumented():
        with counting(Counts()):  # warm-up: caches filled, and tagged as they would be in a counted call
            actor(rows.copy())
        fell_back = actor.source.decoder.fell_back
        with warnings_logged() as logged:
            started = time.perf_counter()
            with counting(Counts(), python_calls=with_python_calls) as counts:
                scored = actor(rows.copy())
            seconds = time.perf_counter() - started
        fell_back = actor.source.decoder.fell_back - fell_back
    errors = scored.loc[scored["status"] != "ok", "error"].tolist()
    return {
        "films": n, "films_ok": int((scored["status"] == "ok").sum()), "errors": errors[:3], "warnings": logged,
        "decode_fell_back": fell_back, "seconds": round(seconds, 2),
        "launches": {"total": counts.total_launches, **{s: counts.launches[s] for s in STAGE_NAMES}},
        "syncs": {"total": counts.total_syncs, **{s: counts.syncs[s] for s in STAGE_NAMES}},
        "launches_per_film": counts.total_launches / n, "syncs_per_batch": counts.total_syncs,
        "python_calls": counts.python_calls,
        "python_calls_per_film": None if counts.python_calls is None else counts.python_calls / n,
        "uploads": counts.uploads, "downloads": counts.downloads,
        "host_ops": sum(counts.host_ops.values()),
        "ops": {s: dict(c.most_common()) for s, c in counts.ops.items()},
        "sync_ops": {s: dict(c.most_common()) for s, c in counts.sync_ops.items()},
    }


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The package's warnings while it runs (a batch retried film by film would multiply every count)."""
    import logging

    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage()[:300])

    handler = Keep(logging.WARNING)
    root = logging.getLogger("cxrage_ray")
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)


# ------------------------------------------------------------------------------------------- reporting

SHORT = {"decode/upload": "decode", "dicom mapping": "dicom", "seed chain": "chain", "orientation": "orient",
         "views": "views", "model forward": "model", "other": "other"}


def table(cases: list[dict[str, Any]]) -> str:
    head = (f"{'kind':<11}{'films':>6}  {'launches/film':>13}  " + "".join(f"{SHORT[s]:>8}" for s in STAGE_NAMES)
            + f"  {'syncs/batch':>11}  " + "".join(f"{SHORT[s]:>7}" for s in STAGE_NAMES)
            + f"  {'py calls/film':>13}  {'s':>6}")
    lines = [head, "-" * len(head)]
    for c in cases:
        n = c["films"]
        calls = "-" if c["python_calls_per_film"] is None else f"{c['python_calls_per_film']:.0f}"
        lines.append(f"{KIND_TITLES[c['kind']]:<11}{n:>6}  {c['launches']['total'] / n:>13.1f}  "
                     + "".join(f"{c['launches'][s] / n:>8.1f}" for s in STAGE_NAMES)
                     + f"  {c['syncs']['total']:>11d}  " + "".join(f"{c['syncs'][s]:>7d}" for s in STAGE_NAMES)
                     + f"  {calls:>13}  {c['seconds']:>6.1f}")
    return "\n".join(lines)


def scaling(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind, between its fewest and most films: (count ratio) / (films ratio) per figure and stage, and a
    least-squares fixed-per-batch + per-film fit of the totals."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(c["kind"] for c in cases):
        mine = sorted((c for c in cases if c["kind"] == kind), key=lambda c: c["films"])
        if len(mine) < 2 or mine[0]["films"] == mine[-1]["films"]:
            continue
        lo, hi = mine[0], mine[-1]
        films_ratio = hi["films"] / lo["films"]
        entry: dict[str, Any] = {"from": lo["films"], "to": hi["films"]}
        for figure in ("launches", "syncs"):
            entry[figure] = {s: (hi[figure][s] / lo[figure][s] / films_ratio if lo[figure][s] else None)
                             for s in ("total", *STAGE_NAMES)}
            x = np.array([c["films"] for c in mine], dtype=float)
            y = np.array([c[figure]["total"] for c in mine], dtype=float)
            per_film, fixed = np.polyfit(x, y, 1)
            entry[f"{figure}_fit"] = {"per_batch": float(fixed), "per_film": float(per_film)}
        out[kind] = entry
    return out


def verdict(ratio: float | None, flat: float) -> str:
    """Where `ratio` lies between `flat` (paid once per batch) and 1 (paid per film): the nearer quarter decides."""
    if ratio is None:
        return "none at the fewest films"
    share = (ratio - flat) / (1 - flat) if flat < 1 else 1.0
    return "per film" if share >= 0.75 else "flat per batch" if share <= 0.25 else "mixed"


def scaling_text(found: dict[str, dict[str, Any]]) -> str:
    lines = []
    for kind, entry in found.items():
        flat = entry["from"] / entry["to"]
        lines.append(f"{KIND_TITLES[kind]}, {entry['from']} -> {entry['to']} films: ratio = (count at {entry['to']} / "
                     f"count at {entry['from']}) / {entry['to'] / entry['from']:g}  (1 = per film, {flat:.3g} = flat "
                     "per batch)")
        for figure in ("launches", "syncs"):
            fit = entry[f"{figure}_fit"]
            parts = [f"{SHORT[s]} {r:.2f}" for s, r in entry[figure].items() if s != "total" and r is not None]
            total = entry[figure]["total"]
            lines.append(f"  {figure:<8} total {'-' if total is None else f'{total:.3f}'} "
                         f"({verdict(total, flat)}; fit {fit['per_batch']:.0f} per batch + {fit['per_film']:.1f} "
                         f"per film)   by stage: {', '.join(parts)}")
    return "\n".join(lines)


def top_ops_text(cases: list[dict[str, Any]], top: int) -> str:
    lines = []
    for kind in dict.fromkeys(c["kind"] for c in cases):
        biggest = max((c for c in cases if c["kind"] == kind), key=lambda c: c["films"])
        n = biggest["films"]
        lines.append(f"{KIND_TITLES[kind]} at {n} films, per film (launches) / per batch (syncs):")
        for stage in STAGE_NAMES:
            ops = list(biggest["ops"].get(stage, {}).items())[:top]
            syncs = list(biggest["sync_ops"].get(stage, {}).items())[:top]
            if not ops and not syncs:
                continue
            text = ", ".join(f"{name} {count / n:.2g}" for name, count in ops)
            sync_text = ", ".join(f"{name} {count}" for name, count in syncs)
            lines.append(f"  {stage:<14} {text}" + (f"   | syncs: {sync_text}" if sync_text else ""))
    return "\n".join(lines)


def over_budget(cases: list[dict[str, Any]], launches: float | None, syncs: float | None) -> list[str]:
    found = []
    for c in cases:
        where = f"{KIND_TITLES[c['kind']]} at {c['films']} films"
        if launches is not None and c["launches_per_film"] > launches:
            found.append(f"{where}: {c['launches_per_film']:.1f} launches per film > {launches:g}")
        if syncs is not None and c["syncs_per_batch"] > syncs:
            found.append(f"{where}: {c['syncs_per_batch']} syncs per batch > {syncs:g}")
    return found


def checkout() -> str:
    """This checkout's commit, "+dirty" when files differ from it (figures move while the code does)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--films", type=int, nargs="+", default=[8, 32, 128], help="films per batch")
    parser.add_argument("--kinds", nargs="+", choices=list(KIND_TITLES), default=list(KIND_TITLES))
    parser.add_argument("--tta", choices=["seed", "none"], default="seed", help="seed: 5 views per film")
    parser.add_argument("--batch-size", type=int, default=640, help="model views per forward pass")
    parser.add_argument("--j2k", type=Path, nargs="+", help="J2K DICOM films (default: the DICOM sample's)")
    parser.add_argument("--jpeg", type=Path, nargs="+", help="JPEG-baseline DICOM films (default: the sample's)")
    parser.add_argument("--png", type=Path, nargs="+", help="PNG films (default: the NIH 1024² grey PNGs)")
    parser.add_argument("--no-python-calls", action="store_true", help="do not count Python calls")
    parser.add_argument("--top-ops", type=int, default=6, help="ops listed per stage for each kind's largest batch")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--budget-launches", type=float, help="exit 1 if a case launches more per film")
    parser.add_argument("--budget-syncs", type=float, help="exit 1 if a case syncs more per batch")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    missing, unfound = stage_targets_missing(), stages_unfound()
    print(f"checkout {checkout()}; torch {torch.__version__}; emulated device: cpu; tta {args.tta}; "
          f"batch_size {args.batch_size}; fixed_shape; orientation auto; demo weights")
    if unfound:
        print(f"note: no function of these stages found (their ops count as 'other'): {', '.join(unfound)}")
    actor = build_actor(args.tta, args.batch_size)
    cases = []
    for kind in args.kinds:
        paths = getattr(args, kind) or default_films(kind)
        if not paths:
            sys.exit(f"no {kind} films found under {SHARED / 'data'} (set CXRAGE_SHARED or pass --{kind})")
        for n in args.films:
            rows = payload_rows(paths, n)
            case = {"kind": kind, "files": len(paths), **count_case(actor, rows, not args.no_python_calls)}
            cases.append(case)
            note = f"; {case['films'] - case['films_ok']} error rows: {case['errors']}" if case["errors"] else ""
            note += f"; warnings: {case['warnings'][:3]}" if case["warnings"] else ""
            fell = f"; {case['decode_fell_back']} frames fell back to pydicom" if case["decode_fell_back"] else ""
            print(f"  counted {KIND_TITLES[kind]} x {n} ({len(paths)} distinct files) in {case['seconds']:.1f} s"
                  f"{fell}{note}", flush=True)
    print()
    print("launches per film and syncs per batch, by stage:")
    print(table(cases))
    found = scaling(cases)
    if found:
        print()
        print(scaling_text(found))
    if args.top_ops:
        print()
        print(top_ops_text(cases, args.top_ops))
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"films": args.films, "kinds": args.kinds, "tta": args.tta, "batch_size": args.batch_size,
                         "torch": torch.__version__, "checkout": checkout(), "stage_targets_missing": missing,
                         "stages_unfound": unfound},
            "cases": cases, "scaling": found}, indent=1))
    over = over_budget(cases, args.budget_launches, args.budget_syncs)
    if args.budget_launches is not None or args.budget_syncs is not None:
        print()
        print("\n".join(f"OVER BUDGET: {line}" for line in over) if over else
              f"within budget: <= {args.budget_launches} launches per film, <= {args.budget_syncs} syncs per batch")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
