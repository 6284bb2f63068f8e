#!/usr/bin/env bash
# Everything that needs a GPU, in one bounded call (a borrowed H100/H200 through the device tool),
# most informative first; each step has its own time limit (x scale), and after every step all
# results are packed into $OUT/gpu_results.tar.gz (the device tool returns at most 8 files) beside the log:
#   F0. the TMA conv kernel's tests (its first run on hardware: a crash turns it off for the rest)
#   F1. the kernel benchmark, both memory formats (bandwidth vs copy)
#   F2. the 1024x2048 race: crn_fast's paths against every torch.compile mode, same input
#   F3. the per-module profile (the conv modes the race chose, cuDNN convs, lowres)
#   F4. the compiled tests (opcheck with AOTAutograd, Inductor with no graph break, CUDA graphs,
#       AOTInductor with crn_fast's kernels inside, the exporters, every conv tile)
#   F6. each module's convs: cuDNN vs the fused, split and lowres conv1, every tile timed
#   F7. fp32 with TF32 convs, as the first results' fp32 was measured ("fp32 no slower")
#   F5. the issue's targets, checked from those files (benchmarks/targets.py)
# Usage: bash benchmarks/gpu_session.sh [scale]          (~9.2 min of step limits at scale 1)
#        CRN_GPU_TRAIN=1 bash benchmarks/gpu_session.sh     (~4 min: a training step under sync-debug "error",
#                                                           a compiled triton training step against eager,
#                                                           crn-synthesize's batches queued without a wait,
#                                                           the convs' forward + backward unpadded and padded,
#                                                           the training rows, triton vs torch.compile, and a
#                                                           profiled triton step; a second call while the
#                                                           machine is warm)
#        CRN_GPU_SMOKE=1 bash benchmarks/gpu_session.sh  (CPU: every step at tiny sizes, to test the script)
# (CRN_GPU_FOLLOWUP=1, which older notes name, runs the same steps: they were the follow-up to the
# first H100 session, whose step list, results and log are in git and benchmarks/results/.)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src_shim:${PYTHONPATH:-}" TRITON_DEFAULT_FP_FUSION=1
s=${1:-1}
out=${OUT:-/tmp/crn_gpu_out}; mkdir -p "$out"
log="$out/gpu_session.log"
res=$(mktemp -d)  # this session's result files, packed after every step
trap 'rm -rf "$res"' EXIT
if [ "${CRN_GPU_SMOKE:-0}" = 1 ]; then
  R=64x128; P="--preset tiny"; ITERS="--iters 1 --warmup 0"
else
  R=1024x2048; P=""; ITERS=""
fi
# step TITLE: its line in the log, on a line of its own (a step cut by its time limit may end mid-line)
step() { if [ -s "$log" ] && [ -n "$(tail -c1 "$log")" ]; then echo >> "$log"; fi; echo "== $1 ($(date +%T))" | tee -a "$log"; }
pack() { tar -czf "$out/gpu_results.tar.gz" -C "$res" . 2>/dev/null; }
# kernel_bench SECONDS NAME [kernels.py options]; race SECONDS ROWS: each into its result file, then packed
kernel_bench() {
  local t=$1 name=$2; shift 2
  timeout $((t * s)) python3 benchmarks/kernels.py $P ${R:+--res $R} --dtypes bf16 --no-compile "$@" \
    --json "$res/${name}_${gpu}.json" 2>&1 | tail -70 >> "$log"; pack; }
race() {
  timeout $(($1 * s)) python3 benchmarks/run.py $P --res $R --rows "$2" $ITERS --max-seconds $((($1 - 10) * s)) \
    --json "$res/${gpu}_${R}.json" 2>&1 | grep -v "^  triton_\|AUTOTUNE\|strides:\|dtypes:" | tail -40 >> "$log"; pack; }
# train_rows SECONDS BACKENDS ITERS: one training step (generator + VGG-19 loss, bf16 autocast), checkpointing off and on
train_rows() {
  timeout $(($1 * s)) python3 benchmarks/run.py --train $P --res $R --dtypes bf16 --iters $3 --warmup 1 \
    --train-backends "$2" --max-seconds $((($1 - 5) * s)) --json "$res/${gpu}_${R}_train.json" 2>&1 | tail -14 >> "$log"; pack; }
