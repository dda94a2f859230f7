"""DICOMweb (QIDO-RS / WADO-RS) as an input: a query URL -> manifest rows, an instance URI -> bytes.

Two URL forms, both with the scheme ``dicomweb+http`` or ``dicomweb+https`` in front of the archive's
DICOMweb root (``http(s)://host[:port]/prefix``):

- a query: ``dicomweb+https://pacs:8042/dicom-web/?Modality=CR,DX&StudyDate=20150101-20201231`` — every
  query parameter is a QIDO-RS matching attribute (keyword or tag), passed to the archive unchanged;
  `list_instances` pages through the result with ``limit``/``offset``;
- an instance: ``dicomweb+https://pacs:8042/dicom-web/studies/<uid>/series/<uid>/instances/<uid>`` — what
  a manifest row's ``uri`` holds; `retrieve_instance_bytes` fetches it with WADO-RS in the transfer syntax
  the archive stored it in.

Credentials come from `StorageConfig` options (``dicomweb_token`` for a bearer token, or
``dicomweb_username`` + ``dicomweb_password`` for basic auth; the CLI fills them from ``CXRAGE_DICOMWEB_*``
environment variables), never from the URL, and never appear in logs or error messages. TLS certificates
are verified (``dicomweb_ca_bundle=/path.pem`` names a private CA). Retries with backoff are
`cxrage_ray.storage.retries.with_retries`' (around `retrieve_instance_bytes` in `cxrage_ray.pacs.read`, and
inside `list_instances` / `retrieve_instance_metadata`): each request makes one attempt and raises builtin
exception types that `storage.retries.is_transient` classifies.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pandas as pd

from cxrage_ray.errors import InputError
from cxrage_ray.pacs.multipart import (
    MultipartError,
    boundary_of,
    media_type,
    split_parts,
)
from cxrage_ray.storage.retries import with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMES = frozenset({"dicomweb+http", "dicomweb+https"})
#: QIDO-RS page size; the archive may return fewer per page (Orthanc: LimitFindInstances), which paging handles.
PAGE_SIZE = 500
#: Per-request timeout (connect, read) in seconds: an archive that stops answering becomes a retryable error.
REQUEST_TIMEOUT_S = (10.0, 120.0)
#: WADO-RS Accept header for an instance in whatever transfer syntax the archive stored it in.
ACCEPT_STORED_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Storage options read here (and kept out of every fsspec filesystem's keyword arguments).
OPTION_PREFIX = "dicomweb_"
#: Query parameters that steer QIDO-RS itself rather than match attributes.
_CONTROL_PARAMS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_UID = r"[0-9][0-9.]*"
_INSTANCE_PATH = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{_UID})/series/(?P<series>{_UID})"
                            rf"/instances/(?P<sop>{_UID})/?$")
# QIDO-RS JSON tags of the three UIDs and the SOP Class UID
_STUDY_TAG, _SERIES_TAG, _SOP_TAG, _SOP_CLASS_TAG = "0020000D", "0020000E", "00080018", "00080016"
#: SOP Classes of structured reports (PS3.4 B.5): never listed for scoring, so a broad query rerun after
#: `--write-back sr` lists the same instances as before.
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def is_dicomweb(url: str) -> bool:
    """True for ``dicomweb+http(s)://`` URLs (queries and instance URIs)."""
    return url.split("://", 1)[0].lower() in SCHEMES if "://" in url else False


@dataclass(frozen=True)
class DicomwebQuery:
    """A parsed query URL.

    Args:
        root: the archive's DICOMweb root as plain ``http(s)://host[:port]/prefix`` (no trailing slash).
        filters: QIDO-RS matching attributes as (name, value) pairs, in URL order.
    """

    root: str
    filters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class InstanceRef:
    """One instance in an archive: its DICOMweb root and its three UIDs."""

    root: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @property
    def uri(self) -> str:
        """The manifest ``uri``: ``dicomweb+<root>/studies/<uid>/series/<uid>/instances/<uid>``."""
        return (f"dicomweb+{self.root}/studies/{self.study_instance_uid}/series/{self.series_instance_uid}"
                f"/instances/{self.sop_instance_uid}")


