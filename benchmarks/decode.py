"""DICOM decode cost, exact vs fast, per transfer syntax, and how far the model's raw output moves.

Real chest films from ../shared/data/cxr-sample are upscaled (Lanczos) to a short side of `--side`
px (real archive films are 2-3k px), stored as 12-bit MONOCHROME2 DICOM in a temp dir in each
transfer syntax, then decoded with `decode_dicom` in both modes. Each decoded image goes through the
seed chain, the fastai centre + TTA views and CXR-Age with fixed random weights; the table reports the
speedup and max |raw_exact - raw_fast| over the films (the final TTA-combined raw output).

Run:  python benchmarks/decode.py [--n 20] [--side 2048]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import dicomgen  # noqa: E402

from cxrage_ray.decode import DecodedImage, DecodeOptions  # noqa: E402
from cxrage_ray.decode.dicom import decode_dicom  # noqa: E402

SYNTAXES = {
    "J2K lossless": JPEG2000Lossless,
    "J2K lossy 20:1": JPEG2000,
    "JPEG baseline": JPEGBaseline8Bit,
    "RLE": RLELossless,
    "uncompressed": ExplicitVRLittleEndian,
}


def films(n: int, side: int) -> list[np.ndarray]:
    """First n sample radiographs as 8-bit greys upscaled to short side `side`."""
    images = sorted((REPO.parent / "shared" / "data" / "cxr-sample" / "images").iterdir())[:n]
    out = []
    for path in images:
        with Image.open(path) as im:
            grey = im.convert("L")
            scale = side / min(grey.size)
            out.append(np.asarray(grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.LANCZOS)))
    return out


def encode(grey8: np.ndarray, syntax: str) -> bytes:
    if syntax == JPEGBaseline8Bit:
        return dicomgen.jpeg_baseline(grey8, quality=92, modality="DX")
    v12 = (grey8.astype(np.uint16) << 4) | (grey8.astype(np.uint16) >> 4)  # fill 12 bits
    ds = dicomgen.make_dataset(v12, bits_stored=12)
    if syntax == ExplicitVRLittleEndian:
        return dicomgen.to_bytes(ds)
    if syntax == JPEG2000:
        return dicomgen.compressed(ds, syntax, j2k_cr=[20])
    return dicomgen.compressed(ds, syntax)


def seed_chain_fn():
    """The project's ImageMagick-exact seed chain, or a stand-in when it is not in this checkout."""
    try:
        from cxrage_ray.preprocess.seed_chain import seed_chain

        return seed_chain, "seed_chain"
    except ImportError:

        def approx(image: DecodedImage) -> np.ndarray:  # auto-level + Lanczos to 512^ (no trim)
            g = image.pixels[..., 0].astype(np.float64)
            g = (g - g.min()) * 255.0 / max(g.max() - g.min(), 1.0)
            im = Image.fromarray(np.round(g).astype(np.uint8))
            scale = 512 / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            return np.asarray(im)[..., None].repeat(3, axis=2)

        return approx, "STAND-IN (auto-level + PIL Lanczos; seed_chain.py not present)"


def model_fn():
    from cxrage_ray.model import build_model
    from cxrage_ray.preprocess.fastai import combine_tta, tta_views

    try:
        from checkpoints import random_state_dict  # tests/checkpoints.py

        state, source = random_state_dict(0), "tests/checkpoints.random_state_dict(0)"
    except ImportError:
        from cxrage_ray.demo import demo_state_dict

        state, source = demo_state_dict(0), "cxrage_ray.demo.demo_state_dict(0)"
    model = build_model(state).eval()

    def raw(image_u8: np.ndarray) -> float:
        with torch.no_grad():
            out = model(tta_views(image_u8, "seed"))[:, 0][None]
            return float(combine_tta(out)[0][0])

    return raw, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--no-model", action="store_true", help="timing only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chain, chain_name = seed_chain_fn()
    raw, weights = (None, "-") if args.no_model else model_fn()
    greys = films(args.n, args.side)
    print(f"{len(greys)} films, short side {args.side}px; preprocessing: {chain_name}; weights: {weights}")
    print(f"{'syntax':16s} {'exact s/img':>11s} {'fast s/img':>10s} {'speedup':>8s} {'fast size':>11s} {'max|Δraw|':>10s}")
    with tempfile.TemporaryDirectory():
        for label, syntax in SYNTAXES.items():
            files = [encode(g, syntax) for g in greys]
            t_exact, t_fast, deltas, size = [], [], [], ""
            for data in files:
                t0 = time.perf_counter()
                exact = decode_dicom(data, DecodeOptions(mode="exact"))
                t1 = time.perf_counter()
                fast = decode_dicom(data, DecodeOptions(mode="fast"))
                t2 = time.perf_counter()
                t_exact.append(t1 - t0)
                t_fast.append(t2 - t1)
                size = "x".join(map(str, fast.pixels.shape[:2]))
                if raw is not None:
                    deltas.append(abs(raw(chain(copy.copy(exact))) - raw(chain(copy.copy(fast)))))
            me, mf = statistics.mean(t_exact), statistics.mean(t_fast)
            delta = f"{max(deltas):.5f}" if deltas else "-"
            print(f"{label:16s} {me:11.3f} {mf:10.3f} {me / mf:7.2f}x {size:>11s} {delta:>10s}", flush=True)


if __name__ == "__main__":
    main()
