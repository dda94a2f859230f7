"""Storage: the one place that knows about URLs (local paths, file://, s3://, any fsspec protocol).

In:  a URI or local path plus a `StorageConfig` (built once from `--storage-option key=value` flags).
Out: bytes, listings and writes, with retries + exponential backoff (with jitter) on throttling, 5xx
     and connection errors; a missing object fails at once with `ReadError("not found: <uri>")`.

Every failed read is a `ReadError` whose message names the uri (so its scheme and host) and, for
network trouble, the endpoint that failed (``connection refused by s3 endpoint 127.0.0.1:9``); an
unsupported scheme is ``cannot read gopher://h/x: unsupported scheme 'gopher'``. Messages never add a
local path beyond the uri itself (an OSError's own text would repeat the resolved absolute path).

`_with_retries` is the one retry loop: for S3, botocore's and s3fs's own retries are switched off unless
``--storage-option config_kwargs.retries.…`` configures botocore, so that every retry is seen here and
counted by kind (`retry_kind`: ``SlowDown``, ``ConnectionReset`` …) into the caller's `RetryCounts`.

Filesystem instances are cached per process by fsspec itself (its instance cache is keyed on the
protocol and options, and is reset in a forked child), so Ray workers build each one once.
Credentials never appear in logs or reprs: `StorageConfig` redacts secret-looking option values.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cxrage_ray.config import LOCAL_PROTOCOLS, S3_PROTOCOLS, StorageConfig
from cxrage_ray.errors import EmptyFileError, ReadError

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Retries by kind (`retry_kind`), filled by `_with_retries` for the caller that passes one.
RetryCounts = Counter

#: DICOMweb instance URIs (``dicomweb+https://host/prefix/studies/…/instances/<uid>``), read by WADO-RS.
DICOMWEB_PROTOCOLS = frozenset({"dicomweb+http", "dicomweb+https"})
#: HTTP statuses and S3 error codes worth retrying: throttling and server-side trouble.
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "500", "502", "503", "504",
})
#: errno values fsspec backends use for transient trouble (s3fs maps SlowDown/503 -> EBUSY, 500 -> EREMOTEIO).
_TRANSIENT_ERRNO = frozenset({
    errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
    errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, getattr(errno, "EREMOTEIO", errno.EIO),
})
#: Exception class names (from botocore / aiohttp / urllib3, matched by name so none is a hard dependency)
#: that mean the connection, not the request, failed.
_TRANSIENT_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
    "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError", "HTTPClientError",
})
#: Ceiling for one backoff sleep, so a long throttling episode still polls now and then.
MAX_BACKOFF_S = 30.0


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``"file"`` for local paths and ``file://`` URLs."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", url)
    return match.group(1).lower() if match else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in LOCAL_PROTOCOLS


def filesystem_for(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path; instances come from fsspec's per-process cache.

    Local paths are made absolute and normalised (`../x` -> `/abs/x`), so listings and prefixes compare.
    """
    if "://" not in url:
        url = os.path.abspath(url)
    protocol = protocol_of(url)
    fs, path = fsspec.core.url_to_fs(url, **storage.fs_options(protocol))
    if protocol in S3_PROTOCOLS and not storage.client_retries_configured():
        # s3fs retries SlowDown and broken bodies itself (5 tries, no option for it); this instance is ours
        # alone (its options differ from any user-tuned one), so one attempt here leaves retrying to us
        fs.retries = 1
    return fs, path


