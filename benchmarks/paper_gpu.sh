#!/usr/bin/env bash
# The one prepared GPU check (issue 22): the paper profile at 128 x 128 on CUDA, shortened to fit
# in a few minutes, reporting measured GPU time per stage and an estimate of the full study.
#
#   benchmarks/paper_gpu.sh [OUT_DIR]
#   (DEVICE=cuda by default; a dry run on a CPU: DEVICE=cpu PROFILE=smoke STEPS=2 SAMPLES=32)
#
# 1. dgm-eit bench train --profile paper on the device: optimiser steps per second of every model at
#    the paper's batch sizes, fp32 and each speed-up (bf16/fp16 autocast, channels_last, fused and
#    foreach Adam, torch.compile), with the validation loss each reaches after the same steps;
# 2. dgm-eit run --profile paper on the device, shortened (Test 1, one seed, 256 training images,
#    one epoch per stage, 50 reverse steps), so every stage of the CUDA path runs once and is timed;
# 3. benchmarks/paper_gpu_estimate.py: the full study's time from those measurements.
# Where a wheel folder .whl exists (triangle for the device's Python), it is installed first.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/paper_gpu}}
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-256}
PROFILE=${PROFILE:-paper}
STEPS=${STEPS:-20}
MODELS=${MODELS:-cvae,cnf,score,unet}                               # bench train's models
VARIANTS=${VARIANTS:-fp32,bf16,fp16,channels_last,foreach,fused,profile}
COMPILE=${COMPILE:-1}                                               # 0: leave out torch.compile (1b)
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null;
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)";
  nproc; } > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"
start=$(date +%s)

echo "== 1. training steps per second ($PROFILE profile, $DEVICE)"
timeout 170 python3 -m dgm_eit bench train --profile "$PROFILE" --device "$DEVICE" --samples "$SAMPLES" --steps "$STEPS" --warmup 5 \
  --models "$MODELS" --variants "$VARIANTS" --out "$OUT_DIR/bench_train.json" \
  > "$OUT_DIR/bench_train.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"; tail -40 "$OUT_DIR/bench_train.log"
echo "== 1b. torch.compile (its warm-up is the compile time)"
[ "$COMPILE" = 1 ] && timeout 100 python3 -m dgm_eit bench train --profile "$PROFILE" --device "$DEVICE" --samples "$SAMPLES" --steps "$STEPS" --warmup 5 \
  --models cnf,score --variants fp32,compile --out "$OUT_DIR/bench_compile.json" > "$OUT_DIR/bench_compile.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"; grep -v "^W1\|^ " "$OUT_DIR/bench_compile.log" | tail -8

echo "== 2. dgm-eit run --profile paper, shortened"
SHORT=(--set 'run.tests=["T1"]' --set data.n_train=$SAMPLES --set data.n_val=32 --set data.n_test=16
       --set gn.tune_images=16 --set run.csd_tune_t0=[0.45] --set run.csd_tune_steps=[50] --set run.csd_tune_images=8
       --set csd.n_steps=50 --set cvae.vae.epochs=1 --set cvae.regressor.epochs=1 --set cnf.flow.epochs=1
       --set score.score.epochs=2 --set unet.regression.epochs=1 --set run.figure_samples=2 --set train.progress=false)
timeout 200 python3 -m dgm_eit run --profile "$PROFILE" --device "$DEVICE" --seeds 1 --out "$OUT_DIR/run" --seed 0 "${SHORT[@]}" \
  > "$OUT_DIR/run.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"; tail -25 "$OUT_DIR/run.log"

echo "== 3. the full study from these measurements"
python3 benchmarks/paper_gpu_estimate.py "$OUT_DIR" "$PROFILE" | tee "$OUT_DIR/estimate.txt"
echo "total $(( $(date +%s) - start )) s"
