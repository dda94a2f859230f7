"""The resize half of the batched tensor seed chain (`cxrage_ray.preprocess.tensor_batch`): groups of trimmed
films, their gather and tap tables (uploaded in one copy: `Pack`), and the two resize passes of each group.

In:  the batch's planned `Film`s (trim box, `ResizePlan`, level-table row) and its flat int32 buffer.
Out: per group, the uint8 pictures of its films (`film_view` cuts each film's out).

Exactness and costs: see `tensor_batch`'s docstring; the arithmetic here is its "groups" step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cxrage_ray.decode.gpu import to_device
from cxrage_ray.preprocess.quantum import QUANTUM
from cxrage_ray.preprocess.resize_weights import FilterName, ResizePlan, axis_weights

#: A film joins a group only while the group's padded work (lines and taps) stays within this many times its films'
#: own: padded taps and lines cost as much as real ones.
MAX_GROUP_WASTE = 1.5
_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float64): torch.float64}


@dataclass(eq=False)
class Film:
    """One batched film: its input, where it sits in its flat buffer, and (after the read-back) its trim and plan."""

    item: int
    q16: torch.Tensor
    h: int
    w: int
    c: int
    slab: int = 0  # element offset of its (H, W, C) slab in the flat buffer
    row: int = 0  # elements per slab row (its chunk's width times C)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # inclusive (top, bottom, left, right)
    grey: bool = False  # 3 channels, all equal inside the box: resized as one, as the per-film chain does
    plan: ResizePlan | None = None
    table: int = 0  # its row in the uploaded level tables

    @property
    def trimmed(self) -> tuple[int, int]:
        """(height, width) after the trim."""
        top, bottom, left, right = self.box
        return bottom - top + 1, right - left + 1

    @property
    def channels(self) -> int:
        """The channels it is resized with."""
        return 1 if self.c == 1 or self.grey else 3

    @property
    def first(self) -> tuple[int, int, int, int]:
        """(n1, o1, n2, o2): input and output lines of the first and of the second resize pass."""
        th, tw = self.trimmed
        if self.plan.horizontal_first:
            return tw, self.plan.out_w, th, self.plan.out_h
        return th, self.plan.out_h, tw, self.plan.out_w


@dataclass(eq=False)
class Group:
    """Films resized together with C channels: its input is (G, s1, s2, C) (each film's trimmed pixels, its
    first-pass axis first), pass 1 gives (G, o1, s2, C), pass 2 (G, o2, o1, C)."""

    films: list[Film]
    c: int
    s1: int
    s2: int
    o1: int
    o2: int
    along: tuple = ()  # upload keys of its input's gather offsets
    table: tuple = ()  # upload key of its films' level tables
    blocks: list[list[tuple]] = field(default_factory=list)  # per pass, per block of taps: index, weight keys, taps
    source: tuple[int, int] = (0, 0)  # sizes of the strided view its input is gathered from


# ------------------------------------------------------------------------------------------------- upload


class Pack:
    """Host arrays for the device, gathered into one buffer so that they travel in one copy."""

    def __init__(self) -> None:
        self._parts: dict[np.dtype, list[np.ndarray]] = {}

    def add(self, array: np.ndarray) -> tuple[np.dtype, int]:
        """Queue an int64, float64, uint8 or bool array; returns its key for `Uploaded.get`."""
        parts = self._parts.setdefault(array.dtype, [])
        parts.append(np.ascontiguousarray(array))
        return array.dtype, len(parts) - 1

    def upload(self, device: torch.device) -> Uploaded:
        """One host -> device copy (pinned and non-blocking on CUDA: no host sync), then per dtype one view and
        one split of the buffer, so that each array costs one `view` when it is read."""
        sections = {dtype: np.concatenate([part.reshape(-1) for part in parts]) for dtype, parts in self._parts.items()}
        offsets, size = {}, 0
        for dtype, section in sections.items():
            offsets[dtype], size = size, size + -(-section.nbytes // 8) * 8  # 8-aligned: viewed as its dtype
        host = np.zeros(max(size, 8), np.uint8)
        for dtype, section in sections.items():
            host[offsets[dtype]:offsets[dtype] + section.nbytes] = section.view(np.uint8)
        buffer = to_device(host, device)
        pieces = {}
        for dtype, section in sections.items():
            flat = buffer[offsets[dtype]:offsets[dtype] + section.nbytes]
            if dtype != np.uint8:
                flat = flat.view(_TORCH_DTYPES[dtype])
            pieces[dtype] = flat.split([part.size for part in self._parts[dtype]])
        return Uploaded(pieces, {dtype: [part.shape for part in parts] for dtype, parts in self._parts.items()})


@dataclass
class Uploaded:
    """The uploaded arrays as 1-D device views, and their shapes."""

    pieces: dict[np.dtype, tuple[torch.Tensor, ...]]
    shapes: dict[np.dtype, list[tuple[int, ...]]]

    def get(self, key: tuple[np.dtype, int]) -> torch.Tensor:
        """The array queued as `key`, as a device view of the buffer."""
        dtype, i = key
        piece, shape = self.pieces[dtype][i], self.shapes[dtype][i]
        return piece if len(shape) == 1 else piece.view(shape)


# ------------------------------------------------------------------------------------------------- the resize


def plan_groups(films: list[Film], budget: int) -> list[Group]:
    """Films resized with one channel count, most work first, each into the open group it grows least (best fit): the
    group's tensors within `budget` bytes (`_bytes`), its padded work within `MAX_GROUP_WASTE` times its films' own
    (padded taps and lines cost as much as real ones); else into a group of its own."""
    groups: list[Group] = []
    for c in (1, 3):
        mine: list[tuple[Group, tuple[int, ...], int]] = []  # (group, its dims, its films' own work)
        for film in sorted((f for f in films if f.channels == c), key=lambda f: _work(_dims(f)), reverse=True):
            own = _dims(film)
            best, least = None, None
            for k, (group, dims, work) in enumerate(mine):
                grown, g = tuple(max(a, b) for a, b in zip(dims, own)), len(group.films) + 1
                if _bytes(grown, g, c) <= budget and _work(grown, g) <= MAX_GROUP_WASTE * (work + _work(own)):
                    extra = _work(grown, g) - _work(dims, g - 1)
                    if least is None or extra < least:
                        best, least = k, extra
            if best is None:
                mine.append((Group([], c, 0, 0, 0, 0), (0,) * 6, 0))
                best = len(mine) - 1
            group, dims, work = mine[best]
            group.films.append(film)
            mine[best] = (group, tuple(max(a, b) for a, b in zip(dims, own)), work + _work(own))
        for group, dims, _ in mine:
            group.s1, group.s2, group.o1, group.o2 = dims[:4]
            groups.append(group)
    return groups


def _dims(film: Film) -> tuple[int, int, int, int, int, int]:
    """(n1, n2, o1, o2, t1, t2): a film's pass lines in and out, and each pass's taps."""
    n1, o1, n2, o2 = film.first
    plan = film.plan
    t1 = _taps(n1, o1, plan.filter, plan.identity)[0].shape[1]
    t2 = _taps(n2, o2, plan.filter, plan.identity)[0].shape[1]
    return n1, n2, o1, o2, t1, t2


def _work(dims: tuple[int, ...], films: int = 1) -> int:
    """Values a group of `dims` (`_dims`) moves: its gathered input, then each tap of each pass."""
    s1, s2, o1, o2, t1, t2 = dims
    return films * (s1 * s2 + t1 * o1 * s2 + t2 * o2 * o1)


def _bytes(dims: tuple[int, ...], films: int, c: int) -> int:
    """A group's largest tensor: its int32 input levels (G, s1, s2, C), pass 1's gathered int32 and float64 terms
    of one tap (G, o1, s2, C) (its sum and transpose are 8 bytes a value), or pass 2's float64 (G, o2, o1, C)."""
    s1, s2, o1, o2 = dims[:4]
    return c * films * max(4 * s1 * s2, 12 * o1 * s2, 8 * o2 * o1)


