"""Preprocess stage: a `DecodedImage` -> the original pipeline's pixels, exactly -> the model's input views.

In:  a `DecodedImage` (`cxrage_ray.decode.types`): pixels (H, W, C), C in {1, 3}, uint8 8-bit or uint16 Q16.
Out: the seed-chain picture, uint8 (H', W', C') with short side 512 (and its PNG file); then normalised float32
     views (V, 3, 224, 224) for the model.

- `seed_chain`: ImageMagick `mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^`
  (spec §9), one module a step: `trim`, `levels`, `resize` (its plan and weights in `resize_weights`), `png`;
  `quantum` holds the Q16 arithmetic they share.
- `tensor`: the same chain, and the dcmj2pnm mapping, as torch kernels for the GPU, with the parameters (level
  table, resize weights, DICOM window plan) taken from the numpy modules.
- `fastai`: fastai v1's inference transform (spec §3): short side -> 224, crop, ImageNet normalisation,
  and the zoom-1.35 corner crops used for TTA.
"""
