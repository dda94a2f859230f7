"""Train the orientation classifier (rotation 0/90/180/270 + frontal/lateral) on CPU, write its weights + card.

In:  the real radiographs of `cxr-sample` (metadata.csv: `file`, `view` PA/AP/AP Supine/L, `patient_id`),
     each passed through the seed chain once (cached in a temp dir, never in the repo).
Out: `weights/orientation.safetensors` (float32, < 1 MB, metadata: architecture, data, validation figures) and
     the figures in `weights/ORIENTATION_MODEL_CARD.md`; validation accuracy printed.

Method: synthetic quarter turns of every film (labels for free), small affine jitter / flips / zoom-crops /
gamma-contrast-noise on 64 px thumbnails, lateral films oversampled; patient-disjoint validation split; fixed
seeds; no pretrained weights. Validation runs the shipped `OrientationClassifier` on the full-size seed-chain
pictures turned with `np.rot90`, exactly the path `cxrage score` takes.

    python jobs/train_rotation.py --data ../shared/data/cxr-sample
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # thumbnail side: orientation is a coarse, whole-film property
STEPS = 1500  # loss plateaus by ~600 steps; ~2-4 min on a busy CPU
BATCH = 64
LATERAL_SHARE = 0.3  # oversample the 22 lateral films to ~30% of each batch
VAL_FRACTION = 0.25
SEED = 0
MOGRIFY_ARGS = ["-trim", "+repage", "-colorspace", "RGB", "-auto-level", "-depth", "8", "-resize", "512x512^"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=shared / "data" / "cxr-sample", help="cxr-sample folder")
    parser.add_argument("--out", type=Path, default=REPO / "weights" / "orientation.safetensors")
    parser.add_argument("--card", type=Path, default=REPO / "weights" / "ORIENTATION_MODEL_CARD.md")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cxrage-orient-cache")
    parser.add_argument(
        "--chain",
        choices=["auto", "python", "mogrify", "pil"],
        default="auto",
        help="seed chain for the training pictures: auto = cxrage_ray.preprocess.seed_chain when importable, "
        "else ImageMagick mogrify (the reference it reproduces), else a PIL approximation (development only)",
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, busy CPU)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- seed chain


def pick_chain(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        from cxrage_ray.preprocess.seed_chain import seed_chain  # noqa: F401

        return "python"
    except ImportError:
        pass
    return "mogrify" if shutil.which("mogrify") else "pil"


def pil_chain(path: Path) -> np.ndarray:
    """Development stand-in for the seed chain: linearise, global auto-level, 8 bit, Lanczos short side 512."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if im.mode in ("RGB", "RGBA", "P") else "L")
        q = np.asarray(im, dtype=np.float64) / 255.0
    q = np.where(q <= 0.0404482362771076, q / 12.92, ((q + 0.055) / 1.055) ** 2.4)
    q = (q - q.min()) / max(q.max() - q.min(), 1e-12)
    u8 = np.floor(np.round(q * 65535) / 257).astype(np.uint8)
    h, w = u8.shape[:2]
    s = 512 / min(h, w)
    out = Image.fromarray(u8).resize((int(w * s + 0.5), int(h * s + 0.5)), Image.Resampling.LANCZOS)
    return np.asarray(out)


def python_chain(path: Path) -> np.ndarray:
    from cxrage_ray.decode import decode_image
    from cxrage_ray.preprocess.seed_chain import seed_chain

    return np.asarray(seed_chain(decode_image(path.read_bytes(), path.name)))


