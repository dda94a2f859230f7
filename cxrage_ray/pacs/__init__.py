"""PACS: DICOMweb archives as an input (QIDO-RS query -> manifest rows, WADO-RS instance -> bytes) and an output
(CXR-Age Structured Reports stored by STOW-RS).

In:  ``dicomweb+http(s)://`` query and instance URLs, a `StorageConfig` (credentials, retries), OUTPUT for
     write-back. Out: manifest rows, instance bytes (`read.read_bytes` reads any input uri), stored reports plus
     their bookkeeping under OUTPUT/_cxrage/sr. Depends on `storage` (retries, files); storage never imports pacs.
"""
