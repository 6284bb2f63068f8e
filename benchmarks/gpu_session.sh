#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for a borrowed H100/H200 through the device tool):
#   GPU tests, the end-to-end benchmark at 1024x2048, the training benchmark, the kernel benchmark.
# Results land in benchmarks/results/ (named by device) and are copied to $OUT when it is set.
# Usage: bash benchmarks/gpu_session.sh [max seconds for run.py, default 240]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src_shim:${PYTHONPATH:-}"
budget=${1:-240}
out=${OUT:-}
log() { echo "== $*"; }
# crn_fast without installing (the device machine has torch, triton, onnxruntime; no network)
if ! python3 -c "import crn_fast.kernels" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || {
    # fallback: the installed layout (crn_fast/, crn_fast/kernels, crn_fast/export) from links
    mkdir -p src_shim/crn_fast
    for f in crn_fast/*; do ln -sfn "$PWD/$f" "src_shim/crn_fast/$(basename "$f")"; done
    ln -sfn "$PWD/kernels" src_shim/crn_fast/kernels; ln -sfn "$PWD/export" src_shim/crn_fast/export; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
log "GPU tests";       timeout 300 python3 -m pytest -q -m "gpu or tensorrt" tests/ 2>&1 | tail -15
log "kernels";         timeout 300 python3 benchmarks/kernels.py 2>&1 | tail -60
log "end to end";      timeout $((budget + 60)) python3 benchmarks/run.py --res 1024x2048 --max-seconds "$budget" 2>&1 | tail -30
log "training";        timeout 300 python3 benchmarks/run.py --train --res 1024x2048 --iters 3 --warmup 1 \
                         --dtypes fp32,bf16 2>&1 | tail -15
# at most 8 files come back from $OUT: only this GPU's results
if [ -n "$out" ]; then
  gpu=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from _util import device_label; print(device_label('cuda'))")
  cp benchmarks/results/"$gpu"_* benchmarks/results/kernels_"$gpu"_* "$out"/ 2>/dev/null
fi
