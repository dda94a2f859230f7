"""Orientation stage: seed-chain picture -> upright picture, how it was rotated, and quality flags.

In:  the seed chain's uint8 picture (H, W, C), C in {1, 3}, short side 512 (spec §9), plus the row's
     image_id / uri, the decoder's metadata (`patient_orientation`, `view_position`, `image_laterality`)
     and the chronological age when known.
Out: `OrientResult`: the corrected picture (exact, lossless `np.rot90`/`np.fliplr` of the input), the
     detected clockwise rotation of the input (`orientation`, degrees), where that came from
     (`rotation_source`: list | dicom | model | none) and `qc` flags (lateral, blank, paediatric,
     orientation_uncertain).

The correction runs on the seed chain's output, exactly where the original ran `mogrify -rotate 90` on its
PNGs (spec §9); `mogrify -rotate 90` is clockwise and lossless, i.e. `np.rot90(img, k=-1)`.

Sources, in the order `mode="auto"` tries them:
1. the rotation list (`--rotation-list`): the original's format (one file name per line: rotate it 90° clockwise)
   or `file,degrees`. Degrees are the clockwise rotation to APPLY (mogrify's meaning), so a film listed with 90
   was lying 270° clockwise (= 90° counter-clockwise): `orientation` reports 270.
2. DICOM Patient Orientation (0020,0020) (see `dicom_orientation`).
3. our orientation classifier (`OrientationClassifier`, weights in `weights/orientation.safetensors`, trained by
   `jobs/train_rotation.py`; model card `weights/ORIENTATION_MODEL_CARD.md`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from cxrage_ray.config import NON_CHEST_LIKENESS, OrientConfig, RotationSource
from cxrage_ray.errors import InputError, WeightsError

ROTATIONS = (0, 90, 180, 270)
QC_LATERAL = "lateral"
QC_BLANK = "blank"
QC_PAEDIATRIC = "paediatric"
QC_ORIENTATION_UNCERTAIN = "orientation_uncertain"
QC_NON_CHEST = "non_chest"
QC_AGE_IMPLAUSIBLE = "age_implausible"
#: Chronological ages outside this range (years) are data errors (e.g. a placeholder birth date): nulled + flagged.
PLAUSIBLE_AGE = (0.0, 110.0)
#: Words in BodyPartExamined / Study / Series Description / Protocol Name / anatomic region that say "chest"
#: (English and the common European spellings seen in headers).
CHEST_WORDS = frozenset({"CHEST", "THORAX", "THORACIC", "THORAXES", "LUNG", "LUNGS", "CXR", "TORAX", "TORACE",
                         "TORACICO", "THORAKS", "BRUST", "BRUSTKORB", "POUMON", "POUMONS", "PULMONARY", "HEART",
                         "PORTCHEST", "CHESTPA", "CHESTAP", "CHESTLAT"})
#: Words that name another body part: a film described only by these is not a chest radiograph.
NON_CHEST_WORDS = frozenset({
    "EXTREMITY", "EXTREMITIES", "HAND", "HANDS", "FINGER", "FINGERS", "THUMB", "WRIST", "FOREARM", "ELBOW", "ARM",
    "HUMERUS", "SHOULDER", "CLAVICLE", "SCAPULA", "HIP", "HIPS", "PELVIS", "SACRUM", "COCCYX", "FEMUR", "KNEE",
    "KNEES", "PATELLA", "LEG", "LEGS", "TIBIA", "FIBULA", "ANKLE", "FOOT", "FEET", "TOE", "TOES", "HEEL",
    "CALCANEUS", "SKULL", "HEAD", "BRAIN", "FACE", "FACIAL", "SINUS", "SINUSES", "ORBIT", "MANDIBLE", "JAW",
    "DENTAL", "TEETH", "TOOTH", "PANORAMIC", "NECK", "SPINE", "CSPINE", "LSPINE", "LUMBAR", "CERVICAL", "SACRAL",
    "ABDOMEN", "ABDOMINAL", "KUB", "BREAST", "MAMMO", "MAMMOGRAPHY",
})
#: Anatomic region codes (SNOMED CT, and the older SNOMED-RT `T-` codes) for the chest / thorax.
CHEST_CODES = frozenset({"43799004", "51185008", "T-D3000", "T-D3100", "39607008", "T-28000"})
_WORD = re.compile(r"[A-Z]+")
#: Side of the thumbnails compared with the mean chest films (`chest_likeness`).
CHEST_TEMPLATE_SIZE = 32
#: Mean frontal and mean lateral chest thumbnails of the 250 sample films (benchmarks/non_chest.py writes them).
CHEST_TEMPLATES = "chest_templates.safetensors"
#: DICOM View Position (0018,5101) values that mean a lateral projection (LL/RL are the defined terms;
#: the others are seen in the wild). Decubitus (RLD/LLD) and obliques are frontal-ish and not flagged.
LATERAL_VIEW_POSITIONS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT", "XTABLE LATERAL"})
#: Paediatric below this chronological age (years); CXR-Age was trained on adults (PLCO, 55-74).
ADULT_AGE = 18.0
#: Blank: the std of a 32x32 block-mean downsample (8-bit levels). The 250 real sample films measure >= 20 (the seed chain
#: auto-levels every film to the full range); a uniform film, or one whose only content is pixel noise
#: (auto-level stretches noise to full range, block means average it away), measures < 3.
BLANK_GRID = 32
BLANK_STD = 8.0
DEFAULT_WEIGHTS = "orientation.safetensors"


# ------------------------------------------------------------------------------------------- rotation list

_HEADER_NAMES = {"file", "filename", "file_name", "image", "image_id", "uri", "path", "name"}
_HEADER_DEGREES = {"degrees", "degree", "rotation", "rotate", "angle", "clockwise"}


def _file_key(name: str) -> str:
    """The basename of a path, URL or Windows path (keys of the rotation list are matched by file name)."""
    name = name.strip().rstrip("/\\")
    return PureWindowsPath(PurePosixPath(name).name).name


def load_rotation_list(path_or_text: str | os.PathLike[str]) -> dict[str, int]:
    """Parse a rotation list into {file name: clockwise degrees to apply (0/90/180/270)}.

    Two formats, optionally with a header line (`file` or `file,degrees`), blank lines and `#` comments ignored:
    - the original's: one file name per line -> rotate 90° clockwise (its `mogrify -rotate 90`);
    - `file,degrees`: any multiple of 90, negative allowed (-90 == 270).
    Names are reduced to their basename; a name listed twice with different degrees is an error.

    Args:
        path_or_text: a path (`Path`, or a `str` without a newline), or the list's text itself (a `str` holding
            at least one newline).

    Raises:
        InputError: the file is missing, or a line is malformed (the message names the line number).
    """
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        text, origin = path_or_text, "rotation list"
    else:
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise InputError(f"rotation list {path} cannot be read: {exc}") from exc
        origin = str(path)
    table: dict[str, int] = {}
    seen_content = False
    for number, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in fields]
        if not fields or not any(fields) or fields[0].startswith("#"):
            continue
        if not seen_content:
            seen_content = True
            if fields[0].lower() in _HEADER_NAMES and (len(fields) == 1 or fields[1].lower() in _HEADER_DEGREES):
                continue
        if len(fields) > 2:
            raise InputError(f"{origin} line {number}: expected 'file' or 'file,degrees', got {len(fields)} fields")
        key = _file_key(fields[0])
        if not key:
            raise InputError(f"{origin} line {number}: empty file name")
        degrees = 90 if len(fields) == 1 or fields[1] == "" else _parse_degrees(fields[1], origin, number)
        if table.get(key, degrees) != degrees:
            raise InputError(f"{origin} line {number}: {key!r} is listed again with a different rotation")
        table[key] = degrees
    return table


def _parse_degrees(text: str, origin: str, number: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{origin} line {number}: degrees must be a number, got {text!r}") from None
    if not value.is_integer() or int(value) % 90 != 0:
        raise InputError(f"{origin} line {number}: degrees must be a multiple of 90 (0/90/180/270), got {text!r}")
    return int(value) % 360


def lookup_rotation(table: Mapping[str, int], image_id: str | None, uri: str | None) -> int | None:
    """Clockwise degrees to apply for this row, or None when it is not listed.

    Matched by the uri's file name, then the image_id (and its file name), then by stem (the name without its
    extension), so a list naming the original's PNGs (`x.png`) also applies to the raw files (`x.tif`, `x.dcm`).
    """
    candidates = [_file_key(uri)] if uri else []
    if image_id:
        candidates += [image_id, _file_key(image_id)]
    for key in candidates:
        if key in table:
            return table[key]
    stems = _stem_index(tuple(sorted(table.items())))
    for key in candidates:
        stem = _stem(key)
        if stem in stems:
            return stems[stem]
    return None


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


@functools.lru_cache(maxsize=4)
def _stem_index(items: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """stem -> degrees, leaving out stems listed with conflicting degrees (ambiguous)."""
    index: dict[str, int | None] = {}
    for name, degrees in items:
        stem = _stem(name)
        index[stem] = degrees if index.get(stem, degrees) == degrees else None
    return {k: v for k, v in index.items() if v is not None}


# ------------------------------------------------------------------------------------------- DICOM hints

#: Patient Orientation letters -> (axis, sign) in patient space: x = right->left, y = head->feet, z = post->ant.
_AXES = {"L": ("x", 1), "R": ("x", -1), "F": ("y", 1), "H": ("y", -1), "A": ("z", 1), "P": ("z", -1)}
_OPPOSITE = {"L": "R", "R": "L", "F": "H", "H": "F", "A": "P", "P": "A"}


@dataclass(frozen=True)
class DicomOrientation:
    """What Patient Orientation says about the stored pixels.

    Args:
        rotation: clockwise rotation of the stored picture relative to upright (head up), degrees.
        mirrored: after undoing `rotation`, a frontal film (rows run along L/R) has the patient's left on the
            image's LEFT: the standard display (row direction L, as for both PA and AP) is a left-right flip
            away. Always False for laterals (rows along A/P), where both facing directions are normal.
        lateral: the rows run along A/P, i.e. the film is a lateral projection.
    """

    rotation: int
    mirrored: bool
    lateral: bool


def _orientation_letters(value: Any) -> tuple[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\\/,;|\s\[\]'\"]+", value.upper()) if p]
    else:
        parts = [str(p).strip().upper() for p in value if str(p).strip()]
    if len(parts) != 2:
        return None
    # compound values (e.g. "LF" for an oblique row) list the principal direction first
    first, second = parts[0][:1], parts[1][:1]
    if first not in _AXES or second not in _AXES:
        return None
    return first, second


def dicom_orientation(meta: Mapping[str, Any]) -> DicomOrientation | None:
    """Decode Patient Orientation (0020,0020) into rotation / mirroring, or None when absent or unusable.

    DICOM gives two directions: the row direction (patient direction of increasing column index, i.e. towards
    the image's right) and the column direction (towards the image's bottom). An upright film has the column
    direction F (feet). Rotating a picture 90° clockwise maps (row, col) -> (opposite(col), row), so e.g.
    upright PA `L\\F` becomes `H\\L` at 90°, `R\\H` at 180°, `F\\R` at 270°. A vertical flip (`L\\H`) is reported
    as 180° + mirrored. Values without exactly one H/F axis (axial images, nonsense) give None.

    What we do with flips: `orient` undoes them too (`np.fliplr` after the rotation), because the age model
    was trained without flip augmentation (spec: `get_transforms(do_flip=False)`) and the original hand-fixed
    flipped NLST films (`-flip/-flop`). `orientation` still reports only the rotation part.

    Image Laterality (0020,0062) names the side of a paired organ; for a chest film it says nothing about how
    the picture lies, so it is not used.
    """
    letters = _orientation_letters(meta.get("patient_orientation"))
    if letters is None:
        return None
    row, col = letters
    axis_row, axis_col = _AXES[row][0], _AXES[col][0]
    if (axis_row == "y") == (axis_col == "y"):  # need exactly one head-feet axis
        return None
    for quarter_turns in range(4):
        if col == "F":
            break
        row, col = col, _OPPOSITE[row]  # undo one 90° clockwise turn (rotate counter-clockwise)
    lateral = _AXES[row][0] == "z"
    return DicomOrientation(rotation=90 * quarter_turns, mirrored=(row == "R"), lateral=lateral)


def dicom_orientation_hint(meta: Mapping[str, Any]) -> int | None:
    """Clockwise rotation (0/90/180/270) of the stored picture per Patient Orientation, or None (see
    `dicom_orientation`; a flip is reported through `DicomOrientation.mirrored`, not here)."""
    found = dicom_orientation(meta)
    return None if found is None else found.rotation


def dicom_is_lateral(meta: Mapping[str, Any]) -> bool:
    """View Position LL/RL/LATERAL, or a Patient Orientation whose rows run anterior-posterior."""
    view = str(meta.get("view_position") or "").strip().upper()
    if view in LATERAL_VIEW_POSITIONS:
        return True
    found = dicom_orientation(meta)
    return bool(found and found.lateral)


# ------------------------------------------------------------------------------------------- classifiers


def thumbnail(image_u8: np.ndarray, size: int) -> np.ndarray:
    """uint8 picture (H, W[, C]) -> float32 (size, size) grey, box-filtered, aspect NOT kept.

    Squashing (instead of cropping) keeps the whole film and commutes with 90° rotations, so a rotated film's
    thumbnail is the rotated thumbnail.
    """
    return Thumbnails(image_u8)(size)


class Thumbnails:
    """A picture's `thumbnail`s at any sizes, from one grey float copy of the picture.

    The QC of one film asks for up to three (the classifier's, the chest templates' and the blank grid); the
    grey conversion is most of each one's cost, and two of them share a size (issue 15: ~1.5 ms per film).
    Every thumbnail is the one `thumbnail` gives.
    """

    def __init__(self, image_u8: np.ndarray):
        from PIL import Image

        image = np.asarray(image_u8)
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 picture, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        pil = Image.fromarray(np.ascontiguousarray(image))
        if pil.mode != "L":
            pil = pil.convert("L")  # grey stored as RGB converts to itself
        self._grey = pil.convert("F")
        self._sized: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, picture: np.ndarray | Thumbnails) -> Thumbnails:
        """`picture`'s thumbnails: itself when it already is one (the QC functions take either)."""
        return picture if isinstance(picture, Thumbnails) else cls(picture)

    def __call__(self, size: int) -> np.ndarray:
        if size not in self._sized:
            from PIL import Image

            self._sized[size] = np.asarray(self._grey.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
        return self._sized[size]


def standardise(thumbs: np.ndarray) -> np.ndarray:
    """Per-image zero mean / unit spread (the classifiers' input; robust to exposure and auto-level)."""
    mean = thumbs.mean(axis=(-2, -1), keepdims=True)
    std = thumbs.std(axis=(-2, -1), keepdims=True)
    return ((thumbs - mean) / (std + 1.0)).astype(np.float32)


def build_network(width: int = 8, hidden: int = 64, size: int = 64, stages: int = 3, downsample: str = "pool"):
    """The classifier network on a `size` px grey thumbnail: a stride-2 5x5 stem, `stages` stages that double
    the channels (from `width`) and halve the side, a shared dense layer, two heads.

    A stage is conv-BN-ReLU + 2x2 max-pool (`downsample="pool"`) or a stride-2 conv-BN-ReLU (`"stride"`,
    a quarter of the multiply-adds, which is what lets a 96 px input stay as cheap as 64 px pooled).
    The defaults are the first release's network (64 px, pooled, ~90k parameters); the shipped weights record
    their own `width`/`hidden`/`size`/`stages`/`downsample` in the file's `architecture` metadata.

    Output: (N, 6) logits; [:, :4] rotation classes (input rotated 0/90/180/270 clockwise), [:, 4:] view
    (frontal, lateral). Flattening (not global pooling) keeps where things are, which is what orientation is.
    """
    import torch
    from torch import nn

    side = size // 2 // 2**stages
    if side < 1 or size % (2 ** (stages + 1)):
        raise ValueError(f"size {size} is not divisible by 2**{stages + 1}")
    if downsample not in ("pool", "stride"):
        raise ValueError(f"downsample must be 'pool' or 'stride', not {downsample!r}")

    def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class OrientationNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers = conv(1, width, 5, 2)  # size -> size / 2
            channels = width
            for _ in range(stages):  # each stage doubles the channels and halves the side
                if downsample == "pool":
                    layers += [*conv(channels, 2 * channels), nn.MaxPool2d(2)]
                else:
                    layers += conv(channels, 2 * channels, 3, 2)
                channels *= 2
            self.features = nn.Sequential(*layers)
            self.dense = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(channels * side * side, hidden), nn.ReLU())
            self.rotation = nn.Linear(hidden, 4)
            self.view = nn.Linear(hidden, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.dense(self.features(x))
            return torch.cat([self.rotation(h), self.view(h)], dim=1)

    return OrientationNet()


@dataclass(frozen=True)
class OrientationPrediction:
    """The classifiers' verdict on one picture.

    Args:
        rotation_probs: P(input is rotated 0/90/180/270° clockwise), sums to 1.
        lateral_prob: P(lateral projection), averaged over the views scored (the four quarter turns, and
            their mirror images with `mirror_tta`).
    """

    rotation_probs: tuple[float, float, float, float]
    lateral_prob: float

    @property
    def rotation(self) -> int:
        return ROTATIONS[int(np.argmax(self.rotation_probs))]

    @property
    def confidence(self) -> float:
        return float(max(self.rotation_probs))


class OrientationClassifier:
    """Tiny CNN with two heads: rotation (4 classes) and frontal/lateral (architecture in the weights' metadata).

    In:  seed-chain pictures (uint8 (H, W, C)); each becomes a `size` px grey thumbnail (`thumbnail`), standardised.
    Out: one `OrientationPrediction` per picture. The network sees all four quarter turns of each thumbnail (and,
    with `mirror_tta`, of its left-right mirror image: eight views) and the rotation scores are combined
    consistently (turn j of a film lying at k lies at k + j; the mirror image of a film lying at k lies at -k),
    so the verdict is equivariant to 90° rotations by construction; the lateral probability is the mean over
    the views. CPU, batched, no gradients.

    Args:
        network: a module built by `build_network` with its weights loaded.
        size: thumbnail side the network was trained on.
        metadata: the weights file's metadata (training figures, data, version).
        mirror_tta: also score the mirrored thumbnail (the network was trained with left-right flips, under
            which an upright film stays upright).
    """

    def __init__(
        self,
        network: Any,
        size: int = 64,
        metadata: Mapping[str, str] | None = None,
        mirror_tta: bool = False,
    ) -> None:
        self.network = network.eval()
        self.size = size
        self.metadata = dict(metadata or {})
        self.mirror_tta = mirror_tta

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> OrientationClassifier:
        """Load from a safetensors file; by default the committed `weights/orientation.safetensors`."""
        from safetensors import safe_open

        if path is None:
            from importlib.resources import as_file, files

            with as_file(files("cxrage_ray.weights_data") / DEFAULT_WEIGHTS) as packaged:
                return cls.load(packaged)
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"orientation weights {path} not found; retrain with `python jobs/train_rotation.py`")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        arch = json.loads(metadata.get("architecture", "{}"))
        size = int(arch.get("size", 64))
        try:
            network = build_network(
                width=int(arch.get("width", 8)),
                hidden=int(arch.get("hidden", 64)),
                size=size,
                stages=int(arch.get("stages", 3)),
                downsample=str(arch.get("downsample", "pool")),
            )
            network.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"{path} does not match the orientation network: {exc}") from exc
        return cls(network, size=size, metadata=metadata, mirror_tta=bool(arch.get("mirror_tta", False)))

    def predict(self, images: Sequence[np.ndarray | Thumbnails], batch_size: int = 64) -> list[OrientationPrediction]:
        """Pictures (or their `Thumbnails`) -> one prediction each."""
        thumbs = [Thumbnails.of(image) for image in images]
        stacked = np.stack([thumb(self.size) for thumb in thumbs]) if len(thumbs) else np.zeros((0,))
        return self.predict_thumbnails(stacked, batch_size=batch_size)

    def predict_thumbnails(self, thumbs: np.ndarray, batch_size: int = 64) -> list[OrientationPrediction]:
        """Same as `predict` on precomputed `thumbnail`s, shape (N, size, size)."""
        import torch

        if len(thumbs) == 0:
            return []
        x = standardise(np.asarray(thumbs, dtype=np.float32))
        # view (m, j): the thumbnail, mirrored left-right when m == 1, then turned j quarter turns clockwise
        mirrors = [x, x[:, :, ::-1]] if self.mirror_tta else [x]
        views = [np.rot90(m, k=-j, axes=(1, 2)) for m in mirrors for j in range(4)]
        n_views = len(views)
        turns = np.stack(views, axis=1)  # (N, views, S, S)
        flat = torch.from_numpy(np.ascontiguousarray(turns.reshape(-1, 1, self.size, self.size)))
        with torch.inference_mode():
            logits = torch.cat([self.network(chunk) for chunk in flat.split(batch_size * n_views)]).double()
        logits = logits.reshape(len(x), n_views, 6)
        rot_logp = torch.log_softmax(logits[:, :, :4], dim=2)  # (N, view, class c)
        # a film lying at k, turned j more, lies at (k + j) % 4; its mirror image turned j lies at (j - k) % 4
        # (mirroring reverses the sense of rotation): score(k) = sum over views of log p_view[where it lies]
        k = torch.arange(4)
        score = torch.zeros(len(x), 4, dtype=torch.float64)
        for v in range(n_views):
            mirrored, j = divmod(v, 4)
            lies = (j - k) % 4 if mirrored else (k + j) % 4
            score = score + rot_logp[:, v, lies]
        rot_probs = torch.softmax(score, dim=1).numpy()
        lateral = torch.softmax(logits[:, :, 4:], dim=2)[:, :, 1].mean(dim=1).numpy()
        return [
            OrientationPrediction(rotation_probs=tuple(float(p) for p in rot_probs[i]), lateral_prob=float(lateral[i]))
            for i in range(len(x))
        ]


