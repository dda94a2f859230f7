"""Manifest stage: INPUT -> the rows to score.

In:  a folder/prefix (local or fsspec URL), a CSV/Parquet manifest, or a DICOMweb query.
Out: `open_manifest` (build.py) opens INPUT without reading a Parquet manifest's rows; `scan_manifest` (stream.py)
     reads every row once for the job fingerprint and duplicate ids at ~9 bytes a row; `manifest_batches` streams
     the rows (`row_id`, `image_id`, `uri`, the manifest's own columns, `PROBLEM_COLUMN` for rows that cannot be
     scored: blank uri/image_id, duplicate image_id). `build_manifest` gathers them into one DataFrame;
     `cxrage manifest` writes it as Parquet in 64k-row row groups, which then streams.
"""
