#!/bin/bash
# Train the VQ stage (encoder, codebook, CNN decoder, discriminator) on Slurm: one srun task per node runs torchrun (c10d rendezvous), one rank per GPU.
#
#   sbatch slurm/train_vq.sh configs/vq_f16.yaml [key=value ...]
#   sbatch --nodes=4 --partition=gpu slurm/train_vq.sh configs/vq_f16.yaml train.batch_size=256
#   # CPU nodes (gloo), 2 ranks per node:
#   NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=8 slurm/train_vq.sh configs/vq_tiny.yaml
#
# Flags given to sbatch override the defaults below. The job requeues itself when it is preempted or
# reaches its time limit (USR1 120 s before it) and resumes from <run_dir>/latest. See slurm/_common.sh.
#SBATCH --job-name=divae-vq
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

# Under sbatch this file runs from a spool copy: find the repository through the submitted path.
if [[ -z ${DIVAE_ROOT:-} ]]; then
    script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    DIVAE_ROOT=$(cd "$(dirname "${script:-${BASH_SOURCE[0]}}")/.." 2>/dev/null && pwd)
    [[ -f $DIVAE_ROOT/slurm/_common.sh ]] || DIVAE_ROOT=${SLURM_SUBMIT_DIR:-.}
fi
[[ -f $DIVAE_ROOT/slurm/_common.sh ]] || { echo "cannot find slurm/_common.sh; export DIVAE_ROOT=<repo>" >&2; exit 2; }
source "$DIVAE_ROOT/slurm/_common.sh"

divae_train "${@:-configs/vq_f16.yaml}"
