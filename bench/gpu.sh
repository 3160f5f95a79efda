#!/usr/bin/env bash
# GPU check for an NVIDIA machine: throughput of raycurv's estimator and of training for ResNet-18
# at CIFAR shapes (synthetic tensors), in fp32 and in half precision (method hvp; autocast
# training), with the same side-by-side ratios as bench/estimator.py, plus the estimator's
# agreement with the plain implementation. A few minutes on a recent GPU.
#
#   bash bench/gpu.sh                      # B = 256, n = 10, bf16
#   BATCH=512 HALF=fp16 REPS=7 bash bench/gpu.sh
#
# Without a GPU it says so and exits 1. Output ends with bench/estimator.py's JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device visible to torch" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python -m bench.estimator --device cuda --cases "${CASES:-cifar-resnet18,fmnist}" \
    --batch "${BATCH:-256}" --probes "${PROBES:-10}" --reps "${REPS:-5}" --resnet-reps "${REPS:-5}" \
    --train-samples "${TRAIN_SAMPLES:-2048}" --threads "$(nproc)" --hvp --half "${HALF:-bf16}" \
    --no-pass-sizes
