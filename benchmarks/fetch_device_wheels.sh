#!/usr/bin/env bash
# Fetches the wheels benchmarks/gpu_check.sh installs on the device machine, which has no internet: OpenMMLab
# mmpretrain 1.2.0 with mmengine, mmcv-lite and their small pure-Python helpers (for the `--reference` runs against
# mmpretrain), and timm pinned to the version our tests use. Run it on a machine with a package registry:
#
#     bash benchmarks/fetch_device_wheels.sh          # -> dist/device-wheels/ (WHEELS=DIR for another folder)
#
# dist/ is ignored by git (.gitignore's /dist/), so a fresh checkout has no wheels and the folder must be carried to
# the device: run(command="... bash benchmarks/gpu_check.sh", carry=["dist/device-wheels"]). Without the wheels
# gpu_check.sh still runs ours, and skips the mmpretrain comparisons with a message.
#
# Exact pins, no dependency resolution (--no-deps: torch, numpy etc. are the device image's own) and wheels only (no
# source builds). Every pinned wheel is pure Python (py3-none-any / py2.py3-none-any), so it fits any Python 3 on the
# device; pip is told the device's interpreter anyway (DEVICE_PYTHON, default 3.12). DRY_RUN=1 prints the command.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-dist/device-wheels}"
DEVICE_PYTHON="${DEVICE_PYTHON:-3.12}"
PY="${PYTHON:-python3}"
[ "$PY" = python3 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python

PINS=(
  mmpretrain==1.2.0 mmengine==0.10.7 mmcv-lite==2.2.0  # the reference implementation (pyproject's `parity` extra)
  addict==2.4.0 yapf==0.43.0 platformdirs==4.14.8 termcolor==3.3.0 mat4py==0.6.0 modelindex==0.0.2
  model-index==0.1.11 ordered-set==4.1.0 importlib-metadata==10.2.0  # their pure-Python requirements
  timm==1.0.31  # our towers' library, at the version the parity tests ran with
)
CMD=("$PY" -m pip download --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PINS[@]}")

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "${CMD[*]}"
  exit 0
fi
mkdir -p "$WHEELS"
"${CMD[@]}"
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels in $WHEELS; carry it to the device: carry=[\"$WHEELS\"]"