def group_tables(group: Group, pack: Pack, budget: int) -> None:
    """Queue a group's tables (`group.along`, `group.blocks`): where its input is gathered from in the flat buffer,
    and both passes' taps in blocks of as many taps as `budget` bytes allow."""
    films, s1, s2, o1, o2, c = group.films, group.s1, group.s2, group.o1, group.o2, group.c
    n = len(films)
    along1 = np.empty((n, s1, 1), np.int64)  # flat element of the film's first-pass line a, second-pass line 0
    along2 = np.empty((n, 1, s2), np.int64)  # + the element offset of its second-pass line b
    for g, film in enumerate(films):
        top, _, left, _ = film.box
        th, tw = film.trimmed
        # past its own lines a film repeats its last one: padded lines hold finite values that no tap weighs
        rows = np.minimum(np.arange(max(s1, s2)), th - 1) * film.row
        cols = np.minimum(np.arange(max(s1, s2)), tw - 1) * film.c  # a grey colour film: channel 0 of each pixel
        first, second = (cols, rows) if film.plan.horizontal_first else (rows, cols)
        along1[g, :, 0] = film.slab + top * film.row + left * film.c + first[:s1]
        along2[g, 0] = second[:s2]
    group.source = (int(along1.max()) + 1, int(along2.max()) + 1)
    group.along = (pack.add(along1), pack.add(along2))
    group.table = pack.add(np.array([film.table for film in films]).reshape(n, 1, 1, 1))
    axes = [film.first for film in films]
    lines1, weights1 = _pass_tables([(a[0], a[1], f) for a, f in zip(axes, films)], s1, o1)
    lines2, weights2 = _pass_tables([(a[2], a[3], f) for a, f in zip(axes, films)], s2, o2)
    group.blocks = [_blocks(pack, lines1, weights1, budget // (12 * n * o1 * s2 * c)),
                    _blocks(pack, lines2, weights2, budget // (8 * n * o2 * o1 * c))]


def _blocks(pack: Pack, lines: np.ndarray, weights: np.ndarray, per_block: int) -> list[tuple[tuple, tuple, int]]:
    """Queue one pass's (T, rows) input lines and weights in blocks of `per_block` taps (at least one): per block,
    the keys of its lines (taps * rows,) and weights (taps * rows, 1), and its taps."""
    per_block = max(1, min(len(lines), per_block))
    return [(pack.add(lines[t:t + per_block].reshape(-1)), pack.add(weights[t:t + per_block].reshape(-1, 1)),
             min(per_block, len(lines) - t)) for t in range(0, len(lines), per_block)]


def _pass_tables(axes: list[tuple[int, int, Film]], lines: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass's taps for a group: int64 (T, G * outputs) input line (film g's lines start at g * lines) and
    float64 (T, G * outputs) weight, T the group's most taps; padded taps weigh 0.0 at the film's first line."""
    taps = [_taps(n_in, n_out, film.plan.filter, film.plan.identity) for n_in, n_out, film in axes]
    most = max(index.shape[1] for index, _ in taps)
    index = np.empty((most, len(taps) * outputs), np.int64)
    weight = np.zeros((most, len(taps) * outputs))
    for g, (idx, w) in enumerate(taps):
        k, t = idx.shape
        index[:, g * outputs:(g + 1) * outputs] = g * lines
        index[:t, g * outputs:g * outputs + k] = (g * lines + idx).T
        weight[:t, g * outputs:g * outputs + k] = w.T
    return index, weight


def _taps(n_in: int, n_out: int, name: FilterName, identity: bool) -> tuple[np.ndarray, np.ndarray]:
    """(index (n_out, T), weights (n_out, T)) of one axis: IM's contributions (`axis_weights`, as the per-film
    chain's `taps`), or one tap of weight 1.0 when the plan is the identity (the per-film chain copies)."""
    if identity:
        return np.arange(n_out, dtype=np.int64)[:, None], np.ones((n_out, 1))
    aw = axis_weights(n_in, n_out, name)
    return aw.index, aw.weights


class Workspace:
    """A batch's scratch tensors, reused from group to group. On a CPU a fresh tensor of more than 32 MB is fresh
    pages from the OS every time (glibc maps and unmaps it), and faulting them in costs several times the copy
    that fills them; a GPU's caching allocator reuses its memory anyway."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """An uninitialised contiguous `shape` tensor over the buffer `name` (grown when too small)."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        strides = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
        return buffer.as_strided(shape, strides)


def resize_group(flat: torch.Tensor, levels: torch.Tensor, uploaded: Uploaded, group: Group,
                  space: Workspace) -> torch.Tensor:
    """A group's films -> uint8 (G * o2, o1 * C): the fill resize of their levels (int32 257 k), as the per-film chain
    (`TensorSeedChain.resize_fill_512`) computes it, then v // 257; film g's (o2, o1, C) block is its picture,
    transposed when its plan went vertical first."""
    n, c, s1, s2, o1, o2 = len(group.films), group.c, group.s1, group.s2, group.o1, group.o2
    # pixel (a, b) of film g's input starts at flat element along1[g, a] + along2[g, b]: a view with overlapping
    # strides (its declared sizes reach into the buffer's tail) lets one advanced index gather every film's
    source = flat.as_strided((*group.source, c), (1, 1, 1))
    raw = torch.ops.aten.index.Tensor_out(source, list(map(uploaded.get, group.along)),
                                          out=space.get("raw", (n, s1, s2, c), torch.int32))  # Q16
    q16 = torch.ops.aten.index.Tensor_out(levels, [uploaded.get(group.table), raw],
                                          out=space.get("levels", (n, s1, s2, c), torch.int32))  # 257 k
    mid = _pass(q16.view(n * s1, s2 * c), uploaded, group.blocks[0], n * o1, space)
    turned = space.get("turned", (n, s2, o1, c))
    turned.copy_(mid.view(n, o1, s2, c).permute(0, 2, 1, 3))  # the second pass's lines as rows
    out = _pass(turned.view(n * s2, o1 * c), uploaded, group.blocks[1], n * o2, space)  # (G * o2, o1 * C)
    return out.div_(257.0, rounding_mode="floor").to(torch.uint8)  # exact: out holds whole numbers


def _pass(x: torch.Tensor, uploaded: Uploaded, blocks: list[tuple[tuple, tuple, int]], rows: int,
          space: Workspace) -> torch.Tensor:
    """One resize pass over the rows of x (every film's input lines, one after the other; int32 257 k or float64)
    -> Q16-rounded float64 (rows, columns) in the workspace: per block of taps one gather and one multiply into
    float64 (which makes an int32 257 k the float64 257.0 k, exactly), then one add a tap, in IM's order from 0.0
    as the per-film chain sums: a separate multiply and add, as IM's build rounds twice (`addcmul_` may fuse them
    on CUDA), and never a reordered sum."""
    columns = x.shape[1]
    acc = space.get("sum", (rows, columns)).zero_()
    most = max(taps for _, _, taps in blocks)
    scratch = space.get("terms", (most * rows, columns))
    gathered = scratch if x.dtype == torch.float64 else space.get("gathered", (most * rows, columns), x.dtype)
    for lines, weights, taps in blocks:
        terms, read = (scratch, gathered) if taps == most else (scratch[:taps * rows], gathered[:taps * rows])
        torch.mul(torch.index_select(x, 0, uploaded.get(lines), out=read), uploaded.get(weights), out=terms)
        for term in terms.view(taps, rows, columns).unbind(0) if taps > 1 else (terms,):
            acc.add_(term)
    return acc.clamp_(0.0, QUANTUM).add_(0.5).floor_()  # IM's ClampToQuantum, as `tensor._round_q16`


def grey_flags(out: torch.Tensor, group: Group) -> torch.Tensor:
    """bool (G,): whether a colour group's film came out with all channels equal (padding is 0 in all three)."""
    red, green, blue = out.view(len(group.films), group.o2, group.o1, 3).unbind(3)
    return ((red == green) & (green == blue)).all(dim=(1, 2))


def film_view(out: torch.Tensor, g: int, film: Film, group: Group, channels: int) -> torch.Tensor:
    """Film g's uint8 (out_h, out_w, channels) as a view of its group's (G, o2, o1, C) output."""
    c, o1 = group.c, group.o1
    plan = film.plan
    # the first pass's axis is o1: x when the plan went horizontal first, else y
    stride = (o1 * c, c, 1) if plan.horizontal_first else (c, o1 * c, 1)
    return out.as_strided((plan.out_h, plan.out_w, channels), stride, g * group.o2 * o1 * c)
