#!/usr/bin/env bash
# Builds bench-kit/ (git-ignored): the wheels and real films benchmarks/gpu_pipeline.py needs on a bare GPU
# machine (Python 3.12, torch, numpy, pillow, pandas, pyarrow; no internet, no Ray, no pydicom), within the
# device tool's 64 MiB carry limit. Then, on the GPU machine (device tool: carry ["bench-kit"]):
#   pip install -q --no-deps --no-index bench-kit/wheels/*.whl && PYTHONPATH=. python benchmarks/gpu_pipeline.py \
#     --j2k bench-kit/films/j2k.dcm --jpeg bench-kit/films/jpeg*.dcm --png-dir bench-kit/films/png
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${CXRAGE_SHARED:-../shared}"
KIT=bench-kit
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/films/png"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$KIT/wheels" pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg fsspec safetensors \
  nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13 nvidia-nvjpeg
cp "$SHARED/data/dicom-sample/cxr/WG04_RG1_J2KR.dcm" "$KIT/films/j2k.dcm"
cp "$SHARED/data/dicom-sample/cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm" "$KIT/films/jpeg1.dcm"
cp "$SHARED/data/dicom-sample/cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm" "$KIT/films/jpeg2.dcm"
ls "$SHARED/data/cxr-sample/images"/nih_*.png | head -n 12 | xargs -I{} cp {} "$KIT/films/png/"
du -sh "$KIT"