def _filesystem_to_read(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem_for`, with an unknown or uninstalled scheme as a `ReadError` naming the uri."""
    try:
        return filesystem_for(uri, storage)
    except ValueError as e:  # fsspec: "Protocol not known: gopher"
        raise ReadError(f"cannot read {uri}: unsupported scheme {protocol_of(uri)!r}") from e
    except ImportError as e:  # a known scheme whose backend is not installed ("Install s3fs to access S3")
        raise ReadError(f"cannot read {uri}: scheme {protocol_of(uri)!r} needs a package that is not installed "
                        f"({_short(e)})") from e


def read_bytes(uri: str, storage: StorageConfig, retries: RetryCounts | None = None) -> bytes:
    """The whole object/file at `uri`; each retry it took is added to `retries` by kind, when given.

    Raises:
        ReadError: ``"not found: <uri>"`` for a missing object (no retry), permission errors, an unsupported
            scheme, or transient errors that outlasted `storage.retries`.
        EmptyFileError: the object exists but has zero bytes.
    """
    if protocol_of(uri) in DICOMWEB_PROTOCOLS:  # a PACS instance: WADO-RS retrieve (cxrage_ray.pacs.dicomweb)
        from cxrage_ray.pacs.dicomweb import retrieve_instance_bytes

        return _with_retries(lambda: retrieve_instance_bytes(uri, storage), uri, storage, "read", retries)
    fs, path = _filesystem_to_read(uri, storage)
    # s3fs would first HEAD the object to decide on concurrent range reads (useful only far above image
    # sizes); one GET per object halves requests and latency at archive scale.
    kwargs = {"max_concurrency": 1} if protocol_of(uri) in S3_PROTOCOLS else {}
    data = _with_retries(lambda: fs.cat_file(path, **kwargs), uri, storage, "read", retries, path)
    if not data:
        raise EmptyFileError(f"file is empty (0 bytes): {uri}")
    return data


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write `data` to `uri` so it appears whole or not at all.

    Local: a temporary file in the same folder, fsync'd, then renamed over the target (parents created).
    Object stores: one PUT (an S3 object becomes visible only when its upload completes).
    """
    fs, path = filesystem_for(uri, storage)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(path, data)
        return
    _with_retries(lambda: fs.pipe_file(path, data), uri, storage, "write")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (brief, but the only portable way)
    os.umask(mask)
    return mask


def _write_local_atomic(path: str, data: bytes) -> None:
    """Temp file in the target's folder, fsync, rename. The file gets the mode `open()` would give it
    (0666 minus the umask), not mkstemp's 0600; the temp name does not end like the target (a reader
    globbing `*.parquet` never sees a half-written part)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=f"-{os.path.basename(path)}.tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def exists(uri: str, storage: StorageConfig) -> bool:
    """True when a file/object or a folder/prefix exists at `uri` (asks the store, not a cached listing)."""
    fs, path = _filesystem_to_read(uri, storage)
    fs.invalidate_cache(path)
    return bool(_with_retries(lambda: fs.exists(path), uri, storage, "check"))


def list_files(prefix: str, storage: StorageConfig) -> list[str]:
    """Every file under `prefix`, recursively, sorted, as full URIs in the style of `prefix`.

    ``s3://b/p`` lists to ``["s3://b/p/x.png", ...]``; a local folder to absolute paths (``file://`` kept
    when given). A missing prefix lists as ``[]``; a single file lists as itself. A local symlink to a file is
    listed (archives link films into study folders); a symlink to a folder is neither listed nor followed
    (it is no file to read, and following links could list a film twice or loop).
    """
    fs, path = _filesystem_to_read(prefix, storage)
    fs.invalidate_cache(path)  # a listing is done once per job: it must see the store, not a stale cache
    found = _with_retries(lambda: fs.find(path, withdirs=False, detail=True), prefix, storage, "list")
    files = [p for p, info in found.items() if not _is_folder_link(p, info, fs)]
    keep_protocol = "://" in prefix
    return sorted(fs.unstrip_protocol(p) if keep_protocol else p for p in files)


def _is_folder_link(path: str, info: Mapping[str, Any], fs: fsspec.AbstractFileSystem) -> bool:
    """A local symlink whose target is a folder (fsspec lists every link as a file of type 'other')."""
    return isinstance(fs, LocalFileSystem) and bool(info.get("islink")) and os.path.isdir(path)


def join_uri(base: str, relative: str) -> str:
    """Resolve a relative posix path against a folder URI/path (``..`` and ``.`` collapsed)."""
    relative = relative.replace("\\", "/")
    proto = protocol_of(base)
    if "://" in base:
        head, rest = base.split("://", 1)
        joined = posixpath.normpath(posixpath.join("/" + rest, relative)).lstrip("/")
        return f"{head}://{joined}" if proto not in LOCAL_PROTOCOLS else f"{head}:///{joined}"
    return os.path.normpath(os.path.join(os.path.abspath(base), relative))


def parent_uri(uri: str) -> str:
    """The folder holding `uri` (``s3://b/d/m.csv`` -> ``s3://b/d``; local -> absolute folder path)."""
    if "://" in uri:
        head, rest = uri.split("://", 1)
        return f"{head}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(uri))


# ---------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, 5xx, timeouts, connection trouble. Never missing/forbidden objects."""
    for e in _causes(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):  # botocore ClientError
            err = response.get("Error", {}) or {}
            status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            if err.get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
                return True
        status = getattr(e, "status", None) or getattr(e, "status_code", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
    return False


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return chain


def backoff_delay(attempt: int, storage: StorageConfig) -> float:
    """Seconds before retry `attempt` (0-based): backoff_s * 2**attempt, capped, times a jitter in [0.5, 1)."""
    return min(MAX_BACKOFF_S, storage.backoff_s * (2**attempt)) * (0.5 + random.random() / 2)


def with_retries(op: Callable[[], T], uri: str, storage: StorageConfig, what: str) -> T:
    """`op` with this module's retries and backoff, for other transports (DICOMweb); see `_with_retries`."""
    return _with_retries(op, uri, storage, what)


def _with_retries(op: Callable[[], T], uri: str, storage: StorageConfig, what: str,
                  counts: RetryCounts | None = None, path: str | None = None) -> T:
    """Run `op`, retrying transient failures with backoff; each retry is added to `counts` by `retry_kind`.

    Reads, lists and checks fail as `ReadError` (missing and forbidden objects at once, transient errors once
    `storage.retries` are spent); writes re-raise the backend's own exception. `path`: the backend's spelling
    of `uri` (a resolved local path), kept out of the message.
    """
    attempt = 0
    while True:
        try:
            return op()
        except Exception as e:
            transient = is_transient(e)
            if not transient or attempt >= storage.retries:
                if what == "write":
                    raise
                raise _as_read_error(e, uri, what, transient, attempt + 1, storage, path) from e
            if counts is not None:
                counts[retry_kind(e)] += 1
            delay = backoff_delay(attempt, storage)
            log.warning("transient error on %s %s (%s); retry %d/%d in %.2fs",
                        what, uri, _short(e), attempt + 1, storage.retries, delay)
            time.sleep(delay)
            attempt += 1


#: S3 error codes that mean "slow down" rather than "broken".
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequests"})


def retry_kind(exc: BaseException) -> str:
    """A short name for why a transient failure happened, for counting: the S3 error code (``SlowDown``,
    ``ServiceUnavailable``), ``HTTP503`` for a bare status, else ``ConnectionReset``, ``ConnectionRefused``,
    ``Timeout``, ``IncompleteBody`` or the exception's class name."""
    chain = _causes(exc)
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):  # botocore ClientError
            code = (response.get("Error", {}) or {}).get("Code")
            status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            if code:
                return str(code)
            if status:
                return f"HTTP{status}"
    for e in chain:
        status = getattr(e, "status", None) or getattr(e, "status_code", None)
        if isinstance(status, int):
            return f"HTTP{status}"
    names = [cls.__name__ for e in chain for cls in type(e).__mro__]
    text = " ".join(str(e).lower() for e in chain)
    for kind, hints in (
        ("ConnectionRefused", ("ConnectionRefusedError", "connection refused", "connect call failed")),
        ("ConnectionReset", ("ConnectionResetError", "reset by peer", "connection reset", "ServerDisconnectedError")),
        ("Timeout", ("TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "timed out")),
        ("IncompleteBody", ("IncompleteRead", "IncompleteReadError", "ClientPayloadError", "ResponseStreamingError",
                            "not completed", "payload")),
    ):
        if any(h in names or h in text for h in hints):
            return kind
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.EBUSY,):  # s3fs: SlowDown / 503, code lost
            return "SlowDown"
    return type(chain[-1]).__name__


def _peer(uri: str, storage: StorageConfig) -> str:
    """Where a read of `uri` went: ``s3 endpoint 127.0.0.1:9`` / ``s3`` / the uri's ``scheme host``."""
    protocol = protocol_of(uri)
    if protocol in S3_PROTOCOLS:
        endpoint = storage.endpoint_url or dict(storage.options).get("endpoint_url")
        if endpoint:
            return f"s3 endpoint {str(endpoint).split('://', 1)[-1].rstrip('/')}"
        return "s3"
    host = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""
    return f"{protocol} host {host}" if host else protocol


def _failure(e: BaseException, uri: str, storage: StorageConfig) -> str:
    """What went wrong with a transient failure, said with the endpoint it came from."""
    kind = retry_kind(e)
    peer = _peer(uri, storage)
    if kind == "ConnectionRefused":
        return f"connection refused by {peer}"
    if kind == "ConnectionReset":
        return f"connection reset by {peer}"
    if kind == "Timeout":
        return f"timed out waiting for {peer}"
    if kind == "IncompleteBody":
        return f"{peer} ended the body early"
    if kind in _THROTTLE_CODES:
        return f"throttled by {peer} ({kind})"
    return f"{kind} from {peer}"


def _as_read_error(e: Exception, uri: str, what: str, transient: bool, attempts: int,
                   storage: StorageConfig | None = None, path: str | None = None) -> ReadError:
    storage = storage or StorageConfig()
    if isinstance(e, FileNotFoundError):
        return ReadError(f"not found: {uri}")
    if isinstance(e, PermissionError):
        return ReadError(f"permission denied: {uri}")
    if isinstance(e, IsADirectoryError):
        return ReadError(f"is a folder, not a file: {uri}")
    if transient:
        return ReadError(f"could not {what} {uri} after {attempts} attempts (throttled or unreachable): "
                         f"{_failure(e, uri, storage)}")
    return ReadError(f"could not {what} {uri}: {error_reason(e, uri, path)}")


def error_reason(e: BaseException, uri: str = "", path: str | None = None) -> str:
    """An exception's message without local paths the uri does not already hold: an OSError about a file says only
    its strerror (not the resolved or temporary path), and the backend's spelling of the path becomes the uri."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return e.strerror.lower()
    text = _short(e)
    if path and path != uri and path in text:
        text = text.replace(path, uri)
    return text


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
