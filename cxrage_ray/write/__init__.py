"""Write stage: scored rows -> OUTPUT.

In:  pyarrow tables of scored rows (the output contract, `cxrage_ray.contract`).
Out: whole Parquet parts under OUTPUT/parts, the job's records under OUTPUT/_cxrage (job.json, summary.json),
     the original tool's CSV on request (`parts`), and the local spill of parts OUTPUT refused (`spill`).
"""
