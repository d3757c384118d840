#!/usr/bin/env bash
# The first run on a lent GPU: tests/test_gpu_unet.py, the paper-scale UNet step (bf16 and fp32: ms/image, peak
# memory, MFU), the planner's prediction, a 20-step 1-GPU ZeRO-2 bf16 decoder_f16 run at the preset micro-batch,
# and recon_fid on a few images; every figure in one results file (bench/gpu_check_results.json), rewritten
# after each step. Its first line says what the venv must hold. Each step has its own limit (bench/gpu_check.py,
# SCHEDULE); they add up to less than this outer limit of 8 minutes (TOTAL_LIMIT_S there).
#   bash bench/gpu_check.sh [--cpu-dry-run] [--out FILE] [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DIVAE_VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python
exec timeout 480 "$PY" bench/gpu_check.py "$@"