def _split_root(url: str) -> tuple[str, str]:
    """``dicomweb+https://h:1/p/?q`` -> (``https://h:1/p``, ``q``); refuses credentials inside the URL."""
    if not is_dicomweb(url):
        raise InputError(f"not a DICOMweb URL (expected dicomweb+http:// or dicomweb+https://): {url}")
    parts = urlsplit(url.split("+", 1)[1])
    if parts.username or parts.password:
        raise InputError("put DICOMweb credentials in CXRAGE_DICOMWEB_TOKEN / CXRAGE_DICOMWEB_USERNAME + "
                         "CXRAGE_DICOMWEB_PASSWORD or --storage-option, not in the URL")
    if not parts.hostname:
        raise InputError(f"DICOMweb URL without a host: {url}")
    root = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    return root, parts.query


def parse_query(url: str) -> DicomwebQuery:
    """A query URL -> `DicomwebQuery`. ``limit``/``offset`` in the URL are refused (paging is ours).

    Raises:
        InputError: not a dicomweb+http(s) URL, credentials in the URL, or a paging parameter.
    """
    root, query = _split_root(url)
    filters = tuple(parse_qsl(query, keep_blank_values=True))
    paging = [k for k, _ in filters if k.lower() in ("limit", "offset")]
    if paging:
        raise InputError(f"leave {', '.join(paging)} out of the query: cxrage pages through every result itself")
    return DicomwebQuery(root=root, filters=filters)


def parse_instance_uri(uri: str) -> InstanceRef:
    """An instance URI -> `InstanceRef`.

    Raises:
        InputError: not of the form ``dicomweb+http(s)://host/prefix/studies/<uid>/series/<uid>/instances/<uid>``.
    """
    root, _ = _split_root(uri)
    match = _INSTANCE_PATH.match(root)
    if match is None:
        raise InputError(f"not a DICOMweb instance URI (…/studies/<uid>/series/<uid>/instances/<uid>): {uri}")
    return InstanceRef(match["root"], match["study"], match["series"], match["sop"])


def is_instance_uri(uri: str) -> bool:
    """True for a DICOMweb instance URI (as opposed to a query)."""
    return is_dicomweb(uri) and _INSTANCE_PATH.match(uri.split("?", 1)[0]) is not None


# ---------------------------------------------------------------- client


@dataclass(frozen=True)
class DicomwebAuth:
    """How to authenticate and verify TLS, from `StorageConfig` options (``dicomweb_*``).

    Args:
        token: bearer token (``Authorization: Bearer …``).
        username, password: HTTP basic auth (used when no token is given).
        ca_bundle: a PEM file of trusted CAs; None verifies against the system's store.
    """

    token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_bundle: str | None = None

    @classmethod
    def from_options(cls, options: tuple[tuple[str, Any], ...]) -> DicomwebAuth:
        found = {k[len(OPTION_PREFIX):]: v for k, v in options if k.startswith(OPTION_PREFIX)}
        unknown = sorted(set(found) - {"token", "username", "password", "ca_bundle"})
        if unknown:
            raise InputError(f"unknown storage option(s): {', '.join(OPTION_PREFIX + k for k in unknown)}; "
                             "DICOMweb takes dicomweb_token, dicomweb_username, dicomweb_password, dicomweb_ca_bundle")
        return cls(**{k: (None if v is None else str(v)) for k, v in found.items()})

    def __repr__(self) -> str:  # never show secrets
        return f"DicomwebAuth(token={'***' if self.token else None}, username={self.username!r}, " \
               f"password={'***' if self.password else None}, ca_bundle={self.ca_bundle!r})"


@functools.lru_cache(maxsize=16)
def session_for(root: str, auth: DicomwebAuth) -> Any:
    """A `requests.Session` for `root` with `auth`'s credentials and TLS settings (one per process and root, so
    connections are pooled); `client_for`'s client and `retrieve_instance_bytes` both send through it."""
    import requests

    session = requests.Session()
    session.verify = auth.ca_bundle or True
    if auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.username is not None:
        session.auth = (auth.username, auth.password or "")
    return session


