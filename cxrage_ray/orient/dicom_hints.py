"""What a DICOM header says about a film: how its pixels lie, whether it is a lateral, whether it shows the chest.

In:  the decoder's metadata mapping (`patient_orientation`, `view_position`, `body_part`, `study_description`,
     `series_description`, `protocol_name`, `anatomic_region`); {} for raster files.
Out: `dicom_orientation` (rotation / mirroring / lateral from Patient Orientation (0020,0020), or None),
     `dicom_is_lateral` and `dicom_non_chest` (bools). Pure functions, no pixels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: DICOM View Position (0018,5101) values that mean a lateral projection (LL/RL are the defined terms;
#: the others are seen in the wild). Decubitus (RLD/LLD) and obliques are frontal-ish and not flagged.
LATERAL_VIEW_POSITIONS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT", "XTABLE LATERAL"})
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
#: The header fields read for `dicom_non_chest`.
_DESCRIPTION_FIELDS = ("body_part", "study_description", "series_description", "protocol_name", "anatomic_region")
_WORD = re.compile(r"[A-Z]+")
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

    What we do with flips: `cxrage_ray.orient.stage.orient` undoes them too (`np.fliplr` after the rotation),
    because the age model was trained without flip augmentation (spec: `get_transforms(do_flip=False)`) and the
    original hand-fixed flipped NLST films (`-flip/-flop`). `orientation` still reports only the rotation part.

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


def dicom_non_chest(meta: Mapping[str, Any]) -> bool:
    """True when the DICOM header says the film shows something other than the chest.

    Reads BodyPartExamined, Study/Series Description, Protocol Name and the anatomic region code. A film is
    non-chest when some field names another body part (`NON_CHEST_WORDS`, e.g. EXTREMITY, HIP, HAND) or a
    non-chest region code, and no field names the chest (`CHEST_WORDS`, `CHEST_CODES`): "CHEST + ABDOMEN"
    stays a chest film. A header that says nothing gives no verdict (False here; the picture may still tell).
    """
    texts = [str(value).upper() for value in (meta.get(k) for k in _DESCRIPTION_FIELDS) if value]
    if not texts:
        return False
    words = {w for text in texts for w in _WORD.findall(text.replace("_", " "))}
    codes = set(str(meta.get("anatomic_region") or "").split()[:1])
    if words & CHEST_WORDS or codes & CHEST_CODES:
        return False
    return bool(words & NON_CHEST_WORDS)
