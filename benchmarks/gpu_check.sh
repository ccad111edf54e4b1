#!/usr/bin/env bash
# The speed check of issue #6 on one GPU machine (one H200), in one command of at most ~8 minutes.
#
# Before the device session, on a machine with a package registry (this one), fetch the pure-Python wheels the
# device image lacks (mmpretrain and its helpers, and timm pinned to our version) into dist/device-wheels/
# (ignored by .gitignore's /dist/, so a fresh checkout lacks them and they must be carried):
#
#     bash benchmarks/fetch_device_wheels.sh        # (or: bash benchmarks/gpu_check.sh prepare)
#
# Without them (and without an importable mmpretrain) the runs below still measure ours, without `--reference`:
# the mmpretrain comparisons are skipped with a message, not failed.
#
# Then, with the device tool (everything written under $OUT comes back; at most 8 files):
#
#     run(command="MILAN_GIT_COMMIT=<hash> MILAN_GIT_DIRTY=<0|1> bash benchmarks/gpu_check.sh",
#         carry=["dist/device-wheels"], timeout_s=600)
#
# with the hash of `git rev-parse HEAD` written out (the command runs on the device machine, where the copy of
# the tree may have no .git) and MILAN_GIT_DIRTY=1 if `git status --porcelain` lists changes.
#
# Runs, most important first (later ones are skipped when the time budget BUDGET_S is spent):
#   1. step_bf16.json     ours (eager) vs mmpretrain 1.2.0, bf16 autocast, ViT-B/16, batch 256, + loss check
#                         (runs 1-3 without the "vs mmpretrain" part when its wheels are absent)
#   2. step_bf16_compile  ours with torch.compile vs mmpretrain, bf16
#   3. step_fp16.json     ours (eager) vs mmpretrain, fp16 autocast + GradScaler
#   4. step_data.json     ours (compiled) fed from a folder of generated 500x375 JPEGs (16 workers) vs synthetic
#   5. data.json          benchmarks/data.py loader throughput on the same JPEGs (DATA engineer's benchmark)
#   6. step_data_device  as 4, with --decode device (workers only read files; batched nvJPEG + augmentation on GPU)
#   7. step_bf16_cudagraphs  ours with torch.compile mode=reduce-overhead (CUDA graphs)
# plus gpu_check.log (everything printed). Copy the JSON files into benchmarks/results/ afterwards.
#
# SMOKE=1 runs the same sequence on the CPU with the tiny test model in about a minute (to test this script);
# DRY_RUN=1 only prints the commands.
set -uo pipefail  # no -e: a failed run must not lose the others

cd "$(dirname "$0")/.."
REPO=$(pwd)
WHEELS="${WHEELS:-dist/device-wheels}"
SMOKE="${SMOKE:-0}"
DRY_RUN="${DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-420}"   # no new run starts after this many seconds
HARD_S="${HARD_S:-560}"       # every run is stopped by then (the device tool allows 600 s per command)
PY="${PYTHON:-python3}"
[ "$PY" = python3 ] && [ -x .venv/bin/python ] && [ "$SMOKE" = 1 ] && PY=.venv/bin/python

if [ "${1:-}" = prepare ]; then  # the wheels' pins live in fetch_device_wheels.sh
  WHEELS="$WHEELS" exec bash benchmarks/fetch_device_wheels.sh
fi

if [ "$DRY_RUN" = 1 ]; then
  OUT="${OUT:-\$OUT}"
elif [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d)
fi
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu MODEL=milan_test_tiny BS=8 DATA_N=32 WORKERS=2
  TIMING=(--warmup 2 --rounds 2 --steps 1 --breakdown-steps 1 --threads 2)
  COMPILE=(--compile --compile-backend eager --channels-last)  # the plumbing, without minutes of C++ compiling
  GRAPHS=(--compile --compile-backend eager --channels-last)
  PEAK=()
else
  DEVICE=cuda MODEL=milan_vit_base_patch16 BS=256 DATA_N=4096 WORKERS=16
  TIMING=(--warmup 3 --rounds 6 --steps 10 --breakdown-steps 2)
  COMPILE=(--compile --channels-last)
  GRAPHS=(--compile --compile-mode reduce-overhead --channels-last)
  PEAK=(--peak-tflops 795)  # the H200's dense bf16 rate measured in this project (the issue's MFU convention)
fi
COMMON=(--model "$MODEL" --batch-size "$BS" --device "$DEVICE" "${TIMING[@]}" "${PEAK[@]}" --verbose)
WORK="${WORK_DIR:-/tmp/milan-bench-$MODEL}"
JPEGS="$WORK/imagenet_like"  # the folder and file names benchmarks/data.py uses (it reuses the files)

# name, time limit (s), command...
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    echo "$*"
    return 0
  fi
  if [ "$(elapsed)" -ge "$BUDGET_S" ]; then
    log "skip $name: time budget of ${BUDGET_S}s spent"
    return 0
  fi
  local left=$((HARD_S - $(elapsed)))
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  log "end $name: rc=${PIPESTATUS[0]}"
}

