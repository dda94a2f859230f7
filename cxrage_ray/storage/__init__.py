"""Storage: bytes in and out of local disks and object stores (any fsspec URL), whole or not at all.

In:  URIs or local paths and a `StorageConfig`. Out: bytes, listings and atomic writes, retried with backoff.
Modules: `uris` (what a URI names), `retries` (transient errors, backoff, the retry loop), `files` (fsspec reads,
writes, listings), `atomic` (local atomic writes), `digest` (sha256 of a file). Never imports `pacs`: DICOMweb
reads go through `cxrage_ray.pacs.read`, which sits above both.
"""
