"""Reading a manifest row's image: the one `read_bytes` for every input uri, DICOMweb instances included.

In:  a row's ``uri`` (a local path, any fsspec URL, or a ``dicomweb+http(s)://…/instances/<uid>`` instance URI),
     a `StorageConfig` and, optionally, a `RetryCounts` to count retries into.
Out: the file's bytes: a DICOMweb instance by WADO-RS in its stored transfer syntax (`pacs.dicomweb`), anything
     else by `storage.files.read_bytes`; both with `cxrage_ray.storage.retries`' retries, and failing as `ReadError`.

Why here: storage must not depend on pacs (pacs uses storage's retries), so the dispatch sits above both; the
scoring and export stages import this `read_bytes` for images, while reads of outputs, manifests and records
(never DICOMweb) use `storage.files.read_bytes` directly.
"""

from __future__ import annotations

from cxrage_ray.config import StorageConfig
from cxrage_ray.pacs.dicomweb import is_dicomweb, retrieve_instance_bytes
from cxrage_ray.storage.files import read_bytes as read_stored_bytes
from cxrage_ray.storage.retries import RetryCounts, with_retries


def read_bytes(uri: str, storage: StorageConfig, retries: RetryCounts | None = None) -> bytes:
    """The whole image at `uri`; each retry it took is added to `retries` by kind, when given.

    Raises:
        ReadError: as `storage.files.read_bytes` (missing, forbidden, unsupported scheme, retries spent); for a
            DICOMweb uri also a malformed instance URI or an archive answer that is not one DICOM file.
        EmptyFileError: a file or object of zero bytes (fsspec uris).
    """
    if is_dicomweb(uri):  # a PACS instance: one WADO-RS retrieve per attempt
        return with_retries(lambda: retrieve_instance_bytes(uri, storage), uri, storage, "read", retries)
    return read_stored_bytes(uri, storage, retries)
