"""What a URI names, from its text alone: its scheme, and the endpoint a request for it goes to.

In:  a URI or local path (and, for the endpoint, the `StorageConfig` that may name an S3 endpoint).
Out: ``protocol_of("s3://b/k") == "s3"``; ``endpoint_of`` -> ``"s3 endpoint 127.0.0.1:9"`` for messages.

A leaf: nothing here touches a filesystem or the network, so `storage.retries` and `storage.files` both use it.
"""

from __future__ import annotations

import re

from cxrage_ray.config import S3_PROTOCOLS, StorageConfig

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``"file"`` for local paths and ``file://`` URLs (scheme lower-cased)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def endpoint_of(uri: str, storage: StorageConfig) -> str:
    """Where a request for `uri` went, for error messages: ``s3 endpoint 127.0.0.1:9``, ``s3``, ``<scheme> host <h>``.

    In:  a URI and the storage options (an S3 endpoint may come from `endpoint_url` or the options).
    Out: a short phrase naming no credentials (the URI's host only, never its path).
    """
    protocol = protocol_of(uri)
    if protocol in S3_PROTOCOLS:
        endpoint = storage.endpoint_url or dict(storage.options).get("endpoint_url")
        if endpoint:
            return f"s3 endpoint {str(endpoint).split('://', 1)[-1].rstrip('/')}"
        return "s3"
    host = uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""
    return f"{protocol} host {host}" if host else protocol
