"""Preprocess stage: the original pipeline's pixels, exactly.

- `seed_chain`: ImageMagick `mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^`
  (spec §9) on a `DecodedImage` -> uint8 (H, W, C) with short side 512.
- `fastai`: fastai v1's inference transform (spec §3): short side -> 224, crop, ImageNet normalisation,
  and the zoom-1.35 corner crops used for TTA.
"""