@functools.lru_cache(maxsize=16)
def client_for(root: str, auth: DicomwebAuth) -> Any:
    """A `dicomweb_client.DICOMwebClient` for `root`, over `session_for`'s session.

    Its own retry loop is switched off: `cxrage_ray.storage.retries`' retries and backoff apply, as for object storage.
    """
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(root, session=session_for(root, auth), permissive_uid=True, timeout=REQUEST_TIMEOUT_S)
    client.set_http_retry_params(retry=False)
    return client


class DicomwebHTTPError(OSError):
    """An HTTP error status from the archive other than 401/403/404 (``status_code`` says which)."""

    def __init__(self, status_code: int, what: str) -> None:
        super().__init__(f"HTTP {status_code} from the archive on {what}")
        self.status_code = status_code


def translated(op: Callable[[], T], what: str) -> T:
    """Run `op`, turning `requests` errors into builtin types with messages free of URLs and credentials.

    404 -> FileNotFoundError, 401/403 -> PermissionError, other statuses -> `DicomwebHTTPError` (retried when
    429/5xx), connection failures -> ConnectionError, timeouts -> TimeoutError.
    """
    import requests

    try:
        return op()
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status == 404:
            raise FileNotFoundError(f"HTTP 404 on {what}") from None
        if status in (401, 403):
            raise PermissionError(f"HTTP {status} on {what}: check the DICOMweb credentials") from None
        raise DicomwebHTTPError(status, what) from None
    except requests.Timeout:
        raise TimeoutError(f"the archive did not answer in time ({what})") from None
    except requests.ConnectionError:
        raise ConnectionError(f"cannot connect to the archive ({what})") from None


# ---------------------------------------------------------------- QIDO-RS -> manifest


def iter_pages(search: Callable[[int, int], list[dict]], page_size: int = PAGE_SIZE) -> Iterator[list[dict]]:
    """Pages of a QIDO-RS search ``search(offset, limit)`` until one comes back empty.

    The offset advances by what each page held, not by `page_size`: an archive that caps pages below
    `page_size` (Orthanc's LimitFindInstances, a 2,000-row cap elsewhere) is still listed whole.
    """
    offset, short_page_at = 0, None
    while True:
        page = search(offset, page_size)
        if not page:
            return
        if short_page_at is not None:
            log.warning("the archive answered %d result(s) after a short page at offset %d: it caps QIDO-RS "
                        "answers; paging continues, but an archive that caps whole queries (Orthanc with "
                        "LimitFindInstances/LimitFindResults set) may hide results: narrow the query or lift the cap",
                        len(page), short_page_at)
            short_page_at = None
        elif len(page) < page_size:
            short_page_at = offset
        yield page
        offset += len(page)


def list_instances(url: str, storage: Any, page_size: int = PAGE_SIZE) -> list[InstanceRef]:
    """Every instance a query URL matches, each once, in the archive's order.

    Args:
        url: a query URL (see the module docstring).
        storage: a `StorageConfig` (credentials, retries, backoff).
        page_size: QIDO-RS ``limit`` per request.

    Raises:
        InputError: a malformed URL.
        ReadError: the archive failed a page after the storage retries.
    """
    query = parse_query(url)
    client = client_for(query.root, DicomwebAuth.from_options(storage.options))
    filters = {k: v for k, v in query.filters if k.lower() not in _CONTROL_PARAMS}
    extra = {k: v for k, v in query.filters if k.lower() in _CONTROL_PARAMS}

    def search(offset: int, limit: int) -> list[dict]:
        return with_retries(lambda: translated(lambda: client.search_for_instances(
            limit=limit, offset=offset, search_filters=filters, additional_params=extra or None,
            fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]), "QIDO-RS search"), url, storage, "list")

    seen: set[str] = set()
    found: list[InstanceRef] = []
    reports = 0
    for page in iter_pages(search, page_size):
        for item in page:
            uids = [_first_value(item, tag) for tag in (_STUDY_TAG, _SERIES_TAG, _SOP_TAG)]
            if None in uids or uids[2] in seen:
                continue
            seen.add(uids[2])
            if (_first_value(item, _SOP_CLASS_TAG) or "").startswith(SR_SOP_CLASS_PREFIX):
                reports += 1  # structured reports (ours included) have no image to score
                continue
            found.append(InstanceRef(query.root, *uids))
    if reports:
        log.info("left %d structured report(s) out of the listing", reports)
    return found