note() { if [ "$DRY_RUN" = 1 ]; then echo "# $*"; else log "$*"; fi; }
has_reference() {  # a real import; DRY_RUN only looks the packages up (importing mmpretrain takes seconds)
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
      mmpretrain mmengine mmcv >/dev/null 2>&1
  else
    "$PY" -c "import mmpretrain, mmengine, mmcv" >/dev/null 2>&1
  fi
}

# The mmpretrain reference: importable already, or installed from the carried wheels; otherwise its comparisons are
# skipped (REF empty) and the runs measure ours alone.
REF=(--reference)
[ "$DRY_RUN" = 1 ] || log "repo $REPO, OUT $OUT, python $PY, smoke=$SMOKE"
if ! has_reference; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if [ "$DRY_RUN" != 1 ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$LOG"
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
      if ! has_reference; then
        REF=()
        note "SKIPPING the mmpretrain --reference comparisons: mmpretrain is still not importable after installing" \
          "the wheels in $WHEELS (see the pip output above); our runs go on"
      fi
    fi
  else
    REF=()
    note "SKIPPING the mmpretrain --reference comparisons: mmpretrain is not importable and $WHEELS holds no wheels" \
      "(dist/ is not in git). Fetch them on a machine with a package registry with" \
      "'bash benchmarks/fetch_device_wheels.sh' and carry them: run(..., carry=[\"dist/device-wheels\"])." \
      "Our runs go on without the reference."
  fi
fi

if [ "$DRY_RUN" != 1 ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  if [ -z "${MILAN_GIT_COMMIT:-}" ] && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    MILAN_GIT_COMMIT=$(git -C "$REPO" rev-parse HEAD)
    export MILAN_GIT_COMMIT
  fi
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
    "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
    "$PY" -c "import mmpretrain; print('mmpretrain', mmpretrain.__version__)" || true
  } 2>&1 | tee -a "$LOG"
fi

STEP=("$PY" benchmarks/step.py "${COMMON[@]}")
step bf16 240 "${STEP[@]}" --precision bf16 "${REF[@]}" --json "$OUT/step_bf16.json"
step bf16_compile 300 "${STEP[@]}" --precision bf16 "${REF[@]}" "${COMPILE[@]}" --json "$OUT/step_bf16_compile.json"
step fp16 180 "${STEP[@]}" --precision fp16 "${REF[@]}" --json "$OUT/step_fp16.json"

# ImageNet-sized JPEGs (500x375, quality 90), generated in parallel with the DATA engineer's generator.
if [ "$DRY_RUN" != 1 ] && [ "$(elapsed)" -lt "$BUDGET_S" ]; then
  log "generating $DATA_N JPEGs in $JPEGS"
  "$PY" - "$JPEGS" "$DATA_N" <<'EOF' 2>&1 | tee -a "$LOG"
import io, os, sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

try:  # the DATA engineer's generator, so that benchmarks/data.py reuses these files
    from benchmarks.data import photo_like
except Exception as exc:  # noqa: BLE001 - any import problem: a plain smooth generator will do
    print(f"benchmarks.data unavailable ({exc!r}); using a fallback generator")

    def photo_like(width: int, height: int, seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)

folder, n = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)

def write(i: int) -> None:
    path = folder / f"img_{i:06d}.jpg"
    if not path.exists():
        buf = io.BytesIO()
        photo_like(500, 375, seed=i).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())

with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
    list(pool.map(write, range(n), chunksize=16))
print(f"{n} JPEGs in {folder}")
EOF
fi
step data_step 240 "${STEP[@]}" --precision bf16 "${COMPILE[@]}" --data "$JPEGS" --workers "$WORKERS" \
  --json "$OUT/step_data.json"
step data_loader 120 "$PY" benchmarks/data.py --datasets imagenet_like --work-dir "$WORK" \
  --workers "$WORKERS" --num-images "$DATA_N" --batch-size "$BS" --draft on --json "$OUT/data.json"
step data_step_device 240 "${STEP[@]}" --precision bf16 "${COMPILE[@]}" --data "$JPEGS" --workers "$WORKERS" \
  --decode device --json "$OUT/step_data_device.json"
step bf16_cudagraphs 240 "${STEP[@]}" --precision bf16 "${GRAPHS[@]}" --json "$OUT/step_bf16_cudagraphs.json"

if [ "$DRY_RUN" != 1 ]; then
  log "done; files in $OUT:"
  ls -la "$OUT" | tee -a "$LOG"
  "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

print(f"{'run':<24} {'ours img/s':>11} {'ref img/s':>10} {'ratio':>6} {'peak GiB':>9} {'MFU':>6}")
for path in sorted(Path(sys.argv[1]).glob("step_*.json")):
    r = json.loads(path.read_text())
    ours, ref = r["ours"], r.get("reference")
    ratio = r.get("ratio", {}).get("paired_median")
    mfu = f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") else "-"
    print(
        f"{path.stem:<24} {ours['img_per_s']:>11.1f} {ref['img_per_s'] if ref else float('nan'):>10.1f} "
        f"{ratio or float('nan'):>6.2f} {ours['peak_memory_gib']:>9.2f} {mfu:>6}"
    )
    if "data" in r:
        print(f"{'':<24} from JPEGs {r['data']['img_per_s']:.1f} img/s = {100 * r['data']['fraction_of_synthetic']:.0f}% of synthetic")
EOF
fi
