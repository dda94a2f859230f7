"""Picture and age QC: the checks behind the `qc` flags that do not come from the DICOM header.

In:  a seed-chain picture (uint8 (H, W[, C])) or its `Thumbnails`; a chronological age (years) or None.
Out: bools (`is_blank`, `picture_non_chest`, `is_paediatric`), the picture's verdict (`picture_chest_verdict`:
     non_chest on strong evidence, non_chest_suspected on weak), the chest-likeness score behind them
     (`chest_likeness_thumbs` of a `template_thumbnail`), how upright-chest-like the picture is at each quarter
     turn (`upright_likeness`, the orientation stage's second opinion on a turn), and the QC flag names. Which ages are plausible is the
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
#: A warning, not an exclusion: the picture looks little like a chest film, but not so little that a real film
#: (small, tightly cropped, low-contrast, a child's) is ruled out. Reports keep these rows in their statistics.
QC_NON_CHEST_SUSPECTED = "non_chest_suspected"
#: Pictures (no header) whose `chest_likeness` is below this but at or above `OrientConfig.non_chest_likeness`
#: are flagged `non_chest_suspected` (benchmarks/qc.py).
NON_CHEST_SUSPECTED_LIKENESS = 0.45
#: Flags that only warn: `--skip-flagged` still scores such a film, and reports keep it in their statistics.
WARNING_FLAGS = frozenset({QC_NON_CHEST_SUSPECTED})
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


def upright_likeness(thumb: np.ndarray, templates: Sequence[np.ndarray]) -> tuple[float, float, float, float]:
    """How much a `template_thumbnail` looks like an upright chest film once a clockwise turn of 0/90/180/270°
    is undone: per turn, the best Pearson correlation with any chest template, as it lies or mirrored (a mirror
    image of an upright film is still upright)."""
    standard = [(t - t.mean()) / (t.std() + 1e-6) for t in templates]
    scores = []
    for k in range(4):
        view = np.rot90(thumb, k)  # undoes a clockwise turn of 90k degrees
        scores.append(max(float((v * t).mean()) for t in standard for v in (view, view[:, ::-1])))
    return (scores[0], scores[1], scores[2], scores[3])


def chest_likeness_thumbs(thumb: np.ndarray, templates: Sequence[np.ndarray]) -> float:
    """Best Pearson correlation of a `template_thumbnail` with any chest template, over the four quarter turns
    and the mirror image (a film may lie turned or flipped; orientation is judged elsewhere)."""
    return max(upright_likeness(thumb, templates))


@functools.lru_cache(maxsize=1)
def chest_templates() -> tuple[np.ndarray, ...]:
    """The committed chest templates (frontal, lateral), loaded once per process."""
    from importlib.resources import as_file

    from safetensors.numpy import load_file

    from cxrage_ray.model.packaged import packaged_file

    with as_file(packaged_file(CHEST_TEMPLATES)) as path:
        loaded = load_file(str(path))
    return tuple(loaded[key].astype(np.float64) for key in sorted(loaded))


def picture_non_chest(image_u8: np.ndarray | Thumbnails, threshold: float = NON_CHEST_LIKENESS) -> bool:
    """True when a seed-chain picture looks like no chest film (`chest_likeness` below `threshold`)."""
    return chest_likeness_thumbs(template_thumbnail(image_u8), chest_templates()) < threshold


def picture_chest_verdict(likeness: float, threshold: float = NON_CHEST_LIKENESS,
                          suspected_below: float = NON_CHEST_SUSPECTED_LIKENESS) -> str | None:
    """The flag a picture alone earns from its `chest_likeness`: `non_chest` below `threshold` (strong evidence:
    the picture is scored but left out of statistics), `non_chest_suspected` below `suspected_below` (a warning
    only), else None."""
    if likeness < threshold:
        return QC_NON_CHEST
    if likeness < suspected_below:
        return QC_NON_CHEST_SUSPECTED
    return None


def excludes(qc: Sequence[str]) -> bool:
    """Whether a film with these orientation-stage flags is one `--skip-flagged` leaves unscored (any flag but a
    warning)."""
    return any(flag not in WARNING_FLAGS for flag in qc)


def is_blank(image_u8: np.ndarray | Thumbnails) -> bool:
    """Near-uniform picture: the std of its 32x32 block means is under `BLANK_STD` 8-bit levels."""
    return float(Thumbnails.of(image_u8)(BLANK_GRID).std()) < BLANK_STD



def is_paediatric(age: float | None) -> bool:
    """A known chronological age below `ADULT_AGE`."""
    return age is not None and bool(np.isfinite(age)) and age < ADULT_AGE
