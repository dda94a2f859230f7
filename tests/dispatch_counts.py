"""What tensor code would cost on a GPU, counted on a CPU: aten ops (each about one kernel launch) and host syncs.

In:  a region of code: `with count_dispatch() as counts: ...` (this thread only).
Out: `DispatchCounts`:
  ops      every aten op the region dispatched, by name (views and allocations included, so `total_ops` is an upper
           bound on launches; `kernel_ops` leaves out the views and allocations, which start no kernel)
  syncs    the host waits: `aten._local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`), and the
           read-backs `Tensor.tolist`, `Tensor.cpu`, `Tensor.numpy` (one each, however many numbers they read)
  uploads  `torch.from_numpy` calls: how host-built tables reach the device. A CPU run cannot tell a blocking
           `.to(cuda)` (a sync) from a pinned `non_blocking=True` copy (none), so they are counted apart and the
           tests bound `syncs + uploads` when they want the conservative figure.

The method wrappers are installed for the region only and restored after it, also on error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that start no kernel on a GPU: views (new sizes/strides over the same storage) and allocations.
NO_KERNEL_OPS = frozenset({
    "view", "_unsafe_view", "as_strided", "expand", "permute", "t", "transpose", "slice", "select", "narrow",
    "unsqueeze", "squeeze", "alias", "detach", "_reshape_alias", "unbind", "split", "split_with_sizes", "chunk",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
})
#: the aten op of a scalar read (`.item()`, `int(t)`, `bool(t)`): one host sync each.
SCALAR_READ = "_local_scalar_dense"
#: Tensor methods that copy device values to the host: one host sync each.
READ_BACKS = ("tolist", "cpu", "numpy")


@dataclass
class DispatchCounts:
    """What one counted region dispatched (see the module docstring)."""

    ops: Counter = field(default_factory=Counter)  # aten op name (no overload) -> count
    syncs: Counter = field(default_factory=Counter)  # "tolist" / "cpu" / "numpy" / "_local_scalar_dense" -> count
    uploads: int = 0

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def kernel_ops(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in NO_KERNEL_OPS)

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while it is active, and the scalar reads among them."""

    def __init__(self, counts: DispatchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        self.counts.ops[name] += 1
        if name == SCALAR_READ:
            self.counts.syncs[SCALAR_READ] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_dispatch() -> Iterator[DispatchCounts]:
    """Count the aten ops, read-backs and uploads of the `with` body (this thread)."""
    counts = DispatchCounts()
    saved = {name: getattr(torch.Tensor, name) for name in READ_BACKS}
    from_numpy = torch.from_numpy

    def read_back(name: str) -> Any:
        original = saved[name]

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts.syncs[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    def upload(array: Any) -> torch.Tensor:
        counts.uploads += 1
        return from_numpy(array)

    own = {name for name in READ_BACKS if name in torch.Tensor.__dict__}
    for name in READ_BACKS:
        setattr(torch.Tensor, name, read_back(name))
    torch.from_numpy = upload
    try:
        with _OpCounter(counts):
            yield counts
    finally:
        for name, method in saved.items():
            if name in own:  # put back as it was: an inherited method is deleted, not set on torch.Tensor
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)
        torch.from_numpy = from_numpy
