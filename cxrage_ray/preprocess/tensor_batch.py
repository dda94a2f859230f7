"""The tensor seed chain for a batch of films, paid per batch rather than per film (`TensorSeedChain.batch`).

In:  items (Q16 pixels (H, W, C) tensor, C in {1, 3}, any integer dtype and device; Q16 alpha (H, W) or None).
Out: per item, exactly (torch.equal) what `TensorSeedChain.__call__` returns for it, or the exception that call
     raises for it (a sliver refused by `check_fill_aspect`, a wrong shape): one bad film never costs the others.

Why: one film through `TensorSeedChain.__call__` costs ~200 aten ops for a 1024 px film, ~370 for a DICOM-sized
one (on a GPU, each about one kernel launch; the resize's tap loop is most of them) and 2-3 host syncs. Here a batch
costs ~2 ops a film, ~65 a chunk and ~40 + 1 a tap + ~4 a block of taps a group, two read-backs (one for a grey
batch) and two uploads (pinned and non-blocking on CUDA): ~6 ops a film for 32 grey 1024 px films.

The work, per batch (`seed_chain_batch`):
  stage       the films are copied into one flat int32 buffer as padded (N, H, W, C) chunks of similar size, one
              `cat` a chunk (films of one shape padded together)
  trim, range per chunk: IM's trim box (`trim_box_tensor`'s comparisons, masked to each film's own pixels), IM's
              fix-ups, the min and max inside the box, whether a colour film's channels are equal there; one
              read-back of all of it
  host        `check_fill_aspect` (a refusal is that film's result), `fill_plan`, the level tables
              (`levels.level_table`, one per distinct min/max), the gather and tap tables: one upload
  groups      films of similar work resized with one channel count (a colour film whose channels are equal with
              one, as the per-film chain does), best fit, within `group_bytes`: one advanced index through a view
              of the flat buffer with overlapping strides gathers every film's trimmed pixels, first-pass axis
              first (its rows, or its columns when its plan goes horizontal first: those come out transposed), one
              table lookup makes them int32 257 k; each pass is, per block of taps, one `index_select` and one
              multiply into float64, then one add a tap; IM's Q16 rounding; a transpose between the passes; uint8
  read-back   the colour films' "output channels all equal" flags (none for a grey batch); results are views of
              the groups' outputs
On a GPU large groups save launches (`DEFAULT_GROUP_BYTES`); on a CPU they would only fall out of the caches, and
groups stay small (`CPU_GROUP_BYTES`): the same code either way. Scratch tensors are reused from group to group.

Exact, not merely close: every output value comes from the same IEEE operations in the same order as in the
per-film chain (`TensorSeedChain._pass`): per tap one gather, one multiply and one add over the whole group (never a
fused multiply-add, never a reordered sum), taps in IM's order. The per-film taps, film by film, are padded to the
group's widest with weight 0.0 at a valid line: a Q16 value x >= 0 gives x * 0.0 = +0.0, and acc + 0.0 = acc, so a
padded tap changes at most the sign of a zero sum, which the Q16 rounding (floor(clamp(v) + 0.5)) erases. The
level tables hold 257 k as int32; pass 1's multiply promotes it to the float64 257.0 k the per-film chain multiplies
(exactly) before multiplying. An identity plan runs one tap of weight 1.0.

Taken by the per-film call instead: films with alpha (rare: 14 of the 250 sample films), items that are no
(H, W, 1|3) integer tensor, and films whose trimmed values leave 0..65535 (the per-film table lookup decides what
they give; on a GPU, values above 65535 raise an IndexError here instead of the per-film lookup's device assert).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cxrage_ray.decode.limits import check_fill_aspect
from cxrage_ray.preprocess.levels import level_table
from cxrage_ray.preprocess.quantum import QUANTUM
from cxrage_ray.preprocess.resize_weights import fill_plan
from cxrage_ray.preprocess.tensor_batch_resize import (Film, Group, Pack, Workspace, film_view, grey_flags, group_tables,
                                                         plan_groups, resize_group)



class PerFilmChain(Protocol):
    """The per-film chain the batch falls back on (`cxrage_ray.preprocess.tensor.TensorSeedChain`), named by what
    it does so that this module does not import the one that imports it."""

    device: torch.device

    def __call__(self, q16: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor: ...


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


# ------------------------------------------------------------------------------------------------- records


@dataclass(eq=False)
class Chunk:
    """Films of one channel count padded to (N, H, W, C), trimmed together."""

    films: list[Film]
    h: int
    w: int
    c: int
    area: int = 0  # the films' own pixels
    start: int = 0  # element offset in the flat buffer

    @property
    def pixels(self) -> int:
        """Its padded pixels."""
        return len(self.films) * self.h * self.w


# ------------------------------------------------------------------------------------------------- the batch


def seed_chain_batch(chain: PerFilmChain, items: Sequence[Item], group_bytes: int | None = None
                     ) -> list[torch.Tensor | BaseException]:
    """Each item through `chain` (see the module docstring): per item, its uint8 (H', W', C') or its exception.

    Args:
        chain: the per-film chain (its device; the fallback for the items this path does not batch).
        items: (Q16 pixels (H, W, C), Q16 alpha (H, W) or None) per film.
        group_bytes: the most bytes one tensor of a chunk or group may take (`default_group_bytes`).
    """
    group_bytes = group_bytes or default_group_bytes(chain.device)
    results: list[torch.Tensor | BaseException | None] = [None] * len(items)
    films: list[Film] = []
    for i, (q16, alpha) in enumerate(items):
        if _batchable(q16, alpha):
            films.append(Film(i, q16, int(q16.shape[0]), int(q16.shape[1]), int(q16.shape[2])))
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


def _per_film(chain: PerFilmChain, q16: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor | Exception:
    """The per-film call's result, or the exception it raises."""
    try:
        return chain(q16, alpha)
    except Exception as error:  # the film's own failure is its result
        return error


def _run(chain: PerFilmChain, films: list[Film], results: list, group_bytes: int) -> None:
    """Stage, trim, plan and resize the batched films; writes each film's result into `results`."""
    chunks = _chunks(films, group_bytes)
    flat = _flat_buffer(chunks, chain.device)
    rows = _trim_all(chunks, flat, chain.device)
    resized, ranges = _plan(chain, [film for chunk in chunks for film in chunk.films], rows, results)
    if not resized:
        return
    groups = plan_groups(resized, group_bytes)
    outputs = _resize_all(groups, ranges, flat, chain.device, group_bytes)
    del flat
    flags = [grey_flags(out, group) for group, out in zip(groups, outputs) if group.c == 3]
    grey = iter(torch.cat(flags).tolist() if flags else [])  # host sync 2, colour films only
    for group, out in zip(groups, outputs):
        for g, film in enumerate(group.films):
            channels = 1 if group.c == 1 or next(grey) else 3
            results[film.item] = film_view(out, g, film, group, channels)


def _trim_all(chunks: list[Chunk], flat: torch.Tensor, device: torch.device) -> list[list[int]]:
    """Stage every chunk and trim it: per film (chunk order), [top, bottom, left, right, min, max, grey]: one
    upload of the chunks' geometry, host sync 1."""
    geometry = Pack()
    keys = [[geometry.add(array) for array in _chunk_geometry(chunk)] for chunk in chunks]
    uploaded = geometry.upload(device)
    stats = [_trim_and_range(_stage(flat, chunk), *map(uploaded.get, key))
             for chunk, key in zip(chunks, keys)]
    return torch.cat(stats).tolist()


def _plan(chain: PerFilmChain, films: list[Film], rows: list[list[int]], results: list
          ) -> tuple[list[Film], dict[tuple[int, int], int]]:
    """Each film's trim, refusal or plan and level table: (the films to resize, {(min, max): table row}). A refused
    film's exception, and an out-of-range film's per-film result, go into `results`."""
    ranges: dict[tuple[int, int], int] = {}
    resized: list[Film] = []
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


def _resize_all(groups: list[Group], ranges: dict[tuple[int, int], int], flat: torch.Tensor,
                device: torch.device, group_bytes: int) -> list[torch.Tensor]:
    """One upload of the level, gather and tap tables; each group resized."""
    tables = Pack()
    table_key = tables.add(np.stack([_level_table(lo, hi) for lo, hi in ranges]))
    for group in groups:
        group_tables(group, tables, group_bytes)
    uploaded = tables.upload(device)
    # 8-bit level k -> Q16 257 k as int32: half the bytes of the float64 257.0 k the per-film chain multiplies, which
    # pass 1's multiply makes of it, exactly
    levels = uploaded.get(table_key).to(torch.int32).mul_(257)
    space = Workspace(device)
    return [resize_group(flat, levels, uploaded, group, space) for group in groups]


def _out_of_range(chain: PerFilmChain, film: Film, hi: int) -> torch.Tensor | Exception:
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


def _chunks(films: list[Film], budget: int) -> list[Chunk]:
    """Films of one channel count, largest first, each into the open chunk it pads least (best fit), within
    `budget` bytes (int32) and `MAX_CHUNK_WASTE`; else into a chunk of its own."""
    chunks: list[Chunk] = []
    for c in (1, 3):
        mine: list[Chunk] = []
        for film in sorted((f for f in films if f.c == c), key=lambda f: f.h * f.w, reverse=True):
            best, least = None, None
            for chunk in mine:
                padded = (len(chunk.films) + 1) * max(chunk.h, film.h) * max(chunk.w, film.w)
                if 4 * c * padded <= budget and padded <= MAX_CHUNK_WASTE * (chunk.area + film.h * film.w):
                    if least is None or padded - chunk.pixels < least:
                        best, least = chunk, padded - chunk.pixels
            if best is None:
                best = Chunk([], film.h, film.w, c)
                mine.append(best)
            best.films.append(film)
            best.h, best.w, best.area = max(best.h, film.h), max(best.w, film.w), best.area + film.h * film.w
        for chunk in mine:  # films of one shape next to each other: `_stage` pads them together
            chunk.films.sort(key=lambda f: (f.h, f.w))
        chunks += mine
    return chunks


def _flat_buffer(chunks: list[Chunk], device: torch.device) -> torch.Tensor:
    """One uninitialised int32 buffer, the chunks one after the other; places every film.

    The tail (one of the largest chunk slabs, never written nor read) lets `resize_group` view the buffer with
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


def _uniform(chunk: Chunk) -> bool:
    """Every film of the chunk fills it: the trim needs no mask."""
    return all((film.h, film.w) == (chunk.h, chunk.w) for film in chunk.films)


def _stage(flat: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Copy the chunk's films into their slabs (as int32, as `TensorSeedChain.picture` converts them);
    returns the chunk as an (N, H, W, C) view of the flat buffer."""
    n, h, w, c = len(chunk.films), chunk.h, chunk.w, chunk.c
    region = _chunk_view(flat, chunk)
    if all(_on_device(film, flat) for film in chunk.films) and len({film.q16.dtype for film in chunk.films}) == 1:
        # one copy for the chunk: the smaller films padded (the padding is never read), those of one shape
        # together when there are a few, and concatenated (of one dtype: torch does not promote uint16)
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
    else:  # films on another device, or of several dtypes: one copy each, which moves and converts them
        for i, film in enumerate(chunk.films):
            region[i, :film.h, :film.w].copy_(film.q16)
    return region


def _on_device(film: Film, flat: torch.Tensor) -> bool:
    """Whether the film's pixels are on the chain's device already (then `torch.cat` can stage them)."""
    return film.q16.device == flat.device


def _chunk_view(flat: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The chunk's (N, H, W, C) region of the flat buffer."""
    c = chunk.c
    return flat[chunk.start:chunk.start + chunk.pixels * c].view(len(chunk.films), chunk.h, chunk.w, c)


# ------------------------------------------------------------------------------------------------- trim and range


def _chunk_geometry(chunk: Chunk) -> list[np.ndarray]:
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