def query_manifest(url: str, storage: Any) -> pd.DataFrame:
    """Manifest columns for a query URL: ``image_id`` (the SOP Instance UID), ``uri`` and the three UIDs.

    Raises:
        InputError: the query matched nothing, or a malformed URL.
    """
    refs = list_instances(url, storage)
    if not refs:
        raise InputError(f"the DICOMweb query matched no instances: {url}")
    return pd.DataFrame({
        "image_id": [r.sop_instance_uid for r in refs],
        "uri": [r.uri for r in refs],
        "study_instance_uid": [r.study_instance_uid for r in refs],
        "series_instance_uid": [r.series_instance_uid for r in refs],
        "sop_instance_uid": [r.sop_instance_uid for r in refs],
    })


def with_uid_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``study_instance_uid`` / ``series_instance_uid`` / ``sop_instance_uid`` from DICOMweb uris where a
    manifest lacks them (null for other rows)."""
    missing = [c for c in ("study_instance_uid", "series_instance_uid", "sop_instance_uid") if c not in df.columns]
    if not missing:
        return df
    refs = [parse_instance_uri(u) if is_instance_uri(str(u)) else None for u in df["uri"]]
    if all(r is None for r in refs):
        return df
    df = df.copy()
    for column in missing:
        df[column] = pd.array([getattr(r, column) if r else None for r in refs], dtype="string")
    return df


def _first_value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


# ---------------------------------------------------------------- WADO-RS


def retrieve_instance_bytes(uri: str, storage: Any) -> bytes:
    """One WADO-RS retrieve of an instance URI, in the archive's stored transfer syntax, as Part-10 bytes.

    In:  an instance URI and a `StorageConfig` (credentials, TLS).
    Out: the stored file, unparsed. One attempt: `cxrage_ray.pacs.read.read_bytes` wraps it in the retries.
         Raises builtin exception types (see `translated`).
    """
    ref = parse_instance_uri(uri)
    session = session_for(ref.root, DicomwebAuth.from_options(storage.options))
    url = f"{ref.root}/studies/{ref.study_instance_uid}/series/{ref.series_instance_uid}/instances/{ref.sop_instance_uid}"

    def get() -> bytes:
        # Not `DICOMwebClient.retrieve_instance`: it parses each part with pydicom, which refuses archived
        # ACR-NEMA files (no preamble/File Meta) that our decoder reads, and dicomweb-client has no public call
        # returning an instance's raw bytes (`retrieve_bulkdata` refuses application/dicom). So: the same GET on
        # the client's session (same auth, TLS, pooled connections), and the multipart body split here.
        response = session.get(url, headers={"Accept": ACCEPT_STORED_SYNTAX}, timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        return _single_instance(response.headers.get("Content-Type", ""), response.content, response.status_code)

    return translated(get, "WADO-RS retrieve")


def _single_instance(content_type: str, body: bytes, status: int) -> bytes:
    """The one DICOM file of a WADO-RS instance answer (multipart/related with one part, or a bare file)."""
    if media_type(content_type) == "application/dicom":
        return body  # a single non-encapsulated part (some archives)
    if media_type(content_type) != "multipart/related":
        raise DicomwebHTTPError(status, f"WADO-RS retrieve (answered {media_type(content_type) or 'no Content-Type'})")
    if boundary_of(content_type) is None:
        return body  # multipart without a boundary: the single part sent as is (dicomweb-client accepts it too)
    try:
        parts = split_parts(content_type, body)
    except MultipartError as e:
        raise DicomwebHTTPError(status, f"WADO-RS retrieve ({e})") from None
    if len(parts) != 1:
        raise DicomwebHTTPError(status, f"WADO-RS retrieve ({len(parts)} parts, expected 1)")
    return parts[0]


def retrieve_instance_metadata(ref: InstanceRef, storage: Any) -> Any:
    """The instance's header (no bulk data) as a pydicom Dataset, via WADO-RS metadata, with storage retries."""
    import pydicom

    client = client_for(ref.root, DicomwebAuth.from_options(storage.options))
    meta = with_retries(lambda: translated(lambda: client.retrieve_instance_metadata(
        ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid), "WADO-RS metadata"),
        ref.uri, storage, "read")
    return pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
