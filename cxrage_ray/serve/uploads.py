"""HTTP request body -> `Upload`s, in memory only.

In:  the request's headers and its body stream.
Out: the multipart parts (`files` parts become `Upload`s; `age` fields their typed ages), or
     `UploadTooLarge` as soon as the body passes the limit (checked against Content-Length first, then
     while reading, so a client that lies about the length is cut off too).

Starlette's own form parser spools file parts above 1 MB to temporary files on disk; a radiograph must
never touch the server's disk, so the body is read into memory (bounded) and split with python-multipart's
low-level parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Mapping

from python_multipart.multipart import MultipartParser, parse_options_header


class UploadTooLarge(Exception):
    """The request body exceeds the configured limit (answered 413)."""


class BadForm(Exception):
    """The body is not a multipart form this API understands (answered 400)."""


@dataclass
class FormPart:
    """One multipart part: its field name, the client's file name (None for plain fields) and its bytes."""

    name: str
    filename: str | None
    data: bytearray = field(default_factory=bytearray)


async def read_body(headers: Mapping[str, str], stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refusing (`UploadTooLarge`) past `limit` bytes without reading the rest."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes")
    body = bytearray()
    async for chunk in stream:
        body.extend(chunk)
        if len(body) > limit:
            raise UploadTooLarge(f"request body exceeds the limit of {limit:,} bytes")
    return bytes(body)


def parse_multipart(content_type: str, body: bytes, max_parts: int) -> list[FormPart]:
    """Split a multipart/form-data body into parts, in order, all in memory."""
    mime, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise BadForm("send the files as multipart/form-data (a `files` field per file)")
    parts: list[FormPart] = []
    header_name, header_value = bytearray(), bytearray()
    headers: dict[bytes, bytes] = {}
    current: list[FormPart | None] = [None]

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part = FormPart(name, None if filename is None else filename.decode("utf-8", "replace"))
        if len(parts) >= max_parts:
            raise BadForm(f"too many parts (at most {max_parts} per request)")
        parts.append(part)
        current[0] = part

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current[0] is not None:
            current[0].data.extend(data[start:end])

    def on_part_end() -> None:
        current[0] = None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })
    try:
        parser.write(body)
        parser.finalize()
    except BadForm:
        raise
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise BadForm(f"malformed multipart body: {exc}") from exc
    return parts
