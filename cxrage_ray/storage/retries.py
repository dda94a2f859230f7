"""Retries: which failures are transient, how long to back off, and the one retry loop every transport uses.

In:  an operation (a zero-argument callable making one attempt), the URI it is about, a `StorageConfig`
     (`retries`, `backoff_s`) and what kind of operation it is (``read``, ``list``, ``check``, ``write``).
Out: the operation's result, after retrying throttling, 5xx and connection errors with exponential backoff
     (with jitter); or a `ReadError` whose message names the uri and, for network trouble, the endpoint that
     failed (``connection refused by s3 endpoint 127.0.0.1:9``); writes re-raise the backend's own exception.

`with_retries` is the one retry loop: fsspec reads (`storage.files`) and DICOMweb requests (`pacs.dicomweb`)
both go through it, so every retry is seen here and counted by kind (`retry_kind`: ``SlowDown``,
``ConnectionReset`` …) into the caller's `RetryCounts`. Messages never add a local path beyond the uri itself
(an OSError's own text would repeat the resolved absolute path).

A leaf of the storage package: it imports no filesystem library, so any transport can use it.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TypeVar

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import ReadError
from cxrage_ray.storage.uris import endpoint_of

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Retries by kind (`retry_kind`), filled by `with_retries` for the caller that passes one.
RetryCounts = Counter

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
#: S3 error codes that mean "slow down" rather than "broken".
_THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequests"})
#: Ceiling for one backoff sleep, so a long throttling episode still polls now and then.
MAX_BACKOFF_S = 30.0


def with_retries(op: Callable[[], T], uri: str, storage: StorageConfig, what: str,
                 counts: RetryCounts | None = None, path: str | None = None) -> T:
    """Run `op`, retrying transient failures with backoff; each retry is added to `counts` by `retry_kind`.

    In:  `op` makes one attempt; `uri` is what it is about (named in messages); `what` is ``read``, ``list``,
         ``check`` or ``write``; `path` is the backend's spelling of `uri` (a resolved local path), kept out of
         the message.
    Out: `op`'s result. Reads, lists and checks fail as `ReadError` (missing and forbidden objects at once,
         transient errors once `storage.retries` are spent); writes re-raise the backend's own exception.
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
                        what, uri, short_text(e), attempt + 1, storage.retries, delay)
            time.sleep(delay)
            attempt += 1


def backoff_delay(attempt: int, storage: StorageConfig) -> float:
    """Seconds before retry `attempt` (0-based): backoff_s * 2**attempt, capped, times a jitter in [0.5, 1)."""
    return min(MAX_BACKOFF_S, storage.backoff_s * (2**attempt)) * (0.5 + random.random() / 2)


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
    """`exc` and what caused it (``__cause__`` / ``__context__``), outermost first, each once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return chain


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
    return _kind_from_names(chain)


def _kind_from_names(chain: list[BaseException]) -> str:
    """`retry_kind` for failures without a status: told by the exception classes' names and messages."""
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


def _failure(e: BaseException, uri: str, storage: StorageConfig) -> str:
    """What went wrong with a transient failure, said with the endpoint it came from."""
    kind = retry_kind(e)
    peer = endpoint_of(uri, storage)
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
    """The `ReadError` a failed read/list/check becomes (see `with_retries`)."""
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
    text = short_text(e)
    if path and path != uri and path in text:
        text = text.replace(path, uri)
    return text


def short_text(exc: BaseException) -> str:
    """An exception's message (its class name when it has none), cut to 300 characters for logs and errors."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
