"""The tensor seed chain for a batch of films, paid per batch rather than per film (`TensorSeedChain.batch`).

In:  items (Q16 pixels (H, W, C) tensor, C in {1, 3}, any integer dtype and device; Q16 alpha (H, W) or None).
Out: per item, exactly (torch.equal) what `TensorSeedChain.__call__` returns for it, or the exception that call
     raises for it (a sliver refused by `check_fill_aspect`, a wrong shape): one bad film never costs the others.

Why: one film through `TensorSeedChain.__call__` costs ~130-220 aten ops for a 1024 px film, ~370 for a DICOM-sized
one (on a GPU, each about one kernel launch; the resize's tap loop is most of them) and 3-4 host syncs. Here a batch
costs ~2 ops per film plus ~65 per chunk and ~15 + 1 a tap + ~5 a block of taps per group, two read-backs (one for a
grey batch) and two uploads (pinned and non-blocking on CUDA): ~6 ops a film for 32 grey 1024 px films.

The work, per batch (`seed_chain_batch`):
  stage       films of one channel count are copied into one flat int32 buffer as padded (N, H, W, C) chunks of
              similar size (one `cat` a chunk, films of one shape padded together)
  trim, range per chunk: IM's trim box (`trim_box_tensor`'s comparisons, masked to each film's own pixels), IM's
              fix-ups, the min and max inside the box; one read-back of every film's box and min/max
  host        `check_fill_aspect` (a refusal is that film's result), `fill_plan`, the level tables
              (`levels.level_table`, one per distinct min/max), the gather and tap tables: one upload
  levels      each chunk in place: Q16 257 k of its film's level table (one lookup a chunk)
  groups      films of one channel count, of similar work (best fit), within `group_bytes`: pass 1 gathers a
              block of taps of every film at once straight from the flat buffer (one advanced index through a view
              with overlapping strides; a film's first-pass line is its trimmed row, or its column when its plan
              goes horizontal first, so those films come out transposed), one multiply a block, one add a tap; IM's
              Q16 rounding; a transpose; pass 2 the same with `index_select`; uint8
  read-back   the colour films' "all channels equal" flags (none for a grey batch); results are views of the
              groups' outputs

Exact, not merely close: every output value comes from the same IEEE operations in the same order as in the
per-film chain (`TensorSeedChain._pass`): per tap one gather, one multiply and one add over the whole group (never a
fused multiply-add, never a reordered sum), taps in IM's order. The per-film taps, film by film, are padded to the
group's widest with weight 0.0 at a valid line: a Q16 value x >= 0 gives x * 0.0 = +0.0, and acc + 0.0 = acc, so a
padded tap changes at most the sign of a zero sum, which the Q16 rounding (floor(clamp(v) + 0.5)) erases. The
level tables hold the float64 257.0 k the per-film chain multiplies. An identity plan runs one tap of weight 1.0.

Taken by the per-film call instead: films with alpha (rare: 14 of the 250 sample films), items that are no
(H, W, 1|3) integer tensor, and films whose trimmed values leave 0..65535 (the per-film table lookup decides what
they give; on a GPU, values above 65535 raise an IndexError here instead of the per-film lookup's device assert).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.preprocess.levels import level_table
from cxrage_ray.preprocess.quantum import QUANTUM
from cxrage_ray.preprocess.resize_weights import FilterName, ResizePlan, axis_weights, fill_plan

if TYPE_CHECKING:
    from cxrage_ray.preprocess.tensor import TensorSeedChain

Item = tuple[torch.Tensor, "torch.Tensor | None"]

#: On a GPU: the most bytes one tensor of a group's resize (its float64 input levels, a block of pass terms, a pass
#: sum) or of a chunk's trim (int32 pixels) may take; 1 GiB is 2^27 float64 values. A group's peak is about three
#: times this; the batch's flat buffer (4 bytes a padded pixel) comes on top. A film larger than the budget still
#: goes, as a group of its own. Larger groups mean fewer launches: the tap loop is paid per group.
DEFAULT_GROUP_BYTES = 1 << 30
#: On a CPU there are no launches to save, and a tensor past the caches (and past glibc's 32 MB mmap threshold,
#: fresh pages every time) costs several times its arithmetic: small groups keep the batch as fast as the per-film
#: loop there (1024 px films: 16 MB is ~4 films a group).
CPU_GROUP_BYTES = 16 << 20
#: A film joins a chunk only while the chunk's padded pixels stay within this many times its films' own: the trim's
#: few comparisons a pixel are cheap, and fewer chunks cost fewer ops.
MAX_CHUNK_WASTE = 2.0
#: A film joins a group only while the group's padded work (lines and taps) stays within this many times its films'
#: own: padded taps and lines cost as much as real ones.
MAX_GROUP_WASTE = 1.5
_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float64): torch.float64}


# ------------------------------------------------------------------------------------------------- records


@dataclass(eq=False)
class _Film:
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
class _Chunk:
    """Films of one channel count padded to (N, H, W, C), trimmed together."""

    films: list[_Film]
    h: int
    w: int
    c: int
    area: int = 0  # the films' own pixels
    start: int = 0  # element offset in the flat buffer

    @property
    def pixels(self) -> int:
        return len(self.films) * self.h * self.w


@dataclass(eq=False)
class _Group:
    """Films resized together with C channels: its input is (G, s1, s2, C) (each film's trimmed pixels, its
    first-pass axis first), pass 1 gives (G, o1, s2, C), pass 2 (G, o2, o1, C)."""

    films: list[_Film]
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


class _Pack:
    """Host arrays for the device, gathered into one buffer so that they travel in one copy."""

    def __init__(self) -> None:
        self._parts: dict[np.dtype, list[np.ndarray]] = {}

    def add(self, array: np.ndarray) -> tuple[np.dtype, int]:
        """Queue an int64, float64, uint8 or bool array; returns its key for `_Uploaded.get`."""
        parts = self._parts.setdefault(array.dtype, [])
        parts.append(np.ascontiguousarray(array))
        return array.dtype, len(parts) - 1

    def upload(self, device: torch.device) -> _Uploaded:
        """One host -> device copy (pinned and non-blocking on CUDA: no host sync), then per dtype one view and
        one split of the buffer, so that each array costs one `view` when it is read."""
        sections = {dtype: np.concatenate([part.reshape(-1) for part in parts]) for dtype, parts in self._parts.items()}
        offsets, size = {}, 0
        for dtype, section in sections.items():
            offsets[dtype], size = size, size + -(-section.nbytes // 8) * 8  # 8-aligned: viewed as its dtype
        host = np.zeros(max(size, 8), np.uint8)
        for dtype, section in sections.items():
            host[offsets[dtype]:offsets[dtype] + section.nbytes] = section.view(np.uint8)
        buffer = torch.from_numpy(host)
        if device.type == "cuda":
            buffer = buffer.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            buffer = buffer.to(device)
        pieces = {}
        for dtype, section in sections.items():
            flat = buffer[offsets[dtype]:offsets[dtype] + section.nbytes]
            if dtype != np.uint8:
                flat = flat.view(_TORCH_DTYPES[dtype])
            pieces[dtype] = flat.split([part.size for part in self._parts[dtype]])
        return _Uploaded(pieces, {dtype: [part.shape for part in parts] for dtype, parts in self._parts.items()})


@dataclass
class _Uploaded:
    """The uploaded arrays as 1-D device views, and their shapes."""

    pieces: dict[np.dtype, tuple[torch.Tensor, ...]]
    shapes: dict[np.dtype, list[tuple[int, ...]]]

    def get(self, key: tuple[np.dtype, int]) -> torch.Tensor:
        """The array queued as `key`, as a device view of the buffer."""
        dtype, i = key
        piece, shape = self.pieces[dtype][i], self.shapes[dtype][i]
        return piece if len(shape) == 1 else piece.view(shape)


# ------------------------------------------------------------------------------------------------- the batch


def seed_chain_batch(chain: TensorSeedChain, items: Sequence[Item], group_bytes: int | None = None
                     ) -> list[torch.Tensor | BaseException]:
    """Each item through `chain` (see the module docstring): per item, its uint8 (H', W', C') or its exception.

    Args:
        chain: the per-film chain (its device; the fallback for the items this path does not batch).
        items: (Q16 pixels (H, W, C), Q16 alpha (H, W) or None) per film.
        group_bytes: the most bytes one tensor of a chunk or group may take (`default_group_bytes`).
    """
    group_bytes = group_bytes or default_group_bytes(chain.device)
    results: list[torch.Tensor | BaseException | None] = [None] * len(items)
    films: list[_Film] = []
    for i, (q16, alpha) in enumerate(items):
        if _batchable(q16, alpha):
            films.append(_Film(i, q16, int(q16.shape[0]), int(q16.shape[1]), int(q16.shape[2])))
        else:
            results[i] = _per_film(chain, q16, alpha)
    if films:
        _run(chain, films, results, group_bytes)
    return results  # type: ignore[return-value]


def default_group_bytes(device: torch.device) -> int:
    """`CPU_GROUP_BYTES` on a CPU, else `DEFAULT_GROUP_BYTES`."""
    return CPU_GROUP_BYTES if device.type == "cpu" else DEFAULT_GROUP_BYTES


def _batchable(q16: torch.Tensor, alpha: torch.Tensor | None) -> bool:
    """Whether the batch path takes the item: no alpha, a non-empty (H, W, 1|3) integer tensor."""
    return (alpha is None and isinstance(q16, torch.Tensor) and q16.dim() == 3 and q16.shape[2] in (1, 3)
            and q16.shape[0] > 0 and q16.shape[1] > 0 and not q16.dtype.is_floating_point
            and not q16.dtype.is_complex and q16.dtype != torch.bool)


def _per_film(chain: TensorSeedChain, q16: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor | Exception:
    """The per-film call's result, or the exception it raises."""
    try:
        return chain(q16, alpha)
    except Exception as error:  # the film's own failure is its result
        return error


def _run(chain: TensorSeedChain, films: list[_Film], results: list, group_bytes: int) -> None:
    """Stage, trim, plan and resize the batched films; writes each film's result into `results`."""
    chunks = _chunks(films, group_bytes)
    flat = _flat_buffer(chunks, chain.device)
    rows = _trim_all(chunks, flat, chain.device)
    resized, ranges = _plan(chain, [film for chunk in chunks for film in chunk.films], rows, results)
    if not resized:
        return
    groups = _groups(resized, group_bytes)
    outputs = _resize_all(groups, ranges, flat, chain.device, group_bytes)
    del flat
    flags = [_grey_flags(out, group) for group, out in zip(groups, outputs) if group.c == 3]
    grey = iter(torch.cat(flags).tolist() if flags else [])  # host sync 2, colour films only
    for group, out in zip(groups, outputs):
        for g, film in enumerate(group.films):
            channels = 1 if group.c == 1 or next(grey) else 3
            results[film.item] = _film_view(out, g, film, group, channels)


def _trim_all(chunks: list[_Chunk], flat: torch.Tensor, device: torch.device) -> list[list[int]]:
    """Stage every chunk and trim it: per film (chunk order), [top, bottom, left, right, min, max, grey]: one
    upload of the chunks' geometry, host sync 1."""
    geometry = _Pack()
    keys = [[geometry.add(array) for array in _chunk_geometry(chunk)] for chunk in chunks]
    uploaded = geometry.upload(device)
    stats = [_trim_and_range(_stage(flat, chunk), *map(uploaded.get, key))
             for chunk, key in zip(chunks, keys)]
    return torch.cat(stats).tolist()


def _plan(chain: TensorSeedChain, films: list[_Film], rows: list[list[int]], results: list
          ) -> tuple[list[_Film], dict[tuple[int, int], int]]:
    """Each film's trim, refusal or plan and level table: (the films to resize, {(min, max): table row}). A refused
    film's exception, and an out-of-range film's per-film result, go into `results`."""
    ranges: dict[tuple[int, int], int] = {}
    resized: list[_Film] = []
    for film, (top, bottom, left, right, lo, hi, grey) in zip(films, rows):
        film.box, film.grey = (top, bottom, left, right), film.c == 3 and bool(grey)
        th, tw = film.trimmed
        try:
            check_fill_aspect(tw, th)  # as the per-film chain: a sliver must not explode the resize
        except Exception as error:
            results[film.item] = error
            continue
        if lo < 0 or hi > QUANTUM:
            results[film.item] = _out_of_range(chain, film, hi)
            continue
        film.plan = fill_plan(tw, th, has_alpha=False)
        film.table = ranges.setdefault((lo, hi), len(ranges))
        resized.append(film)
    return resized, ranges


def _resize_all(groups: list[_Group], ranges: dict[tuple[int, int], int], flat: torch.Tensor,
                device: torch.device, group_bytes: int) -> list[torch.Tensor]:
    """One upload of the level, gather and tap tables; each group resized."""
    tables = _Pack()
    table_key = tables.add(np.stack([_level_table(lo, hi) for lo, hi in ranges]))
    for group in groups:
        _group_tables(group, tables, group_bytes)
    uploaded = tables.upload(device)
    # 8-bit level k -> the float64 Q16 value 257.0 k the per-film chain multiplies (exact)
    levels = uploaded.get(table_key).to(torch.float64).mul_(257.0)
    space = _Workspace(device)
    return [_resize_group(flat, levels, uploaded, group, space) for group in groups]


def _out_of_range(chain: TensorSeedChain, film: _Film, hi: int) -> torch.Tensor | Exception:
    """A film whose trimmed values leave 0..65535: whatever the per-film call gives. On a GPU a value above 65535
    would trip a device assert in its table lookup (which poisons the context), so the CPU's IndexError is raised
    here instead."""
    if hi > QUANTUM and chain.device.type != "cpu":
        return IndexError(f"index {hi} is out of bounds for dimension 0 with size {QUANTUM + 1}")
    return _per_film(chain, film.q16, None)


@lru_cache(maxsize=1024)
def _level_table(lo: int, hi: int) -> np.ndarray:
    """`levels.level_table`, cached: a batch's films share a few min/max pairs (8-bit films: often 0..65535)."""
    table = level_table(lo, hi)
    table.flags.writeable = False
    return table


# ------------------------------------------------------------------------------------------------- staging


def _chunks(films: list[_Film], budget: int) -> list[_Chunk]:
    """Films of one channel count, largest first, each into the open chunk it pads least (best fit), within
    `budget` bytes (int32) and `MAX_CHUNK_WASTE`; else into a chunk of its own."""
    chunks: list[_Chunk] = []
    for c in (1, 3):
        mine: list[_Chunk] = []
        for film in sorted((f for f in films if f.c == c), key=lambda f: f.h * f.w, reverse=True):
            best, least = None, None
            for chunk in mine:
                padded = (len(chunk.films) + 1) * max(chunk.h, film.h) * max(chunk.w, film.w)
                if 4 * c * padded <= budget and padded <= MAX_CHUNK_WASTE * (chunk.area + film.h * film.w):
                    if least is None or padded - chunk.pixels < least:
                        best, least = chunk, padded - chunk.pixels
            if best is None:
                best = _Chunk([], film.h, film.w, c)
                mine.append(best)
            best.films.append(film)
            best.h, best.w, best.area = max(best.h, film.h), max(best.w, film.w), best.area + film.h * film.w
        for chunk in mine:  # films of one shape next to each other: `_stage` pads them together
            chunk.films.sort(key=lambda f: (f.h, f.w))
        chunks += mine
    return chunks


def _flat_buffer(chunks: list[_Chunk], device: torch.device) -> torch.Tensor:
    """One uninitialised int32 buffer, the chunks one after the other; places every film.

    The tail (one of the largest chunk slabs, never written nor read) lets `_resize_group` view the buffer with
    overlapping strides whose declared sizes add up past the last film: a film's start (< the chunks' elements)
    plus an offset within a slab plus a channel."""
    start = 0
    for chunk in chunks:
        chunk.start = start
        for i, film in enumerate(chunk.films):
            film.slab, film.row = start + i * chunk.h * chunk.w * chunk.c, chunk.w * chunk.c
        start += chunk.pixels * chunk.c
    tail = max(chunk.h * chunk.w * chunk.c for chunk in chunks) + 3
    return torch.empty(start + tail, dtype=torch.int32, device=device)


def _uniform(chunk: _Chunk) -> bool:
    """Every film of the chunk fills it: the trim needs no mask."""
    return all((film.h, film.w) == (chunk.h, chunk.w) for film in chunk.films)


def _stage(flat: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """Copy the chunk's films into their slabs (as int32, as `TensorSeedChain.picture` converts them);
    returns the chunk as an (N, H, W, C) view of the flat buffer."""
    n, h, w, c = len(chunk.films), chunk.h, chunk.w, chunk.c
    region = _chunk_view(flat, chunk)
    if all(_on_device(film, flat) for film in chunk.films):
        # one copy for the chunk: the smaller films padded (the padding is never read), those of one shape
        # together when there are a few, and concatenated
        parts: list[torch.Tensor] = []
        for (fh, fw), run in itertools.groupby(chunk.films, key=lambda f: (f.h, f.w)):
            run_pixels = [film.q16 for film in run]
            pad = (0, 0, 0, w - fw, 0, h - fh)
            if (fh, fw) == (h, w):
                parts += run_pixels
            elif len(run_pixels) < 3:
                parts += [F.pad(q16, pad) for q16 in run_pixels]
            else:
                parts.append(F.pad(torch.stack(run_pixels), pad).view(-1, w, c))
        torch.cat(parts, 0, out=region.view(n * h, w, c))
    else:  # films on another device: one copy each, which moves them too
        for i, film in enumerate(chunk.films):
            region[i, :film.h, :film.w].copy_(film.q16)
    return region


def _on_device(film: _Film, flat: torch.Tensor) -> bool:
    """Whether the film's pixels are on the chain's device already (then `torch.cat` can stage them)."""
    return film.q16.device == flat.device


def _chunk_view(flat: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    """The chunk's (N, H, W, C) region of the flat buffer."""
    c = chunk.c
    return flat[chunk.start:chunk.start + chunk.pixels * c].view(len(chunk.films), chunk.h, chunk.w, c)


# ------------------------------------------------------------------------------------------------- trim and range


def _chunk_geometry(chunk: _Chunk) -> list[np.ndarray]:
    """A chunk's host tables for `_trim_and_range`: int64 (N, 9) per film: h, w, its whole-image box
    (0, h-1, 0, w-1), the chunk pixel indices of its TL, TR, BL corners; per row / per column of the chunk
    int64 (2, 1, H | W): the first-line weights H - i | W - i and the indices i; unless every film fills the
    chunk, bool (N, H, 1) and (N, 1, W): which rows and columns are the film's own."""
    films = np.zeros((len(chunk.films), 9), np.int64)
    for i, film in enumerate(chunk.films):
        base = i * chunk.h * chunk.w
        films[i] = (film.h, film.w, 0, film.h - 1, 0, film.w - 1, base, base + film.w - 1,
                    base + (film.h - 1) * chunk.w)
    lines = [np.stack([n - np.arange(n), np.arange(n)])[:, None, :] for n in (chunk.h, chunk.w)]
    if _uniform(chunk):
        return [films, *lines]
    own_rows = np.arange(chunk.h)[None, :, None] < films[:, 0, None, None]
    own_cols = np.arange(chunk.w)[None, None, :] < films[:, 1, None, None]
    return [films, *lines, own_rows, own_cols]


def _trim_and_range(x: torch.Tensor, films: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    own_rows: torch.Tensor | None = None, own_cols: torch.Tensor | None = None) -> torch.Tensor:
    """int64 (N, 7) per film of a chunk (N, H, W, C): its trim box (top, bottom, left, right) as `trim_box_tensor`
    gives it, the min and max of its pixels inside the box, and whether its channels are equal there (1 for one
    channel).

    Args:
        x: the chunk; a film fills its top-left (h, w), the rest is padding that never counts.
        films, rows, cols, own_rows, own_cols: `_chunk_geometry` on the device (no masks: every film fills the
            chunk).
    """
    n, h, w, c = x.shape
    down, across = rows[1], cols[1]  # (1, H), (1, W): the line indices
    tl, tr, bl = x.view(n * h * w, c)[films[:, 6:9].T].view(3, n, 1, 1, c).unbind(0)
    own = None if own_rows is None else own_rows & own_cols

    def differs(ref: torch.Tensor) -> torch.Tensor:
        """(N, H, W): the film's own pixels that differ from its reference colour in some channel."""
        d = x != ref
        d = d.view(n, h, w) if c == 1 else d.any(3)
        return d if own is None else d & own

    from_tl = differs(tl)
    # weighted maxima: W - (first column differing from TL), or 0 when none; the last column differing from TR,
    # or 0 when none (IM starts right and bottom at 0 and only raises them); the same down the rows
    from_left, right = (torch.stack([from_tl.any(1), differs(tr).any(1)]) * cols).amax(2)
    from_top, bottom = (torch.stack([from_tl.any(2), differs(bl).any(2)]) * rows).amax(2)
    left, top = w - from_left, h - from_top
    found = (from_left > 0) & (right >= left) & (bottom >= top)
    box = torch.where(found.unsqueeze(1), torch.stack([top, bottom, left, right], 1), films[:, 2:6])
    top, bottom, left, right = box.T.unsqueeze(2).unbind(0)  # (N, 1) each
    inside = (((down >= top) & (down <= bottom)).view(n, h, 1, 1)
              & ((across >= left) & (across <= right)).view(n, 1, w, 1))
    # outside the box, a value from inside it (its top-left, channel 0, in every channel): one pass then gives both
    # min and max, and the channels are equal there
    corner = x.view(n * h * w, c)[top * w + left + films[:, 6:7], :1].view(n, 1, 1, 1)
    filled = torch.where(inside, x, corner)
    lo, hi = filled.view(n, h * w * c).aminmax(dim=1)
    if c == 1:
        grey = torch.ones_like(lo)
    else:
        red, green, blue = filled.unbind(3)
        grey = ((red == green) & (green == blue)).all(dim=(1, 2))
    return torch.cat([box, torch.stack([lo, hi, grey.to(lo.dtype)], 1)], 1)


# ------------------------------------------------------------------------------------------------- the resize


def _groups(films: list[_Film], budget: int) -> list[_Group]:
    """Films resized with one channel count, most work first, each into the open group it grows least (best fit): the
    group's tensors within `budget` bytes (`_bytes`), its padded work within `MAX_GROUP_WASTE` times its films' own
    (padded taps and lines cost as much as real ones); else into a group of its own."""
    groups: list[_Group] = []
    for c in (1, 3):
        mine: list[tuple[_Group, tuple[int, ...], int]] = []  # (group, its dims, its films' own work)
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
                mine.append((_Group([], c, 0, 0, 0, 0), (0,) * 6, 0))
                best = len(mine) - 1
            group, dims, work = mine[best]
            group.films.append(film)
            mine[best] = (group, tuple(max(a, b) for a, b in zip(dims, own)), work + _work(own))
        for group, dims, _ in mine:
            group.s1, group.s2, group.o1, group.o2 = dims[:4]
            groups.append(group)
    return groups


def _dims(film: _Film) -> tuple[int, int, int, int, int, int]:
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
    """A group's largest float64 tensor: its input levels (G, s1, s2, C), pass 1's terms of one tap, sum and
    transpose (G, o1, s2, C), or pass 2's (G, o2, o1, C)."""
    s1, s2, o1, o2 = dims[:4]
    return 8 * c * films * max(s1 * s2, o1 * s2, o2 * o1)


def _group_tables(group: _Group, pack: _Pack, budget: int) -> None:
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
    group.blocks = [_blocks(pack, lines1, weights1, budget // (8 * n * o1 * s2 * c)),
                    _blocks(pack, lines2, weights2, budget // (8 * n * o2 * o1 * c))]


def _blocks(pack: _Pack, lines: np.ndarray, weights: np.ndarray, per_block: int) -> list[tuple[tuple, tuple, int]]:
    """Queue one pass's (T, rows) input lines and weights in blocks of `per_block` taps (at least one): per block,
    the keys of its lines (taps * rows,) and weights (taps * rows, 1), and its taps."""
    per_block = max(1, min(len(lines), per_block))
    return [(pack.add(lines[t:t + per_block].reshape(-1)), pack.add(weights[t:t + per_block].reshape(-1, 1)),
             min(per_block, len(lines) - t)) for t in range(0, len(lines), per_block)]


def _pass_tables(axes: list[tuple[int, int, _Film]], lines: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
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


class _Workspace:
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


def _resize_group(flat: torch.Tensor, levels: torch.Tensor, uploaded: _Uploaded, group: _Group,
                  space: _Workspace) -> torch.Tensor:
    """A group's films -> uint8 (G * o2, o1 * C): the fill resize of their 8-bit levels, as the per-film chain
    (`TensorSeedChain.resize_fill_512`) computes it, then v // 257; film g's (o2, o1, C) block is its picture,
    transposed when its plan went vertical first."""
    n, c, s1, s2, o1, o2 = len(group.films), group.c, group.s1, group.s2, group.o1, group.o2
    # pixel (a, b) of film g's input starts at flat element along1[g, a] + along2[g, b]: a view with overlapping
    # strides (its declared sizes reach into the buffer's tail) lets one advanced index gather every film's
    source = flat.as_strided((*group.source, c), (1, 1, 1))
    raw = torch.ops.aten.index.Tensor_out(source, list(map(uploaded.get, group.along)),
                                          out=space.get("raw", (n, s1, s2, c), torch.int32))  # Q16
    q16 = torch.ops.aten.index.Tensor_out(levels, [uploaded.get(group.table), raw],
                                          out=space.get("levels", (n, s1, s2, c)))  # float64 257.0 k
    mid = _pass(q16.view(n * s1, s2 * c), uploaded, group.blocks[0], n * o1, space)
    turned = space.get("turned", (n, s2, o1, c))
    turned.copy_(mid.view(n, o1, s2, c).permute(0, 2, 1, 3))  # the second pass's lines as rows
    out = _pass(turned.view(n * s2, o1 * c), uploaded, group.blocks[1], n * o2, space)  # (G * o2, o1 * C)
    return out.div_(257.0, rounding_mode="floor").to(torch.uint8)  # exact: out holds whole numbers


def _pass(x: torch.Tensor, uploaded: _Uploaded, blocks: list[tuple[tuple, tuple, int]], rows: int,
          space: _Workspace) -> torch.Tensor:
    """One resize pass over the rows of x (every film's input lines, one after the other) -> Q16-rounded float64
    (rows, columns) in the workspace: per block of taps one gather and one multiply, then one add a tap, in IM's
    order from 0.0 as the per-film chain sums: a separate multiply and add, as IM's build rounds twice
    (`addcmul_` may fuse them on CUDA), and never a reordered sum."""
    columns = x.shape[1]
    acc = space.get("sum", (rows, columns)).zero_()
    most = max(taps for _, _, taps in blocks)
    scratch = space.get("terms", (most * rows, columns))
    for lines, weights, taps in blocks:
        terms = scratch if taps == most else scratch[:taps * rows]
        torch.index_select(x, 0, uploaded.get(lines), out=terms).mul_(uploaded.get(weights))
        for term in terms.view(taps, rows, columns).unbind(0) if taps > 1 else (terms,):
            acc.add_(term)
    return acc.clamp_(0.0, QUANTUM).add_(0.5).floor_()  # IM's ClampToQuantum, as `tensor._round_q16`


def _grey_flags(out: torch.Tensor, group: _Group) -> torch.Tensor:
    """bool (G,): whether a colour group's film came out with all channels equal (padding is 0 in all three)."""
    red, green, blue = out.view(len(group.films), group.o2, group.o1, 3).unbind(3)
    return ((red == green) & (green == blue)).all(dim=(1, 2))


def _film_view(out: torch.Tensor, g: int, film: _Film, group: _Group, channels: int) -> torch.Tensor:
    """Film g's uint8 (out_h, out_w, channels) as a view of its group's (G, o2, o1, C) output."""
    c, o1 = group.c, group.o1
    plan = film.plan
    # the first pass's axis is o1: x when the plan went horizontal first, else y
    stride = (o1 * c, c, 1) if plan.horizontal_first else (c, o1 * c, 1)
    return out.as_strided((plan.out_h, plan.out_w, channels), stride, g * group.o2 * o1 * c)
