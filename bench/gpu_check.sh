#!/usr/bin/env bash
# The first run on a lent GPU: tests marked gpu, the paper-scale UNet step (bf16: ms/image, peak memory, MFU), a
# 20-step 1-GPU ZeRO-2 bf16 decoder_f16 run at the preset micro-batch, and recon_fid on a few images; every figure
# in one results file (bench/gpu_check_results.json). At most 8 minutes on one H100/H200-class GPU.
#   bash bench/gpu_check.sh [--cpu-dry-run] [--out FILE] [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DIVAE_VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python
exec timeout 480 "$PY" bench/gpu_check.py "$@"
