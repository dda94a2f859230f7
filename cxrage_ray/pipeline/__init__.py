"""The itineraries: how a job's films travel from the manifest to OUTPUT.

In:  a `ScoreConfig` (`cxrage score`), or INPUT and OUTDIR (`cxrage preprocess`).
Out: OUTPUT's parts and records, the summary (`itinerary.score`, read it top to bottom); the seed-chain PNGs
     (`export`). The plan (`plan`) picks one of two picture sources — CPU-prepared (`prepare`) or decoded on the
     GPU (`payloads` + `device_pictures`) — for the one scoring actor; `rows` holds the row rules both share,
     `resume` and `summary` the job's bookkeeping.
"""
