#!/usr/bin/env bash
# Everything that needs a GPU, in one bounded call (for a borrowed H100/H200 through the device tool):
# compiled kernel tests, the kernel benchmark, the 1024x2048 end-to-end benchmark and the 1024x2048
# training benchmark. Each step has its own time limit; results are copied to $OUT after every step.
# Usage: bash benchmarks/gpu_session.sh [scale]   (scale multiplies every step's limit; default 1)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src_shim:${PYTHONPATH:-}" TRITON_DEFAULT_FP_FUSION=1
s=${1:-1}
out=${OUT:-/tmp/crn_gpu_out}; mkdir -p "$out"
log="$out/gpu_session.log"
step() { echo "== $1 ($(date +%T))" | tee -a "$log"; }
save() {
  gpu=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from _util import device_label; print(device_label('cuda'))")
  cp benchmarks/results/"$gpu"_* benchmarks/results/kernels_"$gpu"_* "$out"/ 2>/dev/null  # at most 8 files come back
}
if ! python3 -c "import crn_fast.kernels" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
    # fallback: the installed layout (crn_fast/, crn_fast/kernels, crn_fast/export) from links
    mkdir -p src_shim/crn_fast
    for f in crn_fast/*; do ln -sfn "$PWD/$f" "src_shim/crn_fast/$(basename "$f")"; done
    ln -sfn "$PWD/kernels" src_shim/crn_fast/kernels; ln -sfn "$PWD/export" src_shim/crn_fast/export; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
step "compiled kernel tests"
timeout $((150 * s)) python3 -m pytest -q -m "gpu or tensorrt" tests/test_kernels.py tests/test_export.py 2>&1 \
  | tail -40 >> "$log"
step "kernel benchmark (1024p module shapes, bf16)"
timeout $((90 * s)) python3 benchmarks/kernels.py --dtypes bf16 --no-compile 2>&1 | tail -45 >> "$log"; save
step "end to end, 1024x2048"
timeout $((200 * s)) python3 benchmarks/run.py --res 1024x2048 --max-seconds $((170 * s)) \
  --backends eager,eager-cudagraph,triton,triton-unfused,compile --dtypes bf16,fp32 2>&1 | tail -25 >> "$log"; save
step "training, 1024x2048, bf16"
timeout $((90 * s)) python3 benchmarks/run.py --train --res 1024x2048 --dtypes bf16 --iters 2 --warmup 0 \
  --max-seconds $((60 * s)) 2>&1 | tail -12 >> "$log"; save
step "done"
