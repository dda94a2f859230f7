"""Train the orientation classifier (rotation 0/90/180/270 + frontal/lateral) on CPU, write its weights + card.

In:  the real radiographs of `cxr-sample` (metadata.csv: `file`, `view` PA/AP/AP Supine/L, `patient_id`),
     each passed through the seed chain once (cached in a temp dir, never in the repo).
Out: `weights/orientation.safetensors` (float32, < 1 MB, metadata: architecture, data, validation figures) and
     the figures in `weights/ORIENTATION_MODEL_CARD.md`; validation accuracy printed.

Method: synthetic quarter turns of every film (labels for free); affine jitter / flips / zoom-crops / occlusion /
gamma-contrast-blur-noise, warped from 192 px onto 96 px thumbnails; lateral films oversampled; one-cycle
(warm-up + cosine) AdamW, label smoothing; patient-disjoint validation split; fixed seeds; no pretrained weights.
Validation runs the shipped `OrientationClassifier` (four quarter turns x mirror = eight views per film) on the
full-size seed-chain pictures turned with `np.rot90`, exactly the path `cxrage score` takes.

    OMP_NUM_THREADS=1 python jobs/train_rotation.py --data ../shared/data/cxr-sample   # ~8 min, 1 thread
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
SIZE = 96  # thumbnail side: 2.25x the pixels of the first release's 64 px, same cost with stride-2 stages
STAGES = 3  # stride-2 conv stages after the stride-2 stem: 96 -> 48 -> 24 -> 12 -> 6
DOWNSAMPLE = "stride"  # stride-2 convs, not conv + max-pool: a quarter of the cost at 96 px
WIDTH = 8  # stem channels (doubling per stage)
HIDDEN = 64
STEPS = 3000
BATCH = 64
LR = 3e-3
LABEL_SMOOTHING = 0.05
MIN_ZOOM = 0.7  # per-axis zoom 0.7-1.25: crops down to 70% of the film's side
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
    parser.add_argument("--size", type=int, default=SIZE, help="thumbnail side (px)")
    parser.add_argument("--stages", type=int, default=STAGES)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--downsample", choices=["pool", "stride"], default=DOWNSAMPLE)
    parser.add_argument("--min-zoom", type=float, default=MIN_ZOOM, help="smallest per-axis zoom (crop) factor")
    parser.add_argument("--no-mirror-tta", dest="mirror_tta", action="store_false", help="score 4 views, not 8")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, busy CPU)")
    parser.add_argument("--cv", type=int, default=0, metavar="K",
                        help="instead of training the shipped model: K-fold patient-disjoint cross-validation of "
                        "this configuration over all films (each film validated once); writes no weights, "
                        "records the figures in the card's cross-validation block")
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at once with --cv (one process each)")
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
    from cxrage_ray.decode.image import decode_image
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


def _patient_strata(patients: np.ndarray, lateral: np.ndarray) -> tuple[list[str], list[str]]:
    """Patients with a lateral film, and the others (sorted: the splits depend on the seed only)."""
    with_lateral = sorted({p for p, lat in zip(patients, lateral) if lat})
    return with_lateral, sorted(set(patients) - set(with_lateral))


def patient_split(patients: np.ndarray, lateral: np.ndarray, seed: int) -> np.ndarray:
    """Boolean validation mask; whole patients go to one side, stratified by 'has a lateral film'."""
    rng = np.random.default_rng(seed)
    val: set[str] = set()
    for group in _patient_strata(patients, lateral):
        order = rng.permutation(len(group))
        val |= {group[i] for i in order[: round(VAL_FRACTION * len(group))]}
    return np.array([p in val for p in patients])


def patient_folds(patients: np.ndarray, lateral: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per film; whole patients in one fold, patients with a lateral film spread evenly."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for group in _patient_strata(patients, lateral):
        for position, i in enumerate(rng.permutation(len(group))):
            fold_of[group[i]] = position % k
    return np.array([fold_of[p] for p in patients])


def augment(x, rng_torch, min_zoom: float = 0.7):
    """(B, 1, 2S, 2S) thumbnails in 0..255 -> jittered (B, 1, S, S) thumbnails in 0..255.

    Geometric: ±15° rotation, per-axis zoom `min_zoom`-1.25 (tight crops of the chest as well as borders), ±12%
    shift, left-right flip (p = 0.5). The warp samples the double-size thumbnail onto an S grid: at the
    identity every output pixel lands between four source pixels, i.e. exactly the 2x2 box average, and crops
    keep the detail a real thumbnail of that field would have. Occlusion: a random rectangle set to a random
    grey (markers, tubes, labels; p = 0.3). Photometric: gamma, contrast, brightness, blur (p = 0.25), noise.
    """
    import torch
    import torch.nn.functional as F

    b, _, source, _ = x.shape
    side = source // 2
    u = lambda lo, hi: torch.empty(b).uniform_(lo, hi, generator=rng_torch)  # noqa: E731
    chance = lambda p: torch.rand(b, generator=rng_torch) < p  # noqa: E731
    angle = u(-15, 15) * np.pi / 180
    flip = torch.where(chance(0.5), -1.0, 1.0)
    sx, sy = u(min_zoom, 1.25) * flip, u(min_zoom, 1.25)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sx * torch.cos(angle), -sy * torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = sx * torch.sin(angle), sy * torch.cos(angle)
    theta[:, 0, 2], theta[:, 1, 2] = u(-0.12, 0.12), u(-0.12, 0.12)
    keep = chance(0.15)  # some samples exactly as inference sees them (up to the flip)
    theta[keep] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    theta[keep, 0, 0] = flip[keep]
    grid = F.affine_grid(theta, [b, 1, side, side], align_corners=False)
    x = F.grid_sample(x / 255.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rows = torch.arange(side).view(1, side, 1)
    cols = torch.arange(side).view(1, 1, side)
    h, w = (u(0.05, 0.35) * side).long().view(b, 1, 1), (u(0.05, 0.35) * side).long().view(b, 1, 1)
    top, left = (u(0, 1) * (side - h.view(b))).long().view(b, 1, 1), (u(0, 1) * (side - w.view(b))).long().view(b, 1, 1)
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & chance(0.3).view(b, 1, 1)
    x = torch.where(box[:, None], u(0, 1).view(b, 1, 1, 1), x)
    x = x.clamp(0, 1) ** torch.exp(u(-0.6, 0.6)).view(b, 1, 1, 1)
    x = (x - 0.5) * u(0.7, 1.35).view(b, 1, 1, 1) + 0.5 + u(-0.12, 0.12).view(b, 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3x3 box at thumbnail scale
    x = torch.where(chance(0.25).view(b, 1, 1, 1), blurred, x)
    x = x + u(0.0, 0.04).view(b, 1, 1, 1) * torch.randn(x.shape, generator=rng_torch)
    return x.clamp(0, 1) * 255.0


def train(thumbs: np.ndarray, lateral: np.ndarray, steps: int, seed: int, arch: dict, min_zoom: float = 0.7):
    """Train `build_network(**arch)` on double-size thumbnails (N, 2S, 2S) 0..255; returns it in eval mode."""
    import torch
    import torch.nn.functional as F

    from cxrage_ray.orient.network import build_network

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(**arch)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    # one-cycle: 15% warm-up, then cosine annealing to ~0
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.15)
    weights = np.where(lateral, LATERAL_SHARE / lateral.sum(), (1 - LATERAL_SHARE) / (~lateral).sum())
    data = torch.from_numpy(thumbs[:, None].astype(np.float32))
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(thumbs), size=BATCH, p=weights / weights.sum())
        x = augment(data[idx], gen, min_zoom)
        turns = torch.from_numpy(rng.integers(0, 4, size=BATCH))
        for k in range(1, 4):  # turn each sample k quarter turns clockwise
            sel = turns == k
            x[sel] = torch.rot90(x[sel], k=-k, dims=(2, 3))
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) / (x.std(dim=(2, 3), keepdim=True, unbiased=False) + 1.0)  # = orient.standardise
        logits = net(x)
        view = torch.from_numpy(lateral[idx].astype(np.int64))
        loss = F.cross_entropy(logits[:, :4], turns, label_smoothing=LABEL_SMOOTHING) + F.cross_entropy(
            logits[:, 4:], view, label_smoothing=LABEL_SMOOTHING
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 300 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return net.eval()


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(classifier, pictures: list[np.ndarray], lateral: np.ndarray, names: list[str]) -> dict:
    """Accuracy of the shipped classifier on full-size pictures turned by np.rot90 (all four turns), per class,
    the films it gets wrong, and its cost on one CPU thread (batched, and one picture at a time as `orient`)."""
    import torch

    rot_ok = {k: [] for k in range(4)}
    view_ok: list[bool] = []
    confidences = []
    wrong: dict[str, list[str]] = {}
    for k in range(4):
        turned = [np.ascontiguousarray(np.rot90(p, k=-k)) for p in pictures]
        preds = classifier.predict(turned)
        rot_ok[k] = [pr.rotation == 90 * k for pr in preds]
        confidences += [pr.confidence for pr in preds]
        view_ok += [(pr.lateral_prob > 0.5) == bool(lat) for pr, lat in zip(preds, lateral)]
        for name, pr, lat in zip(names, preds, lateral):
            if pr.rotation != 90 * k:
                wrong.setdefault(name, []).append(f"{90 * k}° called {pr.rotation}° (p={pr.confidence:.3f})")
            if (pr.lateral_prob > 0.5) != bool(lat):
                wrong.setdefault(name, []).append(f"{90 * k}°: {'frontal' if lat else 'lateral'} (p_lat={pr.lateral_prob:.2f})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        classifier.predict(pictures)
        ms_batched = 1000 * (time.perf_counter() - start) / len(pictures)
        start = time.perf_counter()
        for p in pictures:
            classifier.predict([p])
        ms_single = 1000 * (time.perf_counter() - start) / len(pictures)
    finally:
        torch.set_num_threads(threads)
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
        "ms_per_image": ms_batched,
        "ms_per_image_single": ms_single,
        "errors": wrong,
    }


def _cv_fold(thumbs, lateral, val_pictures, val_lateral, val_names, steps, seed, arch, min_zoom, mirror_tta):
    """One cross-validation fold in its own process: train on the other folds, evaluate on this one."""
    import torch

    from cxrage_ray.orient.classifier import OrientationClassifier

    torch.set_num_threads(1)
    net = train(thumbs, lateral, steps, seed, arch, min_zoom)
    classifier = OrientationClassifier(net, size=arch["size"], mirror_tta=mirror_tta)
    return evaluate(classifier, val_pictures, val_lateral, val_names)


def cross_validate(args, files, pictures, thumbs, lateral, patients, ages, arch) -> dict:
    """K-fold patient-disjoint CV of one configuration: every film is validated once, by a model that never saw
    its patient. A better estimate than the single 25% split (4x the validation films), used to describe the
    configuration, not to choose it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    fold = patient_folds(patients, lateral, args.cv, args.seed)
    jobs = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in range(args.cv):
            val = fold == f
            jobs.append(pool.submit(
                _cv_fold, thumbs[~val], lateral[~val], [p for p, v in zip(pictures, val) if v], lateral[val],
                [n for n, v in zip(files, val) if v], args.steps, args.seed, arch, args.min_zoom, args.mirror_tta))
        results = [job.result() for job in jobs]
    age_of = dict(zip(files, ages))
    wrong = {name: errs for r in results for name, errs in r["errors"].items()}
    rot_correct = sum(r["rotation_correct"] for r in results)
    rot_total = sum(r["rotation_total"] for r in results)
    view_correct = sum(round(r["view_accuracy"] * r["rotation_total"]) for r in results)  # same views as rotation
    adult = [a >= 18 for a in ages]
    figures = {
        "folds": args.cv,
        "films": len(files),
        "rotation_accuracy": rot_correct / rot_total,
        "rotation_correct": rot_correct,
        "rotation_total": rot_total,
        "view_accuracy": view_correct / rot_total,
        "films_with_errors": {name: {"age": age_of[name], "errors": errs} for name, errs in wrong.items()},
        "adult_films": int(sum(adult)),
        "adult_films_with_rotation_errors": sum(
            1 for name, errs in wrong.items() if age_of[name] >= 18 and any("called" in e for e in errs)),
        "per_fold_rotation_accuracy": [r["rotation_accuracy"] for r in results],
    }
    print(json.dumps(figures, indent=2))
    print(f"{args.cv}-fold CV over {len(files)} films: rotation {100 * figures['rotation_accuracy']:.2f}% "
          f"({rot_correct}/{rot_total}), frontal/lateral {100 * figures['view_accuracy']:.2f}%")
    write_cv_block(args, figures)
    return figures


