"""The serve package's Ray-free parts: in-memory multipart parsing, the size limit, and what counts as an image."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("python_multipart")

from cxrage_ray.errors import EmptyFileError  # noqa: E402
from cxrage_ray.serve.scoring import NotAnImageError, Upload, check_is_image, error_object  # noqa: E402
from cxrage_ray.serve.uploads import BadForm, UploadTooLarge, parse_multipart, read_body  # noqa: E402

BOUNDARY = "xYzBoundary"


def _form(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def test_parts_come_back_in_order_with_their_bytes():
    payload = bytes(range(256)) * 5000  # > 1 MB: Starlette would spool this to disk; we keep it in memory
    body = _form([("files", "a.png", payload), ("age", None, b"61"), ("files", "b.dcm", b"\x00DICM")])
    parts = parse_multipart(f"multipart/form-data; boundary={BOUNDARY}", body, max_parts=10)
    assert [(p.name, p.filename) for p in parts] == [("files", "a.png"), ("age", None), ("files", "b.dcm")]
    assert bytes(parts[0].data) == payload and bytes(parts[1].data) == b"61"


def test_malformed_forms_are_refused():
    with pytest.raises(BadForm):
        parse_multipart("application/json", b"{}", max_parts=10)
    with pytest.raises(BadForm):
        parse_multipart(f"multipart/form-data; boundary={BOUNDARY}",
                        _form([("files", f"{i}.png", b"x") for i in range(3)]), max_parts=2)


def test_body_limit_by_header_and_by_bytes_read():
    async def stream(chunks):
        for c in chunks:
            yield c

    async def read(headers, chunks, limit):
        return await read_body(headers, stream(chunks), limit)

    assert asyncio.run(read({}, [b"ab", b"cd"], 4)) == b"abcd"
    with pytest.raises(UploadTooLarge):
        asyncio.run(read({"content-length": "5"}, [], 4))  # refused before reading anything
    with pytest.raises(UploadTooLarge):
        asyncio.run(read({"content-length": "3"}, [b"ab", b"cde"], 4))  # a client that lies about the length


def test_what_counts_as_an_image():
    for data, name in ((b"\x89PNG\r\n\x1a\n....", "x"), (b"\xff\xd8\xff\xe0", "x"), (b"II*\x00", "x"),
                       (b"\x00" * 128 + b"DICM", "x"), (b"anything", "film.dcm")):
        check_is_image(Upload(name, data))
    with pytest.raises(NotAnImageError):
        check_is_image(Upload("notes.png", b"hello, this is text"))
    with pytest.raises(EmptyFileError):
        check_is_image(Upload("empty.png", b""))
    error = error_object("x.txt", 3, "NotAnImageError: no")
    assert (error["status"], error["row_id"], error["filename"], error["cxr_age"]) == ("error", 3, "x.txt", None)
