"""The seed chain step by step against hand-computed values, and end to end against `mogrify`."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.geometry import fill_size
from cxrage_ray.decode.raster import decode_raster
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.preprocess import seed_chain as sc
from cxrage_ray.preprocess.levels import auto_level, level_table, linearize, to_depth8
from cxrage_ray.preprocess.resize import im_resize
from cxrage_ray.preprocess.resize_weights import axis_weights, fill_plan, resize_filter
from cxrage_ray.preprocess.trim import trim_box
from conftest import require_tool, run_reference
from imagegen import palette_png, pillow_bytes, radiograph, tiff_bytes

MOGRIFY_ARGS = ["-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8",
                "-resize", "512x512^", "-format", "png"]


# ------------------------------------------------------------------------------------------ steps


def test_trim_box_uses_top_left_top_right_bottom_left_corners() -> None:
    img = np.full((8, 10, 1), 100, dtype=np.uint16)
    img[2:6, 3:7] = 500  # content
    img[7, 9] = 999  # bottom-right corner differs: never a reference, but it is content vs TL/TR/BL
    # TR and BL equal TL here, so the BR pixel extends right (col 9) and bottom (row 7)
    assert trim_box(img) == (2, 7, 3, 9)
    img[7, 9] = 100
    assert trim_box(img) == (2, 5, 3, 6)


def test_trim_compares_against_each_corner_colour() -> None:
    img = np.zeros((6, 6, 1), dtype=np.uint16)
    img[:, 5] = 7  # right column (includes TR) a different colour
    img[2:4, 2:4] = 300
    # left/top: first col/row != TL (0); right: last col != TR (7); bottom: last row != BL (0)
    top, bottom, left, right = trim_box(img)
    assert (left, right) == (2, 4)  # the all-7 right column matches TR, column 4 does not
    assert top == 0  # row 0 holds the 7 at column 5, which differs from TL
    assert bottom == 5  # every row has 7 != BL (0) at col 5


def test_trim_has_no_tolerance_and_alpha_counts() -> None:
    img = np.zeros((5, 5, 1), dtype=np.uint16)
    img[0, 2] = 1  # one barely-different border pixel stops the trim at row 0
    assert trim_box(img)[0] == 0
    flat = np.zeros((5, 5, 1), dtype=np.uint16)
    alpha = np.full((5, 5), 65535, dtype=np.uint16)
    alpha[1:3, 1:3] = 0
    assert trim_box(flat, alpha) == (1, 2, 1, 2)
    assert trim_box(flat) == (0, 4, 0, 4)  # uniform: kept whole


def test_linearize_matches_the_srgb_formula() -> None:
    for v in (0, 1, 2650, 2651, 32768, 50000, 65535):
        u = v / 65535
        g = u / 12.92 if u <= 0.0404482362771076 else ((u + 0.055) / 1.055) ** 2.4
        assert int(linearize(np.array([v], dtype=np.uint16))[0]) == math.floor(65535 * g + 0.5)


def test_auto_level_is_one_range_over_all_channels() -> None:
    px = np.array([[[1000, 3000, 2000], [2000, 5000, 1500]]], dtype=np.uint16)
    out = auto_level(px)
    scale = 1.0 / 4000
    expect = [[[math.floor(65535 * (scale * (v - 1000)) + 0.5) for v in p] for p in row] for row in px.tolist()]
    assert out.tolist() == expect
    assert out[0, 0, 0] == 0 and out[0, 1, 1] == 65535 and out[0, 0, 1] != 0  # green not stretched alone


def test_depth8_truncates() -> None:
    v = np.array([0, 256, 257, 513, 514, 65534, 65535], dtype=np.uint16)
    assert to_depth8(v).tolist() == [0, 0, 257, 257, 514, 65278, 65535]


def test_level_table_is_the_composition_of_the_three_steps() -> None:
    lo, hi = 5000, 60000
    v = np.arange(0, 65536, 7, dtype=np.uint16)
    lin = linearize(v)
    expect = to_depth8(auto_level(lin, int(linearize(np.uint16(lo))), int(linearize(np.uint16(hi)))))
    assert np.array_equal(level_table(lo, hi)[v].astype(np.uint32) * 257, expect)


def _sinc(x: float) -> float:
    return 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)


def _mitchell(x: float) -> float:
    b = c = 1 / 3
    x = abs(x)
    if x < 1:
        return ((12 - 9 * b - 6 * c) * x**3 + (-18 + 12 * b + 6 * c) * x**2 + (6 - 2 * b)) / 6
    if x < 2:
        return ((-b - 6 * c) * x**3 + (6 * b + 30 * c) * x**2 + (-12 * b - 48 * c) * x + (8 * b + 24 * c)) / 6
    return 0.0


def test_lanczos_weight_row_by_hand() -> None:
    aw = axis_weights(10, 5, "lanczos")  # f = 0.5: scale 2, support 6
    # output 2: centre c = 2.5/0.5 = 5, taps 0..9, w_j = L((j - 5 + 0.5)/2)
    raw = [_sinc((j - 4.5) / 2) * _sinc((j - 4.5) / 6) for j in range(10)]
    expect = [w / sum(raw) for w in raw]
    assert aw.starts[2] == 0 and aw.counts[2] == 10
    np.testing.assert_allclose(aw.weights[2, :10], expect, rtol=1e-6, atol=1e-8)  # SincFast ~ 2e-8


def test_mitchell_weight_row_by_hand() -> None:
    aw = axis_weights(4, 8, "mitchell")  # f = 2: scale 1, support 2
    # output 3: c = 3.5/2 = 1.75, start int(0.25) = 0, stop min(int(4.25), 4) = 4, w_j = M(j - 1.25)
    raw = [_mitchell(j - 1.25) for j in range(4)]
    assert (aw.starts[3], aw.counts[3]) == (0, 4)
    np.testing.assert_allclose(aw.weights[3, :4], [w / sum(raw) for w in raw], rtol=1e-9)  # IM's coefficients


def test_fill_geometry_and_filter_choice() -> None:
    assert fill_size(1000, 2000) == (512, 1024)
    assert fill_size(300, 200) == (768, 512)
    assert fill_size(2048, 2048) == (512, 512)
    assert resize_filter(1000, 800, 640, 512, has_alpha=False) == "lanczos"
    assert resize_filter(300, 200, 768, 512, has_alpha=False) == "mitchell"
    assert resize_filter(1000, 800, 640, 512, has_alpha=True) == "mitchell"
    plan = fill_plan(300, 200, has_alpha=False)  # the plan the numpy and torch resizes both follow
    assert (plan.out_w, plan.out_h, plan.filter, plan.identity) == (768, 512, "mitchell", False)
    assert not plan.horizontal_first and fill_plan(1200, 512, has_alpha=False).identity


def test_tap_index_is_the_start_plus_tap_clipped_to_the_input() -> None:
    aw = axis_weights(37, 11, "lanczos")
    taps = np.arange(aw.weights.shape[1])
    assert np.array_equal(aw.index, np.minimum(aw.starts[:, None] + taps, 36))
    assert (aw.weights[taps[None, :] >= aw.counts[:, None]] == 0).all()  # the clipped taps weigh nothing


def test_im_resize_flat_stays_flat_and_same_size_is_a_copy() -> None:
    flat = np.full((40, 30, 1), 12345, dtype=np.uint16)
    out, _ = im_resize(flat, 17, 23)
    assert out.shape == (23, 17, 1) and (out == 12345).all()
    same, _ = im_resize(flat, 30, 40)
    assert np.array_equal(same, flat)


def test_seed_chain_shapes_and_grey_collapse() -> None:
    grey = radiograph(700, 600, border=10)
    rgb_grey = np.repeat(grey[:, :, None], 3, axis=2)
    a = sc.seed_chain(DecodedImage(pixels=grey[:, :, None].astype(np.uint16) * 257))
    b = sc.seed_chain(DecodedImage(pixels=rgb_grey.astype(np.uint16) * 257))
    assert a.dtype == np.uint8 and a.shape[2] == 1 and min(a.shape[:2]) == 512
    assert np.array_equal(a, b)  # an RGB image with equal channels is a grey result
    assert a.min() == 0 and a.max() > 200  # auto-level stretched (the resize smooths the extremes)
    png = sc.seed_chain_png(DecodedImage(pixels=grey[:, :, None].astype(np.uint16) * 257))
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), a[:, :, 0])


# ------------------------------------------------------------------------------ against mogrify


def _read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGBA"))
    return arr if (arr[:, :, 3] < 255).any() else arr[:, :, :3]


def _mogrify_all(files: list[Path], out: Path) -> None:
    out.mkdir()
    run_reference([require_tool("mogrify"), "-path", str(out), *MOGRIFY_ARGS, *map(str, files)])


def _assert_same_as_mogrify(files: list[Path], tmp_path: Path) -> None:
    _mogrify_all(files, tmp_path / "im")
    for f in files:
        ours = _read_png(sc.seed_chain_png(decode_raster(f.read_bytes(), DecodeOptions())))
        ref = _read_png((tmp_path / "im" / (f.stem + ".png")).read_bytes())
        assert ours.shape == ref.shape, f.name
        assert np.array_equal(ours, ref), f"{f.name}: {(ours != ref).sum()} pixels differ"


def test_generated_inputs_match_mogrify(tmp_path: Path) -> None:
    require_tool("mogrify")
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    g16 = radiograph(760, 620, seed=1, border=25, border_value=0, dtype=np.uint16)
    g16[-25:, :] = 40000  # bottom border another colour than the top-left one
    (src / "grey16_border.tif").write_bytes(tiff_bytes(g16, photometric="minisblack"))
    rgb = np.stack([radiograph(640, 900, seed=2) // 4 + 10, radiograph(640, 900, seed=3),
                    radiograph(640, 900, seed=4) // 2 + 100], axis=2).astype(np.uint8)
    (src / "rgb_ranges.png").write_bytes(pillow_bytes(rgb, "PNG"))
    (src / "small_landscape.png").write_bytes(pillow_bytes(radiograph(201, 333, seed=5, border=6, border_value=255),
                                                           "PNG"))
    (src / "wide_rgb.png").write_bytes(pillow_bytes(np.repeat(radiograph(600, 1100, seed=6)[:, :, None], 3, 2)
                                                    + rng.integers(0, 2, (600, 1100, 3), dtype=np.uint8), "PNG"))
    (src / "palette.png").write_bytes(palette_png(600, 520, seed=7))
    rgba = np.dstack([np.repeat(radiograph(560, 600, seed=8)[:, :, None], 3, 2),
                      np.full((560, 600), 255, np.uint8)])
    (src / "rgba_opaque.png").write_bytes(pillow_bytes(rgba, "PNG"))
    rgba_t = rgba.copy()
    rgba_t[:80, :, 3] = rng.integers(0, 256, (80, 600), dtype=np.uint8)
    (src / "rgba_translucent.png").write_bytes(pillow_bytes(rgba_t, "PNG"))
    (src / "grey.jpg").write_bytes(pillow_bytes(radiograph(800, 640, seed=9), "JPEG", quality=85))
    (src / "upscale_grey16.png").write_bytes(pillow_bytes(radiograph(300, 410, seed=10, dtype=np.uint16),
                                                          "PNG", mode="I;16"))
    _assert_same_as_mogrify(sorted(src.iterdir()), tmp_path)


def _real_sample(cxr_sample: Path) -> list[Path]:
    """~10 real radiographs: the smallest few of each (format, mode) group plus the RGBA with holes."""
    import csv

    rows = list(csv.DictReader((cxr_sample / "metadata.csv").open()))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["format"], r["mode"]), []).append(r)
    picked = []
    for rs in groups.values():
        rs.sort(key=lambda r: int(r["width"]) * int(r["height"]))
        picked += [rs[0]["file"], rs[len(rs) // 2]["file"]]
    picked.append("images/ieee_pneumocystis-pneumonia-2-L.png")  # alpha with transparent pixels
    return [cxr_sample / p for p in dict.fromkeys(picked) if (cxr_sample / p).exists()]


def test_real_radiographs_match_mogrify(cxr_sample: Path, tmp_path: Path) -> None:
    require_tool("mogrify")
    files = _real_sample(cxr_sample)
    assert len(files) >= 8
    _assert_same_as_mogrify(files, tmp_path)
