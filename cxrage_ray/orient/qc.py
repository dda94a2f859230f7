"""Picture and age QC: the checks behind the `qc` flags that do not come from the DICOM header.

In:  a seed-chain picture (uint8 (H, W[, C])) or its `Thumbnails`; a chronological age (years) or None.
Out: bools (`is_blank`, `picture_non_chest`, `is_paediatric`), the chest-likeness score behind `picture_non_chest`
     (`chest_likeness_thumbs` of a `template_thumbnail`), and the QC flag names. Which ages are plausible is the
     row contract's rule (`cxrage_ray.contract.plausible_age`), applied before orientation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from cxrage_ray.config import NON_CHEST_LIKENESS
from cxrage_ray.orient.thumbnails import Thumbnails

QC_LATERAL = "lateral"
QC_BLANK = "blank"
QC_PAEDIATRIC = "paediatric"
QC_ORIENTATION_UNCERTAIN = "orientation_uncertain"
QC_NON_CHEST = "non_chest"
#: Paediatric below this chronological age (years); CXR-Age was trained on adults (PLCO, 55-74).
ADULT_AGE = 18.0
#: Side of the thumbnails compared with the mean chest films (`chest_likeness`).
CHEST_TEMPLATE_SIZE = 32
#: Mean frontal and mean lateral chest thumbnails of the 250 sample films (benchmarks/non_chest.py writes them).
CHEST_TEMPLATES = "chest_templates.safetensors"
#: Blank: the std of a 32x32 block-mean downsample (8-bit levels). The 250 real sample films measure >= 20 (the seed chain
#: auto-levels every film to the full range); a uniform film, or one whose only content is pixel noise
#: (auto-level stretches noise to full range, block means average it away), measures < 3.
BLANK_GRID = 32
BLANK_STD = 8.0


def template_thumbnail(image_u8: np.ndarray | Thumbnails, size: int = CHEST_TEMPLATE_SIZE) -> np.ndarray:
    """Seed-chain picture (or its `Thumbnails`) -> (size, size) float64 thumbnail with zero mean and unit variance."""
    thumb = Thumbnails.of(image_u8)(size).astype(np.float64)
    return (thumb - thumb.mean()) / (thumb.std() + 1e-6)


def chest_likeness_thumbs(thumb: np.ndarray, templates: Sequence[np.ndarray]) -> float:
    """Best Pearson correlation of a `template_thumbnail` with any chest template, over the four quarter turns
    and the mirror image (a film may lie turned or flipped; orientation is judged elsewhere)."""
    best = -1.0
    for template in templates:
        t = (template - template.mean()) / (template.std() + 1e-6)
        for view in (thumb, thumb[:, ::-1]):
            best = max(best, *(float((np.rot90(view, k) * t).mean()) for k in range(4)))
    return best


@functools.lru_cache(maxsize=1)
def chest_templates() -> tuple[np.ndarray, ...]:
    """The committed chest templates (frontal, lateral), loaded once per process."""
    from importlib.resources import as_file, files

    from safetensors.numpy import load_file

    with as_file(files("cxrage_ray.weights_data") / CHEST_TEMPLATES) as path:
        loaded = load_file(str(path))
    return tuple(loaded[key].astype(np.float64) for key in sorted(loaded))


def picture_non_chest(image_u8: np.ndarray | Thumbnails, threshold: float = NON_CHEST_LIKENESS) -> bool:
    """True when a seed-chain picture looks like no chest film (`chest_likeness` below `threshold`)."""
    return chest_likeness_thumbs(template_thumbnail(image_u8), chest_templates()) < threshold


def is_blank(image_u8: np.ndarray | Thumbnails) -> bool:
    """Near-uniform picture: the std of its 32x32 block means is under `BLANK_STD` 8-bit levels."""
    return float(Thumbnails.of(image_u8)(BLANK_GRID).std()) < BLANK_STD



def is_paediatric(age: float | None) -> bool:
    """A known chronological age below `ADULT_AGE`."""
    return age is not None and bool(np.isfinite(age)) and age < ADULT_AGE
