"""Measure the picture-based non-chest score on real films: the 250 sample chest films vs the DICOM sample's
non-chest radiographs (EXTREMITY, HIP, HAND, dental), and print both error rates per threshold.

The score, `orient.chest_likeness_thumbs`: the best correlation of the film's seed-chain picture, as a 32 px
thumbnail, with the mean frontal and the mean lateral chest thumbnail, over quarter turns and the mirror image.
The orientation classifier's confidence was tried first and separates nothing (non-chest films get 0.84-1.0,
chest films down to 0.75). For the chest films the templates are rebuilt without the film being scored
(leave-one-out), so no film is scored against a mean that contains it.

    PYTHONPATH=. python benchmarks/non_chest.py [--write-templates weights/chest_templates.safetensors]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def pictures(shared: Path):
    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.decode.image import decode_image
    from cxrage_ray.preprocess.seed_chain import seed_chain

    meta = pd.read_csv(shared / "data" / "cxr-sample" / "metadata.csv")
    for name in meta["file"]:
        path = shared / "data" / "cxr-sample" / name
        yield name, True, seed_chain(decode_image(path.read_bytes(), name))
    index = pd.read_csv(shared / "data" / "dicom-sample" / "index.csv")
    for _, row in index[~index["is_cxr"].astype(bool)].iterrows():
        if row["modality"] not in ("CR", "DX"):
            continue  # MR/OT are refused by modality before any picture exists
        path = shared / "data" / "dicom-sample" / row["file"]
        try:
            picture = seed_chain(decode_image(path.read_bytes(), row["file"], DecodeOptions(allow_any_modality=True)))
        except Exception as exc:  # noqa: BLE001 - an undecodable sample file is reported, not scored
            print(f"skip {row['file']}: {type(exc).__name__}")
            continue
        yield row["file"], False, picture


def _template(thumbs: np.ndarray) -> np.ndarray:
    mean = thumbs.mean(axis=0)
    return (mean - mean.mean()) / (mean.std() + 1e-6)


def main() -> None:
    import argparse

    from cxrage_ray.config import NON_CHEST_LIKENESS
    from cxrage_ray.orient.qc import CHEST_TEMPLATE_SIZE, chest_likeness_thumbs, template_thumbnail

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-templates", metavar="PATH",
                        help="also write the frontal/lateral templates of all chest films (weights/chest_templates.safetensors)")
    args = parser.parse_args()
    shared = Path(os.environ.get("CXRAGE_SHARED", REPO.parent / "shared"))
    views = pd.read_csv(shared / "data" / "cxr-sample" / "metadata.csv").set_index("file")["view"].astype(str)
    names, is_chest, thumbs = [], [], []
    for name, chest, picture in pictures(shared):
        names.append(name)
        is_chest.append(chest)
        thumbs.append(template_thumbnail(picture))
    thumbs_a, chest_mask = np.stack(thumbs), np.array(is_chest)
    lateral = np.array([chest and views.get(name, "") in ("L", "LL", "RL", "LATERAL") for name, chest in
                        zip(names, is_chest)])
    groups = [chest_mask & ~lateral, chest_mask & lateral]
    likeness = []
    for i, thumb in enumerate(thumbs_a):
        templates = []
        for group in groups:
            members = group.copy()
            members[i] = False  # leave-one-out: a chest film is never scored against a mean that contains it
            templates.append(_template(thumbs_a[members]))
        likeness.append(chest_likeness_thumbs(thumb, templates))
    frame = pd.DataFrame({"file": names, "chest": is_chest, "chest_likeness": likeness})
    n = int(chest_mask.sum())
    print(f"{n} chest films ({int(lateral.sum())} lateral), {len(frame) - n} non-chest radiographs; "
          f"thumbnails {CHEST_TEMPLATE_SIZE} px")
    print(frame[~frame["chest"]].to_string(index=False))
    chest_scores, other = frame.loc[frame["chest"], "chest_likeness"], frame.loc[~frame["chest"], "chest_likeness"]
    print(f"chest lowest: {np.sort(chest_scores)[:5].round(3).tolist()}; non-chest highest: "
          f"{np.sort(other)[-3:].round(3).tolist()}")
    for threshold in sorted({0.15, 0.2, 0.3, 0.35, 0.4, 0.45, NON_CHEST_LIKENESS, 0.5, 0.55}):
        print(f"  flag below {threshold:.2f}: chest films flagged {int((chest_scores < threshold).sum())}/{n}, "
              f"non-chest missed {int((other >= threshold).sum())}/{len(other)}"
              + ("   <- NON_CHEST_LIKENESS" if threshold == NON_CHEST_LIKENESS else ""))
    if args.write_templates:
        from safetensors.numpy import save_file

        save_file({"0_frontal": _template(thumbs_a[groups[0]]).astype(np.float32),
                   "1_lateral": _template(thumbs_a[groups[1]]).astype(np.float32)}, args.write_templates,
                  metadata={"source": "mean seed-chain thumbnails of ../shared/data/cxr-sample (frontal: PA/AP, "
                            "lateral: L)", "size": str(CHEST_TEMPLATE_SIZE), "made_by": "benchmarks/non_chest.py"})
        print(f"wrote {args.write_templates}")


if __name__ == "__main__":
    main()
