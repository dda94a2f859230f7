"""Manifest stage: INPUT -> the rows to score.

In:  a folder/prefix (local or fsspec URL), a CSV/Parquet manifest, or a DICOMweb query.
Out: a DataFrame with `row_id`, `image_id`, `uri`, the manifest's own columns carried through, and
     `PROBLEM_COLUMN` for rows that cannot be scored (blank uri, duplicate image_id); `cxrage manifest` writes it
     as Parquet for reuse.
"""