def seed_chain_pictures(data: Path, files: list[str], chain: str, cache: Path) -> list[np.ndarray]:
    """Each file's seed-chain picture (uint8 (H, W[, C])), computed once and cached as PNG under `cache/chain`."""
    from PIL import Image

    folder = cache / chain
    folder.mkdir(parents=True, exist_ok=True)
    keys = [hashlib.sha256((data / f).read_bytes()).hexdigest()[:32] for f in files]
    missing = [(f, k) for f, k in zip(files, keys) if not (folder / f"{k}.png").exists()]
    if missing:
        print(f"seed chain ({chain}) for {len(missing)} files -> {folder}", flush=True)
    if missing and chain == "mogrify":
        with tempfile.TemporaryDirectory() as tmp:
            links = []
            for f, k in missing:  # name inputs by content hash so outputs are <hash>.png
                link = Path(tmp) / f"{k}{Path(f).suffix.lower()}"
                link.symlink_to((data / f).resolve())
                links.append(str(link))
            subprocess.run(["mogrify", "-path", str(folder), *MOGRIFY_ARGS, "-format", "png", *links], check=True)
    else:
        for f, k in missing:
            picture = python_chain(data / f) if chain == "python" else pil_chain(data / f)
            picture = picture[:, :, 0] if picture.ndim == 3 and picture.shape[2] == 1 else picture
            Image.fromarray(picture).save(folder / f"{k}.png")
    pictures = []
    for k in keys:
        with Image.open(folder / f"{k}.png") as im:
            pictures.append(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))
    return pictures


# ------------------------------------------------------------------------------------------- data + split


def patient_split(patients: np.ndarray, lateral: np.ndarray, seed: int) -> np.ndarray:
    """Boolean validation mask; whole patients go to one side, stratified by 'has a lateral film'."""
    rng = np.random.default_rng(seed)
    with_lateral = sorted({p for p, lat in zip(patients, lateral) if lat})
    without = sorted(set(patients) - set(with_lateral))
    val: set[str] = set()
    for group in (with_lateral, without):
        order = rng.permutation(len(group))
        val |= {group[i] for i in order[: round(VAL_FRACTION * len(group))]}
    return np.array([p in val for p in patients])


