#!/usr/bin/env bash
# The GPU figures of issue 7, inside 8 minutes on one H200, for a session that is lent a GPU.
# The GPU machine has torch but not Ray, so these run the project's step without Ray.
#
#   make gpu-data                                   # here: the Shakespeare dataset for 1 worker x 256 rows
#   device run, carry [".gpu-data"]:  bash bench/gpu.sh
#
# Prints: the GPU and library versions; the step's profile at batch 200 (bf16); tokens/s and MFU
# at batch 200, 1024 and 4096 in fp32, bf16 and bf16 + CUDA graph; the time to each
# validation loss of the quality recipe trained for 4 minutes on the real corpus.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"  # the GPU machine has torch, not this project installed
PY=${PY:-python3}
TRACE_DIR=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
echo "== profile, batch 200, bf16"
timeout 60 $PY bench/step_profile.py --device cuda --batch 200 --trace "$TRACE_DIR/gpu-step-trace.json"
echo "== speed"
timeout 120 $PY bench/gpu.py speed --batches 200,1024,4096
echo "== quality, 4 minutes of training"
timeout 290 $PY bench/gpu.py quality --dataset .gpu-data --minutes 4
