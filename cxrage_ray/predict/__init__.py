"""Predict stage: pictures -> CXR-Age.

In:  uint8 seed-chain pictures (H, W, C), or prepared rows and a picture source.
Out: `raw`, `raw_sd` and `cxr_age` per film (`predictor.AgePredictor`: fastai views, TTA, calibration, on CPU or
     GPU), scored rows from the one scoring actor both itineraries use (`scoring.ScoreActor`), and saliency maps
     (`saliency`). No Ray imports.
"""
