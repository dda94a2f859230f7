#!/usr/bin/env bash
# The GPU benchmark in one command, from the checkout's root (copied to bench-kit/run.sh by gpu_kit.sh):
#   bash bench-kit/run.sh            # on the GPU machine: both itineraries per case, the predictor (~5 min)
#   bash bench-kit/run.sh --smoke    # the same steps on the CPU, small (CI runs it in a bare venv)
# Extra arguments go to benchmarks/gpu_pipeline.py. Installs the kit's wheels into the running Python (the
# GPU machine is given back afterwards; CI's bare venv is the test's own), then runs from the checkout.
set -euo pipefail
KIT="$(cd "$(dirname "$0")" && pwd)"
cd "${CXRAGE_CHECKOUT:-$KIT/..}"  # the checkout the kit was built in (beside it as bench-kit/)
PY="${PYTHON:-python3}"
if ! "$PY" -c "import pydicom, pylibjpeg, safetensors" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --disable-pip-version-check "$KIT"/wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CXRAGE_SHARED="$KIT/no-shared"
FILMS=(--j2k "$KIT/films/j2k.dcm" --jpeg "$KIT"/films/jpeg*.dcm --png-dir "$KIT/films/png")
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec "$PY" benchmarks/gpu_pipeline.py "${FILMS[@]}" --device cpu --films 4 --seconds 0.5 \
    --bare-views 10 --batch-views 10 --workers 1 --agree-films 3 "$@"
fi
exec "$PY" benchmarks/gpu_pipeline.py "${FILMS[@]}" "$@"
