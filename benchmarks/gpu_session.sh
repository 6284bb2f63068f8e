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
python3 -c "import crn_fast" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { mkdir -p src_shim && ln -sfn "$PWD/crn_fast" src_shim/crn_fast; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
log "GPU tests";       timeout 300 python3 -m pytest -q -m "gpu or tensorrt" tests/ 2>&1 | tail -15
log "kernels";         timeout 300 python3 benchmarks/kernels.py 2>&1 | tail -60
log "end to end";      timeout $((budget + 60)) python3 benchmarks/run.py --res 1024x2048 --max-seconds "$budget" 2>&1 | tail -30
log "training";        timeout 300 python3 benchmarks/run.py --train --res 1024x2048 --iters 3 --warmup 1 \
                         --dtypes fp32,bf16 2>&1 | tail -15
if [ -n "$out" ]; then cp benchmarks/results/*.json benchmarks/results/*.md benchmarks/results/*.png "$out"/ 2>/dev/null; fi
