"""Decoder failures in words a radiology IT person can act on.

In:  an exception a decoding library raised (Pillow, libpng through imagecodecs, tifffile, pydicom, pylibjpeg,
     numpy while filling a frame).
Out: one short sentence saying what is wrong with the file — never a library's internal names, array shapes or
     local paths. The callers raise `DecodeError(... plain_reason(exc)) from exc`, so the original exception stays
     chained for the logs.

A row used to say `could not broadcast input array from shape (900000000,) into shape (262144,)` (a DICOM whose
codestream held other dimensions than its header) or name `PngImagePlugin.MAX_TEXT_CHUNK`.
"""

from __future__ import annotations

import re
import zlib

#: (pattern in the library's message, what it means for the file). First match wins; patterns are lower case.
_KNOWN = (
    (r"could not broadcast|cannot reshape|buffer is smaller|buffer size|doesn't match the expected|"
     r"does not match the expected|is too short to contain",
     "the pixel data holds another number of pixels than the header declares (corrupt or mislabelled file)"),
    (r"max_text_chunk|text chunk|too much memory used in text|decompressed data too large",
     "it carries a metadata (text) chunk too large to be trusted (over the decoders' limit); the file is "
     "malformed or hostile"),
    (r"crc",
     "a checksum inside the file does not match its data (damaged in storage or transfer)"),
    (r"truncated|premature end|unexpected end|not enough data|end of file|eof|too short|insufficient data",
     "the file ends before its image data does (truncated)"),
    (r"broken data stream|error -3 while decompressing|invalid (stored )?block|incorrect (header|data) check|"
     r"invalid distance|invalid code|decompress|corrupt|huffman|bogus|marker",
     "its compressed image data is damaged"),
    (r"cannot identify image|unknown image file format|not a png|not a tiff|not a jpeg|invalid (png|tiff|jpeg)",
     "it is not a readable image of the format it claims"),
    (r"unsupported|not supported|not implemented|no decoder|cannot handle|unknown compression",
     "it uses an encoding this decoder does not support"),
)


def plain_reason(error: BaseException) -> str:
    """A short, plain account of why a decoder failed on a file (see the module docstring)."""
    if isinstance(error, MemoryError):
        return "decoding it needs more memory than the worker has (declared size too large for its contents)"
    if isinstance(error, zlib.error):
        return "its compressed image data is damaged"
    if isinstance(error, EOFError):
        return "the file ends before its image data does (truncated)"
    text = " ".join(str(error).split()).lower()
    for pattern, meaning in _KNOWN:
        if re.search(pattern, text):
            return meaning
    return "the decoder could not read its image data (corrupt or unsupported file)"
