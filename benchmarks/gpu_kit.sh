#!/usr/bin/env bash
# Builds bench-kit/ (git-ignored): the pinned wheels (benchmarks/gpu_kit_wheels.txt) and the real films that
# benchmarks/gpu_pipeline.py needs on a bare GPU machine (torch, numpy, pillow, pandas, pyarrow; no internet, no
# Ray, no pydicom, no install of this project), within the device tool's 64 MiB upload, and bench-kit/run.sh,
# the one command to run there (device tool: carry ["bench-kit"], command "bash bench-kit/run.sh").
#
#   bash benchmarks/gpu_kit.sh                 # wheels for the GPU machine's Python (3.12)
#   KIT_PYTHON_VERSION=3.11 bash benchmarks/gpu_kit.sh && bash bench-kit/run.sh --smoke   # the same on this CPU
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${CXRAGE_SHARED:-../shared}"
PYVER="${KIT_PYTHON_VERSION:-3.12}"
PY="${PYTHON:-python3}"
KIT="${KIT_DIR:-bench-kit}"  # the tests build one elsewhere (with CXRAGE_CHECKOUT set for run.sh)
LIMIT_MIB=56  # the upload is 64 MiB with the checkout (~3 MiB) and slack
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/films/png"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
  -d "$KIT/wheels" -r benchmarks/gpu_kit_wheels.txt
cp "$SHARED/data/dicom-sample/cxr/WG04_RG1_J2KR.dcm" "$KIT/films/j2k.dcm"
cp "$SHARED/data/dicom-sample/cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm" "$KIT/films/jpeg1.dcm"
cp "$SHARED/data/dicom-sample/cxr/rsna-pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm" "$KIT/films/jpeg2.dcm"
# A glob, not `ls | head`: under pipefail, ls dies of SIGPIPE when head stops reading (exit 141, seen in CI)
pngs=("$SHARED/data/cxr-sample/images"/nih_*.png)
if [ ! -e "${pngs[0]}" ]; then echo "no nih_*.png films under $SHARED/data/cxr-sample/images" >&2; exit 1; fi
cp "${pngs[@]:0:12}" "$KIT/films/png/"
cp benchmarks/gpu_kit_run.sh "$KIT/run.sh"
size_mib=$(( $(du -sb "$KIT" | cut -f1) / 1048576 ))
echo "$KIT: ${size_mib} MiB ($(ls "$KIT/wheels" | wc -l) wheels for Python $PYVER, $(find "$KIT/films" -type f | wc -l) films)"
if [ "$size_mib" -gt "$LIMIT_MIB" ]; then
  echo "$KIT is over ${LIMIT_MIB} MiB: it would not fit the device tool's upload" >&2
  exit 1
fi
