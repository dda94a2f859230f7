"""Storage: fsspec files and objects (local paths, file://, s3://, any fsspec protocol).

In:  a URI or local path plus a `StorageConfig` (built once from `--storage-option key=value` flags).
Out: bytes, listings and writes, with the retries of `storage.retries` (backoff with jitter on throttling, 5xx
     and connection errors); a missing object fails at once with `ReadError("not found: <uri>")`.

Every failed read is a `ReadError` whose message names the uri (so its scheme and host) and, for network
trouble, the endpoint that failed; an unsupported scheme is ``cannot read gopher://h/x: unsupported scheme
'gopher'``. For S3, botocore's and s3fs's own retries are switched off unless
``--storage-option config_kwargs.retries.…`` configures botocore, so that every retry is `with_retries`'.

DICOMweb instance URIs are no fsspec protocol: `cxrage_ray.pacs.read.read_bytes` reads those (by WADO-RS) and
hands every other uri to `read_bytes` here, so this package never imports `pacs`.

Filesystem instances are cached per process by fsspec itself (its instance cache is keyed on the
protocol and options, and is reset in a forked child), so Ray workers build each one once.
Credentials never appear in logs or reprs: `StorageConfig` redacts secret-looking option values.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cxrage_ray.config import LOCAL_PROTOCOLS, S3_PROTOCOLS, StorageConfig
from cxrage_ray.errors import EmptyFileError, ReadError
from cxrage_ray.storage.atomic import write_atomic
from cxrage_ray.storage.retries import RetryCounts, short_text, with_retries
from cxrage_ray.storage.uris import protocol_of


def is_local(url: str) -> bool:
    """True for local paths and ``file://`` / ``local://`` URLs."""
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
                        f"({short_text(e)})") from e


def read_bytes(uri: str, storage: StorageConfig, retries: RetryCounts | None = None) -> bytes:
    """The whole object/file at `uri`; each retry it took is added to `retries` by kind, when given.

    Raises:
        ReadError: ``"not found: <uri>"`` for a missing object (no retry), permission errors, an unsupported
            scheme, or transient errors that outlasted `storage.retries`.
        EmptyFileError: the object exists but has zero bytes.
    """
    fs, path = _filesystem_to_read(uri, storage)
    # s3fs would first HEAD the object to decide on concurrent range reads (useful only far above image
    # sizes); one GET per object halves requests and latency at archive scale.
    kwargs = {"max_concurrency": 1} if protocol_of(uri) in S3_PROTOCOLS else {}
    data = with_retries(lambda: fs.cat_file(path, **kwargs), uri, storage, "read", retries, path)
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
        write_atomic(path, data)
        return
    with_retries(lambda: fs.pipe_file(path, data), uri, storage, "write")


def exists(uri: str, storage: StorageConfig) -> bool:
    """True when a file/object or a folder/prefix exists at `uri` (asks the store, not a cached listing)."""
    fs, path = _filesystem_to_read(uri, storage)
    fs.invalidate_cache(path)
    return bool(with_retries(lambda: fs.exists(path), uri, storage, "check"))


def list_files(prefix: str, storage: StorageConfig) -> list[str]:
    """Every file under `prefix`, recursively, sorted, as full URIs in the style of `prefix`.

    ``s3://b/p`` lists to ``["s3://b/p/x.png", ...]``; a local folder to absolute paths (``file://`` kept
    when given). A missing prefix lists as ``[]``; a single file lists as itself. A local symlink to a file is
    listed (archives link films into study folders); a symlink to a folder is neither listed nor followed
    (it is no file to read, and following links could list a film twice or loop).
    """
    fs, path = _filesystem_to_read(prefix, storage)
    fs.invalidate_cache(path)  # a listing is done once per job: it must see the store, not a stale cache
    found = with_retries(lambda: fs.find(path, withdirs=False, detail=True), prefix, storage, "list")
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