if ! python3 -c "import crn_fast.kernels" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
    # fallback: the installed layout (crn_fast/, crn_fast/kernels, crn_fast/export) from links
    mkdir -p src_shim/crn_fast
    for f in crn_fast/*; do ln -sfn "$PWD/$f" "src_shim/crn_fast/$(basename "$f")"; done
    ln -sfn "$PWD/kernels" src_shim/crn_fast/kernels; ln -sfn "$PWD/export" src_shim/crn_fast/export; }
fi
gpu=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from _util import device_label; print(device_label('cuda' if __import__('torch').cuda.is_available() else 'cpu'))")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

if [ "${CRN_GPU_TRAIN:-0}" = 1 ]; then
  # A second, short call on a machine still warm from the first (which has no training step):
  # the issue's training rows, triton against torch.compile in one run. The H100 session's step 5
  # measured triton and ran out of time while compiling the compile rows.
  step "T1. the triton backend's training step on hardware: it never waits for the GPU (sync-debug 'error'); compiled (crn-train --compile), the same steps; crn-synthesize queues each batch without waiting"
  timeout $((60 * s)) python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu tests/test_train.py >> "$log" 2>&1
  step "T0. the 19 convs' forward + backward in bf16, conv1's input unpadded vs padded to 8 channels (the training cascade pads)"
  timeout $((20 * s)) python3 benchmarks/memory_format.py --res $R ${P:+--preset tiny} --train \
    --json "$res/memory_format_${gpu}_${R}_train.json" >> "$log" 2>&1; pack
  step "T. training at $R, bf16: triton vs torch.compile of the generator and loss (crn-train --compile), checkpointing off, then on"
  train_rows 120 triton,compile 3
  step "P. one triton training step profiled: ms by phase (generator, loss, backward, optimizer) and stage"
  timeout $((30 * s)) python3 benchmarks/profile_train.py ${P:+--preset tiny} --res $R \
    --out "$res/profile_train_${gpu}_${R}" 2>&1 | tail -45 >> "$log"; pack
  step "done"
  cp "$log" "$res/${gpu}_gpu_session_train.log"; pack
  ls -la "$out"
  exit 0
fi

# The conv tiles and "auto"'s conv modes chosen in the race (F2) are stored and read again by the
# profile (F3), which so profiles what the race ran; the file is a result too. F6 times every
# tile, so it runs without it, and the tests (F0, F4: untuned tiles) neither read nor add to it.
export CRN_FAST_CONV_TUNING="$res/conv_tuning_${gpu}.json"
step "F0. the TMA conv kernel's first run on hardware: its tests, small tiles and real shapes"
# a failure or a crash (a CUDA fault is sticky: it would end every later row of a process) turns
# the TMA kernel off for the rest of the session, so the race still measures crn_fast and compile
CRN_FAST_CONV_TUNE=0 CRN_FAST_CONV_TUNING= timeout $((40 * s)) python3 -m pytest -q -x --tb=short -p no:cacheprovider \
  tests/test_conv_norm.py -k "test_tma or real_module_shapes" >> "$log" 2>&1
rc=$?
if [ $rc = 1 ] || [ $rc -ge 128 ]; then
  export CRN_FAST_CONV_TMA=0; echo "the TMA kernel failed its tests (rc $rc): CRN_FAST_CONV_TMA=0 from here on" | tee -a "$log"
fi
step "F1. kernel benchmark, bf16, both formats (the conv rows are F6)"
kernel_bench 60 kernels --no-conv --formats channels_last,nchw  # the model's format first
step "F2. the race at $R: crn_fast vs every torch.compile mode"
# max-autotune last: its conv autotuning (~9 s per conv shape, 19 shapes) outlasted both of the
# H100 session's calls, so the rows it leaves no time for are its own. "auto" (~90 conv tile
# compiles, ~1 min) just before it, after the rows the targets compare: it is the first run of
# the TMA kernel on hardware: a CUDA fault there would cost the later rows a fresh process (run.py
# measures them in one) and ~15 s
race="triton-cudagraph:bf16:channels_last,triton-lowresconv-cudagraph:bf16:channels_last,convs-only:bf16:channels_last"
race+=",triton-fusedhead-cudagraph:bf16:channels_last"
race+=",compile-reduce-overhead:bf16:channels_last,triton-cudagraph:bf16:nchw,compile:bf16:nchw"
race+=",triton:bf16:channels_last,triton-autoconv-cudagraph:bf16:channels_last"
race+=",compile-max-autotune-no-cudagraphs:bf16:channels_last,compile-max-autotune:bf16:channels_last"
race+=",compile-max-autotune-no-cudagraphs:bf16:nchw"
race 240 "$race"
step "F3. per-module profile (module ranges), kernel sequence saved; auto: the conv modes the race chose"
timeout $((45 * s)) python3 benchmarks/profile_stages.py $P --res $R --dtype bf16 \
  --variants triton-autoconv,triton,triton-lowresconv \
  --out "$res/profile_${gpu}_${R}" 2>&1 | tail -40 >> "$log"; pack
step "F4. compiled tests: the fused conv (TMA kernel) and the kernels first, then the AOTInductor package on"
# upsample_conv's tiles at 1024p's shapes (~8 compiles) after the exporters: the race's lowres rows
# already report their error against eager fp32
CRN_FAST_CONV_TUNE=0 CRN_FAST_CONV_TUNING= timeout $((95 * s)) python3 -m pytest -v --tb=short -p no:cacheprovider -m "gpu or tensorrt" \
  tests/test_model.py tests/test_conv_norm.py tests/test_kernels.py tests/test_export.py tests/test_upsample_conv.py \
  tests/test_conv_tiles.py 2>&1 | tail -120 >> "$log"
step "F6. each module's convs, largest first: cuDNN vs the fused, split and lowres conv, every tile timed"
if [ "${CRN_GPU_SMOKE:-0}" = 1 ]; then echo "(needs a GPU)" >> "$log"; else
  CRN_FAST_CONV_TUNING= kernel_bench 45 kernels_conv --conv-only; fi
step "F7. fp32 with TF32 convs, as the first results' fp32 was measured (fp32 no slower than before?)"
# its own process: --allow-tf32 is process-wide, and the race compares fp32 with TF32 off. The fp32
# kernels compile here (the steps before ran bf16), so one row: crn_fast's best path
timeout $((35 * s)) python3 benchmarks/run.py $P --res $R --allow-tf32 $ITERS --max-seconds $((30 * s)) \
  --rows "triton-cudagraph:fp32:channels_last" --json "$res/${gpu}_${R}_fp32_tf32.json" 2>&1 | tail -8 >> "$log"; pack
step "F5. the targets"
python3 benchmarks/targets.py --results "$res" --device "$gpu" --res $R --out "$res/targets_${gpu}.md" >> "$log" 2>&1
step "done"
cp "$log" "$res/${gpu}_gpu_session.log"; pack
ls -la "$out"

