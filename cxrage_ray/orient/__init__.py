"""Orientation stage: seed-chain picture + the row's ids, DICOM metadata and age -> upright picture + qc flags.

In:  a seed-chain uint8 picture (H, W, C), the row's image_id / uri, the decoder's metadata, the chronological age
     and the job's `cxrage_ray.config.OrientConfig` (its `RotationList`, thresholds, mode).
Out: `cxrage_ray.orient.stage.OrientResult`: the corrected picture, the detected clockwise rotation and its source
     (list | dicom | model | none), and qc flags (non_chest, non_chest_suspected, lateral, blank, paediatric,
     orientation_uncertain).

Modules: `stage` (orient, orient_batch), `rotation_list` (parsing the list), `dicom_hints` (what the header says),
`thumbnails`, `network` + `classifier` (the orientation classifier), `qc` (blank / non-chest / age checks).
"""
