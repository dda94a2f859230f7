"""`TensorSeedChain.batch` (cxrage_ray/preprocess/tensor_batch.py) against the per-film call, run on the CPU: every
sample film, the real DICOMs, a batch mixing good and bad films, and what a batch costs in aten ops and host syncs
(counted with tests/dispatch_counts.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cxrage_ray.preprocess.tensor_batch as tensor_batch
from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.dicom import decode_stored_frame
from cxrage_ray.decode.image import decode_image
from cxrage_ray.errors import CxrAgeError, DecompressionBombError
from cxrage_ray.preprocess.resize_weights import fill_plan
from cxrage_ray.preprocess.tensor import TensorSeedChain, dicom_q16_tensor
from cxrage_ray.preprocess.tensor_batch import DEFAULT_GROUP_BYTES
from dispatch_counts import DispatchCounts, count_dispatch
from imagegen import radiograph

ANY = DecodeOptions(allow_any_modality=True)
Item = tuple[torch.Tensor, "torch.Tensor | None"]
#: The targets for a batch without alpha: aten ops per film (views and allocations included), host read-backs,
#: and read-backs plus uploads (an upload counted as a sync, as a blocking one would be; the batch's are pinned
#: and non-blocking on CUDA).
MAX_OPS_PER_FILM, MAX_READ_BACKS, MAX_SYNCS = 8, 2, 4


def assert_same(got: torch.Tensor | BaseException, item: Item, chain: TensorSeedChain, name: str) -> None:
    """`got` is exactly what `chain(*item)` gives: the same tensor (torch.equal, dtype), or the same exception."""
    try:
        want = chain(*item)
    except Exception as error:
        assert isinstance(got, BaseException), f"{name}: batch gave a picture, the per-film call raised {error!r}"
        assert (type(got), str(got)) == (type(error), str(error)), name
        return
    assert isinstance(got, torch.Tensor), f"{name}: batch gave {got!r}"
    assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.slow
def test_every_sample_film_through_the_batch_is_the_per_film_call(cxr_sample: Path) -> None:
    """All 250 films (alpha ones included) in batches of 32, with the CPU's small groups (several a batch): film
    for film, the per-film call's picture (which test_tensor.py finds identical to the exact chain's for all 250).
    ~1 min on 2 quiet cores: the decode ~6 s, the batches ~25 s, the per-film calls ~23 s."""
    chain = TensorSeedChain()
    films = sorted((cxr_sample / "images").iterdir())
    assert len(films) == 250
    for start in range(0, len(films), 32):
        decoded = [decode_image(film.read_bytes(), film.name) for film in films[start:start + 32]]
        # uint16 as decoded (half the memory of int32; both chains convert it as they stage it)
        items = [(torch.from_numpy(d.q16()), None if d.alpha is None else torch.from_numpy(d.alpha)) for d in decoded]
        out = chain.batch(items)
        assert len(out) == len(items)
        for film, item, got in zip(films[start:], items, out):
            assert_same(got, item, chain, film.name)


@pytest.mark.slow
def test_real_dicoms_chain_like_the_per_film_call(dicom_sample: Path) -> None:
    """The decodable real DICOMs (as `test_real_dicoms_map_and_chain_like_the_exact_path` maps them), one batch."""
    items, names = [], []
    for path in sorted(p for p in dicom_sample.rglob("*") if p.is_file() and p.suffix != ".csv"):
        data = path.read_bytes()
        try:
            decode_image(data, path.name, ANY)
        except CxrAgeError:
            continue  # the corrupt files: their refusal is the exact path's business
        frame, params = decode_stored_frame(data, ANY)
        items.append((dicom_q16_tensor(torch.from_numpy(frame.astype(np.int32)), params), None))
        names.append(path.name)
    assert len(items) >= 20
    chain = TensorSeedChain()
    for name, item, got in zip(names, items, chain.batch(items)):
        assert_same(got, item, chain, name)


def grey(h: int, w: int, seed: int, border: int = 0, border_value: int = 0) -> torch.Tensor:
    """A synthetic Q16 radiograph (h, w, 1) int32 (8-bit levels v as 257 v)."""
    return torch.from_numpy(radiograph(h, w, seed, border, border_value).astype(np.int32)[:, :, None] * 257)


def mixed_items() -> list[Item]:
    """Good films of several sizes and kinds, and the films the batch must not let spoil the others."""
    rng = np.random.default_rng(7)
    colour = np.stack([radiograph(300, 380, 3), radiograph(300, 380, 4), radiograph(300, 380, 5)], 2)
    rgba = torch.from_numpy(colour.astype(np.int32) * 257)
    alpha = torch.full((300, 380), 65535, dtype=torch.int32)
    alpha[100:150, 40:90] = 20000
    hot = grey(200, 260, 8)
    hot[50, 60, 0] = 70000  # beyond Q16: the per-film table lookup raises
    assert fill_plan(700, 512, has_alpha=False).identity
    return [
        (grey(700, 540, 1, border=9, border_value=3), None),  # vertical first
        (grey(540, 700, 2, border=4, border_value=250), None),  # horizontal first
        (torch.from_numpy(rng.integers(0, 65536, (1, 4000, 1)).astype(np.int32)), None),  # a sliver: refused
        (grey(1030, 1024, 3, border=3), None),  # shrinks, Lanczos
        (rgba, alpha),  # alpha: the per-film call
        (torch.from_numpy(colour.astype(np.int32) * 257), None),  # colour
        (grey(330, 280, 5).expand(330, 280, 3), None),  # grey stored as colour (a strided view, too)
        (torch.full((90, 120, 1), 4242, dtype=torch.int32), None),  # constant: nothing to trim
        (grey(512, 700, 6), None),  # already 512 on its short side: the identity plan
        (grey(200, 130, 7).to(torch.int64), None),  # enlarges, Mitchell; int64 pixels
        (grey(20, 30, 9).squeeze(2), None),  # no channel axis: the per-film ValueError
        (hot, None),  # out of range: whatever the per-film call does
        (grey(250, 240, 10, border=2).to(torch.int16).abs(), None),  # small, int16
        (grey(250, 240, 11, border=2).to(torch.uint16), None),  # uint16, which torch does not promote with int16
    ]


@pytest.mark.parametrize("group_bytes", [DEFAULT_GROUP_BYTES, None, 1 << 20])
def test_a_mixed_batch_gives_each_film_its_per_film_result(group_bytes: int | None) -> None:
    """One result per item, in order: the per-film picture, or the per-film exception in its place: with a GPU's
    groups, a CPU's, and 1 MB ones (a group, a chunk and a block of one tap for nearly every film)."""
    chain = TensorSeedChain()
    items = mixed_items()
    out = chain.batch(items, group_bytes=group_bytes)
    assert len(out) == len(items)
    assert isinstance(out[2], DecompressionBombError)
    assert isinstance(out[10], ValueError) and isinstance(out[11], IndexError)
    for k, (item, got) in enumerate(zip(items, out)):
        assert_same(got, item, chain, f"item {k}")
    assert out[7].shape[2] == 1 and out[6].shape[2] == 1 and out[5].shape[2] == 3