def augment(x, rng_torch):
    """(B, 1, S, S) thumbnails in 0..255 -> jittered thumbnails (affine, flip, zoom/crop, gamma, contrast, noise)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    u = lambda lo, hi: torch.empty(b).uniform_(lo, hi, generator=rng_torch)  # noqa: E731
    x = (x / 255.0).clamp(0, 1) ** torch.exp(u(-0.5, 0.5)).view(b, 1, 1, 1)
    x = (x - 0.5) * u(0.75, 1.3).view(b, 1, 1, 1) + 0.5 + u(-0.1, 0.1).view(b, 1, 1, 1)
    angle = u(-12, 12) * np.pi / 180
    flip = torch.where(torch.rand(b, generator=rng_torch) < 0.5, -1.0, 1.0)
    sx, sy = u(0.8, 1.15) * flip, u(0.8, 1.15)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sx * torch.cos(angle), -sy * torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = sx * torch.sin(angle), sy * torch.cos(angle)
    theta[:, 0, 2], theta[:, 1, 2] = u(-0.1, 0.1), u(-0.1, 0.1)
    keep = torch.rand(b, generator=rng_torch) < 0.2  # some samples exactly as inference sees them
    theta[keep] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + 0.02 * torch.randn(x.shape, generator=rng_torch)
    return x.clamp(0, 1) * 255.0


def train(thumbs: np.ndarray, lateral: np.ndarray, steps: int, seed: int):
    """Train `build_network()` on thumbnails (N, S, S) 0..255; returns the network in eval mode."""
    import torch
    import torch.nn.functional as F

    from cxrage_ray.orient import build_network, standardise

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    weights = np.where(lateral, LATERAL_SHARE / lateral.sum(), (1 - LATERAL_SHARE) / (~lateral).sum())
    data = torch.from_numpy(thumbs[:, None].astype(np.float32))
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(thumbs), size=BATCH, p=weights / weights.sum())
        x = augment(data[idx], gen)
        turns = torch.from_numpy(rng.integers(0, 4, size=BATCH))
        x = torch.stack([torch.rot90(x[i], k=-int(turns[i]), dims=(1, 2)) for i in range(BATCH)])
        x = torch.from_numpy(standardise(x.numpy()))
        logits = net(x)
        view = torch.from_numpy(lateral[idx].astype(np.int64))
        loss = F.cross_entropy(logits[:, :4], turns) + F.cross_entropy(logits[:, 4:], view)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 300 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return net.eval()


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(classifier, pictures: list[np.ndarray], lateral: np.ndarray) -> dict:
    """Accuracy of the shipped classifier on full-size pictures turned by np.rot90 (all four turns)."""
    rot_ok = {k: [] for k in range(4)}
    view_ok: list[bool] = []
    confidences = []
    start = time.perf_counter()
    for k in range(4):
        turned = [np.ascontiguousarray(np.rot90(p, k=-k)) for p in pictures]
        preds = classifier.predict(turned)
        rot_ok[k] = [pr.rotation == 90 * k for pr in preds]
        confidences += [pr.confidence for pr in preds]
        view_ok += [(pr.lateral_prob > 0.5) == bool(lat) for pr, lat in zip(preds, lateral)]
    ms = 1000 * (time.perf_counter() - start) / (4 * len(pictures))
    rot_all = np.array([v for k in range(4) for v in rot_ok[k]])
    lat4 = np.tile(lateral, 4)
    view_ok_a = np.array(view_ok)
    return {
        "rotation_accuracy": float(rot_all.mean()),
        "rotation_correct": int(rot_all.sum()),
        "rotation_total": int(rot_all.size),
        "rotation_accuracy_frontal": float(rot_all[~lat4].mean()),
        "rotation_accuracy_lateral": float(rot_all[lat4].mean()) if lat4.any() else None,
        "rotation_accuracy_by_turn": {str(90 * k): float(np.mean(rot_ok[k])) for k in range(4)},
        "view_accuracy": float(view_ok_a.mean()),
        "view_accuracy_frontal": float(view_ok_a[~lat4].mean()),
        "view_accuracy_lateral": float(view_ok_a[lat4].mean()) if lat4.any() else None,
        "view_correct_frontal": f"{int(view_ok_a[~lat4].sum())}/{int((~lat4).sum())}",
        "view_correct_lateral": f"{int(view_ok_a[lat4].sum())}/{int(lat4.sum())}",
        "min_confidence": float(min(confidences)),
        "share_below_0.8": float(np.mean(np.array(confidences) < 0.8)),
        "ms_per_image": ms,
    }


def write_card(card: Path, figures: dict, meta: dict) -> None:
    """Replace the generated block of the model card (between the markers) with this run's figures."""
    begin, end = "<!-- figures:begin -->", "<!-- figures:end -->"
    v = figures
    block = "\n".join(
        [
            begin,
            f"- Training data: {meta['n_train']} films ({meta['n_train_lateral']} lateral) from "
            f"{meta['n_train_patients']} patients; validation: {meta['n_val']} films ({meta['n_val_lateral']} lateral) "
            f"from {meta['n_val_patients']} other patients (patient-disjoint, seed {meta['seed']}).",
            f"- Training pictures: seed chain `{meta['chain']}`; {meta['steps']} steps of {BATCH}, "
            f"{meta['train_seconds']:.0f} s on {meta['threads']} CPU threads; {meta['parameters']:,} parameters, "
            f"{meta['bytes']:,} bytes.",
            f"- **Rotation accuracy (validation, 4 turns each): {100 * v['rotation_accuracy']:.2f}%** "
            f"({v['rotation_correct']}/{v['rotation_total']}); frontal {100 * v['rotation_accuracy_frontal']:.2f}%, "
            f"lateral {100 * (v['rotation_accuracy_lateral'] or 0):.2f}%; by turn "
            + ", ".join(f"{k}°: {100 * a:.1f}%" for k, a in v["rotation_accuracy_by_turn"].items())
            + ".",
            f"- **Frontal/lateral accuracy (validation, 4 turns each): {100 * v['view_accuracy']:.2f}%**; "
            f"frontal {v['view_correct_frontal']} ({100 * v['view_accuracy_frontal']:.1f}%), "
            f"lateral {v['view_correct_lateral']} ({100 * (v['view_accuracy_lateral'] or 0):.1f}%).",
            f"- Lowest rotation confidence on validation: {v['min_confidence']:.3f}; share below 0.8 "
            f"(`orientation_uncertain`): {100 * v['share_below_0.8']:.2f}%.",
            f"- Cost: {v['ms_per_image']:.2f} ms per 512 px picture (thumbnail + 4 turns through the network, "
            f"batched, CPU, {meta['threads']} threads).",
            f"- Blank criterion check: the lowest 32x32 block-mean std over all {meta['n_all']} real films is "
            f"{meta['min_blank_std']:.1f} (threshold {meta['blank_threshold']}).",
            end,
        ]
    )
    text = card.read_text() if card.exists() else f"# Orientation classifier\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    card.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from cxrage_ray.orient import BLANK_GRID, BLANK_STD, OrientationClassifier, thumbnail

    torch.set_num_threads(args.threads)
    table = pd.read_csv(args.data / "metadata.csv")
    files = [str(f) for f in table["file"]]
    lateral = (table["view"].astype(str).str.upper() == "L").to_numpy()
    patients = table["patient_id"].astype(str).to_numpy()
    chain = pick_chain(args.chain)
    if chain == "pil":
        print("WARNING: PIL stand-in for the seed chain; do not ship these weights", file=sys.stderr)
    pictures = seed_chain_pictures(args.data, files, chain, args.cache)
    thumbs = np.stack([thumbnail(p, SIZE) for p in pictures])
    blank_std = min(float(thumbnail(p, BLANK_GRID).std()) for p in pictures)
    val = patient_split(patients, lateral, args.seed)
    print(f"{(~val).sum()} train ({lateral[~val].sum()} lateral), {val.sum()} val ({lateral[val].sum()} lateral)")

    start = time.perf_counter()
    net = train(thumbs[~val], lateral[~val], args.steps, args.seed)
    train_seconds = time.perf_counter() - start
    arch = {"size": SIZE, "width": 8, "hidden": 64}
    classifier = OrientationClassifier(net, size=SIZE)
    figures = evaluate(classifier, [p for p, v in zip(pictures, val) if v], lateral[val])
    print(json.dumps(figures, indent=2))

    state = {k: v.detach().contiguous().float() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    state.update({k: v for k, v in net.state_dict().items() if not v.dtype.is_floating_point})
    meta = {
        "chain": chain,
        "seed": args.seed,
        "steps": args.steps,
        "threads": args.threads,
        "train_seconds": train_seconds,
        "n_all": len(files),
        "n_train": int((~val).sum()),
        "n_train_lateral": int(lateral[~val].sum()),
        "n_train_patients": len(set(patients[~val])),
        "n_val": int(val.sum()),
        "n_val_lateral": int(lateral[val].sum()),
        "n_val_patients": len(set(patients[val])),
        "parameters": sum(p.numel() for p in net.parameters()),
        "min_blank_std": blank_std,
        "blank_threshold": BLANK_STD,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        state,
        str(args.out),
        metadata={
            "architecture": json.dumps(arch),
            "classes_rotation": "input rotated 0,90,180,270 degrees clockwise",
            "classes_view": "frontal,lateral",
            "training": json.dumps(meta),
            "validation": json.dumps(figures),
            "validation_files": json.dumps([f for f, v in zip(files, val) if v]),
        },
    )
    meta["bytes"] = args.out.stat().st_size
    write_card(args.card, figures, meta)
    print(
        f"validation: rotation {100 * figures['rotation_accuracy']:.2f}%  "
        f"frontal/lateral {100 * figures['view_accuracy']:.2f}% "
        f"(frontal {figures['view_correct_frontal']}, lateral {figures['view_correct_lateral']})  "
        f"{figures['ms_per_image']:.2f} ms/image -> {args.out} ({meta['bytes']:,} bytes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