@functools.lru_cache(maxsize=1)
def default_classifier() -> OrientationClassifier:
    """The committed classifier, loaded once per process (used when `orient` is given no classifier)."""
    return OrientationClassifier.load()


# ------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class OrientResult:
    """The orientation stage's output for one picture.

    Args:
        image: the corrected (upright) picture, same dtype and channels as the input.
        orientation: detected clockwise rotation of the INPUT, degrees (0/90/180/270).
        rotation_source: "list", "dicom", "model" or "none".
        qc: flags, in a fixed order: non_chest, lateral, blank, paediatric, orientation_uncertain.
        mirrored: a left-right flip was undone too (DICOM Patient Orientation only).
        skip: the config says flagged rows are not scored and this row has a flag.
        applied: the clockwise rotation actually undone (0 when an uncertain model verdict was not applied).
    """

    image: np.ndarray
    orientation: int
    rotation_source: RotationSource
    qc: list[str] = field(default_factory=list)
    mirrored: bool = False
    skip: bool = False
    applied: int = 0

    @property
    def corrects(self) -> bool:
        """True when the picture was turned or flipped."""
        return bool(self.applied) or self.mirrored


def correct_orientation(array: np.ndarray, applied: int, mirrored: bool) -> np.ndarray:
    """Undo a clockwise rotation (and a mirror) of an (H, W[, C]) array: the same operation `orient` applies.

    Used on the decoded film too, so the correction happens before the seed chain and a corrected film is
    pixel-identical to its upright original.
    """
    corrected = np.rot90(array, k=applied // 90)  # counter-clockwise by the detected clockwise rotation
    if mirrored:
        corrected = np.fliplr(corrected)
    return np.ascontiguousarray(corrected)


def dicom_non_chest(meta: Mapping[str, Any]) -> bool:
    """True when the DICOM header says the film shows something other than the chest.

    Reads BodyPartExamined, Study/Series Description, Protocol Name and the anatomic region code. A film is
    non-chest when some field names another body part (`NON_CHEST_WORDS`, e.g. EXTREMITY, HIP, HAND) or a
    non-chest region code, and no field names the chest (`CHEST_WORDS`, `CHEST_CODES`): "CHEST + ABDOMEN"
    stays a chest film. A header that says nothing gives no verdict (False here; the picture may still tell).
    """
    fields = [meta.get(k) for k in ("body_part", "study_description", "series_description", "protocol_name",
                                    "anatomic_region")]
    texts = [str(v).upper() for v in fields if v]
    if not texts:
        return False
    words = {w for text in texts for w in _WORD.findall(text.replace("_", " "))}
    codes = set(str(meta.get("anatomic_region") or "").split()[:1])
    if words & CHEST_WORDS or codes & CHEST_CODES:
        return False
    return bool(words & NON_CHEST_WORDS)


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


def plausible_age(age: float | None) -> tuple[float | None, bool]:
    """(age, False) for an age within `PLAUSIBLE_AGE` or unknown; (None, True) for an implausible one."""
    if age is None or not np.isfinite(age):
        return None, False
    low, high = PLAUSIBLE_AGE
    return (float(age), False) if low <= age <= high else (None, True)


def is_blank(image_u8: np.ndarray | Thumbnails) -> bool:
    """Near-uniform picture: the std of its 32x32 block means is under `BLANK_STD` 8-bit levels."""
    return float(Thumbnails.of(image_u8)(BLANK_GRID).std()) < BLANK_STD


def orient(
    image_u8: np.ndarray,
    *,
    image_id: str | None,
    uri: str | None,
    meta: Mapping[str, Any] | None,
    chronological_age: float | None,
    config: OrientConfig,
    classifiers: OrientationClassifier | None = None,
    prediction: OrientationPrediction | None = None,
) -> OrientResult:
    """Correct one seed-chain picture's orientation and flag it (see the module docstring).

    Args:
        image_u8: uint8 (H, W, C) picture from the seed chain.
        image_id, uri: the row's identifiers, matched against the rotation list.
        meta: decoder metadata (`patient_orientation`, `view_position`, ...); None or {} for raster files.
        chronological_age: years, or None when unknown.
        config: the job's `OrientConfig`.
        classifiers: the loaded `OrientationClassifier`; None loads the committed one once per process when needed.
        prediction: the classifier's verdict computed beforehand (batched, see `orient_batch`).
    """
    meta = meta or {}
    image = np.asarray(image_u8)
    listed = None
    if config.mode in ("auto", "list") and config.rotation_list:
        listed = lookup_rotation(config.rotation_list, image_id, uri)
    hint = dicom_orientation(meta) if config.mode == "auto" else None
    needs_rotation_model = config.mode == "auto" and listed is None and hint is None
    thumbs = Thumbnails(image)  # one grey copy for the classifier, the blank grid and the chest templates
    if prediction is None and (needs_rotation_model or config.use_view_model):
        prediction = (classifiers or default_classifier()).predict([thumbs])[0]

    blank = is_blank(thumbs)
    if meta:  # DICOM: the header says what the film shows
        non_chest = dicom_non_chest(meta)
    else:  # a raster file says nothing: judge the picture (a blank one is flagged `blank`, which says more)
        non_chest = (config.non_chest_likeness is not None and not blank
                     and picture_non_chest(thumbs, config.non_chest_likeness))
    qc: list[str] = [QC_NON_CHEST] if non_chest else []
    rotation, source, mirrored, uncertain = 0, "none", False, False
    if listed is not None:
        rotation, source = (-listed) % 360, "list"
    elif hint is not None:
        rotation, source, mirrored = hint.rotation, "dicom", hint.mirrored
    elif config.mode == "auto" and prediction is not None:
        rotation, source = prediction.rotation, "model"
        uncertain = prediction.confidence < config.uncertain_threshold

    # an uncertain model verdict is reported (orientation + qc flag) but not applied: turning an upright
    # film on a guess would corrupt its score, leaving a rotated one as it is only flags it
    applied = 0 if uncertain else rotation
    corrected = correct_orientation(image, applied, mirrored)

    lateral = dicom_is_lateral(meta) or (prediction is not None and prediction.lateral_prob > config.lateral_threshold)
    if lateral:
        qc.append(QC_LATERAL)
    if blank:
        qc.append(QC_BLANK)
    if chronological_age is not None and np.isfinite(chronological_age) and chronological_age < ADULT_AGE:
        qc.append(QC_PAEDIATRIC)
    if uncertain:
        qc.append(QC_ORIENTATION_UNCERTAIN)
    return OrientResult(
        image=corrected,
        orientation=int(rotation),
        rotation_source=source,  # type: ignore[arg-type]
        qc=qc,
        mirrored=mirrored,
        skip=config.skip_flagged and bool(qc),
        applied=applied,
    )


def orient_batch(
    images: Sequence[np.ndarray],
    *,
    image_ids: Sequence[str | None],
    uris: Sequence[str | None],
    metas: Sequence[Mapping[str, Any] | None],
    chronological_ages: Sequence[float | None],
    config: OrientConfig,
    classifiers: OrientationClassifier | None = None,
) -> list[OrientResult]:
    """`orient` for a batch, running the classifier once over all pictures that need it."""
    predictions: list[OrientationPrediction | None] = [None] * len(images)
    if config.mode == "auto" or config.use_view_model:
        predictions = list((classifiers or default_classifier()).predict(list(images)))
    return [
        orient(
            image,
            image_id=image_id,
            uri=uri,
            meta=meta,
            chronological_age=age,
            config=config,
            classifiers=classifiers,
            prediction=prediction,
        )
        for image, image_id, uri, meta, age, prediction in zip(
            images, image_ids, uris, metas, chronological_ages, predictions, strict=True
        )
    ]