def write_cv_block(args, figures: dict) -> None:
    """Replace the card's cross-validation block with this run's figures."""
    begin, end = "<!-- cv:begin -->", "<!-- cv:end -->"
    errors = "; ".join(f"`{name}` (age {v['age']:g}): " + ", ".join(v["errors"])
                       for name, v in figures["films_with_errors"].items()) or "none"
    block = "\n".join([
        begin,
        f"- Command: `OMP_NUM_THREADS=1 python jobs/train_rotation.py --cv {args.cv} --jobs {args.jobs}` "
        f"(configuration: `--size {args.size} --stages {args.stages} --width {args.width} --downsample "
        f"{args.downsample} --min-zoom {args.min_zoom} --steps {args.steps} --seed {args.seed}`).",
        f"- **Rotation accuracy, {figures['folds']}-fold patient-disjoint CV over all {figures['films']} films "
        f"(4 turns each): {100 * figures['rotation_accuracy']:.2f}%** ({figures['rotation_correct']}/"
        f"{figures['rotation_total']}); per fold: "
        + ", ".join(f"{100 * a:.2f}%" for a in figures["per_fold_rotation_accuracy"]) + ".",
        f"- Frontal/lateral accuracy: {100 * figures['view_accuracy']:.2f}%.",
        f"- Adult films (≥ 18 years) with a rotation error: {figures['adult_films_with_rotation_errors']} of "
        f"{figures['adult_films']}.",
        f"- Films with errors: {errors}.",
        end,
    ])
    text = args.card.read_text()
    if begin not in text:
        text = text.replace("<!-- figures:end -->", f"<!-- figures:end -->\n\n{begin}\n{end}", 1)
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    args.card.write_text(head + block + tail)


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
            f"- Training pictures: seed chain `{meta['chain']}`; {meta['size']} px thumbnails, {meta['steps']} steps of {BATCH}, "
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
            f"- Cost on 1 CPU thread: {v['ms_per_image']:.2f} ms per 512 px picture batched, "
            f"{v['ms_per_image_single']:.2f} ms one at a time (thumbnail + {meta['views']} views through the network; "
            f"measured on the shared, busy 2-core machine).",
            "- Validation errors: "
            + (
                "; ".join(f"`{name}`: " + ", ".join(errs) for name, errs in v["errors"].items())
                if v["errors"]
                else "none"
            )
            + ".",
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

    from cxrage_ray.orient.classifier import OrientationClassifier
    from cxrage_ray.orient.qc import BLANK_GRID, BLANK_STD
    from cxrage_ray.orient.thumbnails import thumbnail

    torch.set_num_threads(args.threads)
    table = pd.read_csv(args.data / "metadata.csv")
    files = [str(f) for f in table["file"]]
    lateral = (table["view"].astype(str).str.upper() == "L").to_numpy()
    patients = table["patient_id"].astype(str).to_numpy()
    chain = pick_chain(args.chain)
    if chain == "pil":
        print("WARNING: PIL stand-in for the seed chain; do not ship these weights", file=sys.stderr)
    pictures = seed_chain_pictures(args.data, files, chain, args.cache)
    # training thumbnails at twice the side: `augment` warps there and box-averages down to args.size
    thumbs = np.stack([thumbnail(p, 2 * args.size) for p in pictures])
    blank_std = min(float(thumbnail(p, BLANK_GRID).std()) for p in pictures)
    arch = {"size": args.size, "width": args.width, "hidden": HIDDEN, "stages": args.stages, "downsample": args.downsample}
    if args.cv:
        ages = pd.to_numeric(table["age"], errors="coerce").fillna(-1).astype(float).tolist()
        cross_validate(args, files, pictures, thumbs, lateral, patients, ages, arch)
        return 0
    val = patient_split(patients, lateral, args.seed)
    print(f"{(~val).sum()} train ({lateral[~val].sum()} lateral), {val.sum()} val ({lateral[val].sum()} lateral)")

    start = time.perf_counter()
    net = train(thumbs[~val], lateral[~val], args.steps, args.seed, arch, args.min_zoom)
    train_seconds = time.perf_counter() - start
    arch["mirror_tta"] = args.mirror_tta
    classifier = OrientationClassifier(net, size=args.size, mirror_tta=args.mirror_tta)
    val_files = [f for f, v in zip(files, val) if v]
    figures = evaluate(classifier, [p for p, v in zip(pictures, val) if v], lateral[val], val_files)
    print(json.dumps(figures, indent=2))

    state = {k: v.detach().contiguous().float() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    state.update({k: v for k, v in net.state_dict().items() if not v.dtype.is_floating_point})
    meta = {
        "chain": chain,
        "seed": args.seed,
        "steps": args.steps,
        "size": args.size,
        "min_zoom": args.min_zoom,
        "views": 8 if args.mirror_tta else 4,
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
            "validation_files": json.dumps(val_files),
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
