"""Decode stage: bytes of one file -> `DecodedImage` (pixels as ImageMagick would hold them + metadata).

In:  the file's bytes and its name (the name's extension is only a hint; content decides).
Out: `DecodedImage` (`types`) with the pixels at the file's own depth — uint8 for 1- and 8-bit samples (each
     standing for the Q16 value v*257 that ImageMagick Q16 holds), uint16 Q16 for 16-bit ones — shape (H, W, C)
     with C = 1 (grey) or 3 (RGB), an optional Q16 alpha plane, and metadata.

Modules, callers first: `image` (the dispatcher, `decode_image`), `raster` (PNG/JPEG/TIFF via Pillow, tifffile,
imagecodecs), `dicom` (pydicom + pylibjpeg, mapped to 8 bits exactly as DCMTK's `dcmj2pnm -O +ot +G` did for the
original pipeline; its steps in `dicom_parse`, `dicom_metadata`, `dicom_frame`, `dicom_pillow`, `dicom_window`,
`dicom_greyscale`, `dicom_values`), `gpu` (DICOM codestreams decoded in batches on the GPU); and the leaves they
share: `types` (`DecodedImage`), `geometry` (the seed chain's 512 px fill geometry), `limits` (the memory budget
of one film), `messages` (decoder failures in plain words).
"""
