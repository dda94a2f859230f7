"""report: a scored OUTPUT folder -> the cohort analysis (`cxrage report`).

Reads the Parquet files `cxrage score` wrote under OUTPUT (plus OUTPUT/_cxrage/summary.json when present) and
writes OUTPUT/_cxrage/analysis.json (every number) and OUTPUT/_cxrage/report.html (one self-contained page).
Entry point: `cxrage_ray.report.analysis.write_report`; the modules' docstrings say what each takes and gives.
"""
