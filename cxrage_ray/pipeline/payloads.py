"""Prepare stage of the device itinerary: manifest rows -> payload rows the scoring actor decodes on its GPU.

In:  a pandas batch of manifest rows and the job's `PrepareSettings`.
Out: the same rows, in the same order, with `PAYLOAD_COLUMNS` instead of a picture (`cxrage_ray.contract`), plus
     the age, QC and metadata every prepared row has (`cxrage_ray.pipeline.rows.finish_row`). DICOM: the header
     is parsed and frame 1's JPEG 2000 / JPEG codestream cut out, not decoded; other DICOM codecs and raster
     files are decoded here (PNG inflate has no GPU decoder) and shipped at their own depth. Never raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from cxrage_ray.config import PrepareSettings
from cxrage_ray.contract import PIXEL_COLUMNS, empty_prepared_row
from cxrage_ray.decode.dicom import EncodedFrame
from cxrage_ray.decode.dicom_window import GreyscaleParams
from cxrage_ray.decode.image import is_dicom
from cxrage_ray.decode.types import DecodedImage
from cxrage_ray.errors import CxrAgeError, error_text
from cxrage_ray.pipeline.prepare import prepare_rows
from cxrage_ray.pipeline.rows import finish_row

log = logging.getLogger(__name__)


def encode_row(data: bytes, name: str, settings: PrepareSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """One file's bytes -> (payload columns, decoder metadata). Raises `CxrAgeError` for a bad file."""
    if is_dicom(data, name):
        from cxrage_ray.decode.dicom import decode_dicom, encoded_first_frame

        frame = encoded_first_frame(data, settings.decode)
        if frame.codec in ("j2k", "jpeg") and frame.samples == 1:
            return {"payload": frame.codestream, "payload_kind": "codestream",
                    "payload_header": frame_header_json(frame), "alpha": b""}, frame.meta
        decoded = decode_dicom(data, settings.decode)  # JPEG-LS, RLE, lossless JPEG, native: CPU codecs
        return picture_payload(decoded), decoded.meta
    from cxrage_ray.decode.image import decode_image

    decoded = decode_image(data, name, settings.decode)  # raster, or an ACR-NEMA file found by content
    return picture_payload(decoded), decoded.meta


def picture_payload(decoded: DecodedImage) -> dict[str, Any]:
    """A decoded Q16 picture at its own depth: 8-bit sources (every value a multiple of 257) as uint8."""
    pixels = decoded.pixels
    eight_bit = pixels.dtype == np.uint8 or not np.any(pixels % 257)
    body = decoded.eight_bit() if eight_bit else pixels.astype(np.uint16)
    alpha = b"" if decoded.alpha is None else np.ascontiguousarray(decoded.alpha, dtype=np.uint16).tobytes()
    return {"payload": np.ascontiguousarray(body).tobytes(), "payload_kind": "grey8" if eight_bit else "q16",
            "payload_header": json.dumps({"shape": list(pixels.shape)}), "alpha": alpha}


def frame_header_json(frame: EncodedFrame) -> str:
    """An encoded frame's header facts and mapping parameters as JSON (it travels in `payload_header`)."""
    params = asdict(frame.params)
    if params["lut_data"] is not None:
        params["lut_data"] = [int(v) for v in params["lut_data"]]
    return json.dumps({"codec": frame.codec, "transfer_syntax": frame.transfer_syntax, "rows": frame.rows,
                       "columns": frame.columns, "samples": frame.samples, "bits_allocated": frame.bits_allocated,
                       "photometric": frame.photometric, "planar_configuration": frame.planar_configuration,
                       "params": params})


def frame_from_row(codestream: bytes, header_json: str) -> EncodedFrame:
    """`frame_header_json`'s inverse: the encoded frame a payload row carries."""
    header = json.loads(header_json)
    params = dict(header.pop("params"))
    if params["lut_data"] is not None:
        params["lut_data"] = np.asarray(params["lut_data"], dtype=np.uint16)
    return EncodedFrame(codestream=codestream, params=GreyscaleParams(**params), meta={}, **header)


def empty_payload_row() -> dict[str, Any]:
    """A payload row with every column and no payload yet: the prepared row's columns, the payload in place of the
    picture."""
    row = {key: value for key, value in empty_prepared_row().items() if key not in PIXEL_COLUMNS}
    return {**row, "payload": b"", "payload_kind": "", "payload_header": "", "alpha": b"", "meta_json": "{}"}


def prepare_encoded_row(row: Mapping[str, Any], settings: PrepareSettings, fetched: bytes | BaseException
                        ) -> dict[str, Any]:
    """One manifest row -> payload row (never raises)."""
    out = empty_payload_row()
    meta: dict[str, Any] = {}
    try:
        if isinstance(fetched, BaseException):
            raise fetched
        payload, meta = encode_row(fetched, str(row["uri"]), settings)
        out.update(payload, meta_json=json.dumps(meta, default=str))
    except CxrAgeError as exc:
        out.update(status="error", error=error_text(exc))
    except Exception as exc:  # an unexpected library failure: keep the row, keep going
        log.warning("unexpected %s while preparing row %s", type(exc).__name__, row.get("row_id"))
        out.update(status="error", error=error_text(exc))
    finish_row(out, meta, row, settings.age_column)
    return out


def prepare_encoded_batch(batch: pd.DataFrame, settings: PrepareSettings) -> pd.DataFrame:
    """Ray Data CPU stage of the device itinerary: manifest rows -> payload rows (same order, same count)."""
    return prepare_rows(batch, settings, prepare_encoded_row)