def test_films_on_another_device_are_staged_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy-per-film staging (films not on the chain's device yet) gives the same pictures as `torch.cat`'s."""
    monkeypatch.setattr(tensor_batch, "_on_device", lambda film, flat: False)
    chain = TensorSeedChain()
    items = [item for item in mixed_items() if item[1] is None][:8]
    for k, (item, got) in enumerate(zip(items, chain.batch(items))):
        assert_same(got, item, chain, f"item {k}")


# ----------------------------------------------------------------------------------------------- what it costs


def nih_like(n: int) -> list[Item]:
    """n grey 1024 x 1024 films as the NIH PNGs are, borders of several widths (so trims and plans differ)."""
    return [(grey(1024, 1024, k, border=(5 * k) % 23, border_value=(3 * k) % 40), None) for k in range(n)]


#: DICOM-like shapes (rows, columns), at 0.4 of their size: a CPU test's time (the taps per pass, which set the
#: ops per group, shrink with them; the full sizes are measured in the module's report).
SHAPES = [(3000, 2500), (2500, 2048), (2140, 1760), (2048, 2048), (2880, 2360), (1760, 1500), (2992, 2992),
          (2600, 2100)]


def mixed_sizes(n: int, scale: float = 0.4) -> list[Item]:
    """n grey films cycling through `SHAPES`, each with its own border."""
    items = []
    for k in range(n):
        h, w = (int(v * scale) for v in SHAPES[k % len(SHAPES)])
        items.append((grey(h, w, k, border=(7 * k) % 23, border_value=(13 * k) % 50), None))
    return items


def counted(chain: TensorSeedChain, items: list[Item]) -> DispatchCounts:
    """What `chain.batch(items)` dispatches, its host caches (tap tables) warm, as a running actor has them."""
    chain.batch(items[:2])
    with count_dispatch() as counts:
        chain.batch(items)
    return counts


def test_a_batch_of_1024_films_costs_ops_per_batch_not_per_film() -> None:
    """32 grey 1024 x 1024 films: at most `MAX_OPS_PER_FILM` aten ops a film for the whole chain, at most two
    read-backs, and read-backs + uploads within `MAX_SYNCS`; 8 films cost much more than a quarter of that
    (the work is per batch). Counted with a GPU's groups (`DEFAULT_GROUP_BYTES`). The per-film loop, for scale:
    ~200 ops and 2 read-backs + 1 upload a film."""
    chain = TensorSeedChain(group_bytes=DEFAULT_GROUP_BYTES)
    items = nih_like(32)
    small, large = counted(chain, items[:8]), counted(chain, items)
    assert large.total_ops / 32 <= MAX_OPS_PER_FILM, large.ops.most_common(12)
    assert large.total_ops < 2 * small.total_ops  # 4x the films, less than 2x the ops
    for counts in (small, large):
        assert counts.total_syncs <= MAX_READ_BACKS, counts.syncs
        assert counts.total_syncs + counts.uploads <= MAX_SYNCS, (counts.syncs, counts.uploads)
        assert counts.syncs["_local_scalar_dense"] == 0  # no .item() / int() / bool() on a device value
    with count_dispatch() as loop:
        [chain(*item) for item in items[:8]]
    assert loop.total_ops / 8 > 10 * large.total_ops / 32
    assert loop.total_syncs >= 2 * 8


def test_a_batch_of_mixed_sizes_costs_ops_per_batch_not_per_film() -> None:
    """32 grey films of eight DICOM-like shapes (several groups): the same sync bounds; the ops per film are not
    within `MAX_OPS_PER_FILM` at 32 films of eight shapes (~11 here; ~19 at the full sizes, whose taps are more, with
    1 GiB groups; 9.5 for 128 full-size films, 6.4 with 2 GiB groups), but they fall with the films."""
    chain = TensorSeedChain(group_bytes=DEFAULT_GROUP_BYTES)
    items = mixed_sizes(32)
    small, large = counted(chain, items[:8]), counted(chain, items)
    assert large.total_ops / 32 <= 1.5 * MAX_OPS_PER_FILM, large.ops.most_common(12)
    assert large.total_ops < 2 * small.total_ops
    for counts in (small, large):
        assert counts.total_syncs <= MAX_READ_BACKS, counts.syncs
        assert counts.total_syncs + counts.uploads <= MAX_SYNCS, (counts.syncs, counts.uploads)
        assert counts.syncs["_local_scalar_dense"] == 0


def test_a_colour_batch_reads_back_twice_and_a_grey_one_once() -> None:
    """The second read-back (are a colour film's output channels all equal?) is paid only by batches with colour
    films; a grey film stored as colour is resized as one channel (as the per-film chain does) and pays none."""
    chain = TensorSeedChain(group_bytes=DEFAULT_GROUP_BYTES)
    colour = [(torch.cat([grey(200, 260, k + j) for j in (0, 10, 20)], 2), None) for k in range(3)]
    grey_as_colour = [(grey(200, 260, k).expand(200, 260, 3).contiguous(), None) for k in range(3)]
    assert counted(chain, nih_like(2) + colour).syncs["tolist"] == 2
    assert counted(chain, nih_like(2) + grey_as_colour).syncs["tolist"] == 1
    assert counted(chain, nih_like(3)).syncs["tolist"] == 1
