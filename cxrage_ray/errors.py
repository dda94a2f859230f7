"""Exception types a user can cause; each message says what to do about it.

Error rows in the output carry ``"<Kind>: message"`` where Kind is the exception's class name,
so the names here are part of the output contract.
"""

import math


class CxrAgeError(Exception):
    """Base class for errors caused by input, configuration or weights (not by bugs)."""


class InputError(CxrAgeError):
    """The INPUT path/manifest is missing, empty or malformed."""


class ManifestError(CxrAgeError):
    """A manifest row that names no readable image: empty uri or image_id, or an image_id already used by an
    earlier row. The row is not fetched; its message names the row (``row 17: empty uri``, row = ``row_id``)."""


class ReadError(CxrAgeError):
    """An image's bytes could not be fetched (missing file or object, permission, network, unsupported uri
    scheme); the message names the uri, whose scheme and host say where the read went."""


class EmptyFileError(ReadError):
    """The file exists but has zero bytes."""


class DecodeError(CxrAgeError):
    """The bytes are not a decodable image (corrupt, truncated, unsupported format)."""


class UnsupportedModalityError(DecodeError):
    """A DICOM whose modality is not a radiograph (CT, MR, ...)."""


class DecompressionBombError(DecodeError):
    """The declared image size is absurd (likely malicious or corrupt)."""


class FlaggedSkipped(CxrAgeError):
    """The film carries QC flags and `--skip-flagged` was given: not scored, on purpose."""


class StalledError(CxrAgeError):
    """The job made no progress for the configured time (e.g. the cluster cannot place the predictor)."""


class OutputError(CxrAgeError):
    """OUTPUT cannot be written (permissions, a full disk, a deleted bucket): the job stops at the first failed
    commit instead of scoring on; rows it could not write wait in a local spill for the rerun."""


class WeightsError(CxrAgeError):
    """Weights are missing, fail sha256 verification, or are not a CXR-Age checkpoint."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint pickle references a global outside the allowlist; nothing in it was executed."""


def error_text(exc: BaseException) -> str:
    """Render an exception as the output's ``error`` column: ``"<Kind>: message"``."""
    return f"{type(exc).__name__}: {exc}"


def error_kind(message: object) -> str:
    """The ``<Kind>`` of an ``error`` value ``"<Kind>: message"`` ('Unknown' when empty or missing)."""
    if message is None or (isinstance(message, float) and math.isnan(message)):  # a null in pandas
        return "Unknown"
    text = str(message).strip()
    return (text.split(":", 1)[0].strip() or "Unknown") if text else "Unknown"


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a scoring job after it committed what it had scored.

    Args:
        kept: what reached OUTPUT, for the user ("120 rows scored this run were written to out/ ...").
        terminated: it was SIGTERM (exit 143), not Ctrl-C (exit 130).
    """

    def __init__(self, kept: str, terminated: bool = False):
        super().__init__(kept)
        self.kept = kept
        self.terminated = terminated
