#!/usr/bin/env bash
# One device call: versions, the gpu-marked tests, the kernel bench and the MFU bench, logs under $OUT.
# Usage (on the device machine, from the repo root): bash tools/gpu_session.sh [steps...]
# steps: info tests kernels sweep mfu mfu32 (default: info tests kernels mfu)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-info tests kernels mfu}
(python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || echo "build_ext failed, see build.log") &
for s in $steps; do
  case $s in
    info) { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
            python3 -c "import torch,triton,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'triton',triton.__version__)"; } 2>&1 | tee "$OUT/info.log" ;;
    tests) timeout 300 python3 -m pytest -m gpu -q tests/kernels tests/model/test_cuda_graphs.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.log" ;;
    kernels) timeout 240 python3 -m engine.bench kernels 2>&1 | tee "$OUT/kernels.log" ;;
    sweep) timeout 300 python3 tools/gpu_norm_sweep.py 2>&1 | tee "$OUT/sweep.log" ;;
    mfu) wait; for mb in 8 16; do
           timeout 280 python3 -m engine.bench mfu --model gpt2-350m --seq 1024 --micro-batch $mb 2>&1 | tail -20 \
             | tee -a "$OUT/mfu.log"; done ;;
    mfu32) wait; timeout 300 python3 -m engine.bench mfu --model gpt2-350m --seq 1024 --micro-batch 32 2>&1 \
             | tail -20 | tee -a "$OUT/mfu.log" ;;
    *) eval "$s" 2>&1 | tee -a "$OUT/extra.log" ;;
  esac
done
wait
