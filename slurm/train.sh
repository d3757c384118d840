#!/bin/bash
# Train a stage on Slurm: one srun task per node runs torchrun (c10d rendezvous), one rank per GPU. The one
# training script: slurm/train_vq.sh, train_decoder.sh and train_prior.sh are links to it, and the name a job
# is submitted under picks the stage's default config (divae_default_config in slurm/_common.sh), used when no
# config is given; slurm/train.sh itself has none and needs one.
#
#   sbatch slurm/train_vq.sh configs/vq_f16.yaml [key=value ...]            # VQ stage
#   sbatch slurm/train_decoder.sh configs/decoder_f16.yaml [key=value ...]  # diffusion decoder (UNet on VQ tokens)
#   sbatch slurm/train_prior.sh configs/prior_base.yaml [key=value ...]     # text-to-image-token prior
#   sbatch slurm/train_decoder.sh        # no config: the stage's default (configs/decoder_f16.yaml)
#   sbatch slurm/train.sh configs/distill_f16.yaml                          # any config; none is refused
#   sbatch --nodes=4 --partition=gpu slurm/train_decoder.sh configs/decoder_f16.yaml train.batch_size=256
#   # CPU nodes (gloo), 2 ranks per node:
#   NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=8 slurm/train_decoder.sh configs/decoder_tiny.yaml
#
# Flags given to sbatch override the defaults below. No --job-name: Slurm names the job after the script it was
# submitted as (train_decoder.sh, ...), so squeue and the log (slurm-train_decoder.sh-<job id>.out) tell the
# stages apart. The job requeues itself when it is preempted or reaches its time limit (USR1 120 s before it)
# and resumes from <run_dir>/latest. See slurm/_common.sh.
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

# Not in slurm/_common.sh: this block is what finds that file, so it cannot be sourced from it.
# Under sbatch this file runs from a spool copy: find the repository through the submitted path.
if [[ -z ${DIVAE_ROOT:-} ]]; then
    script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    DIVAE_ROOT=$(cd "$(dirname "${script:-${BASH_SOURCE[0]}}")/.." 2>/dev/null && pwd)
    [[ -f $DIVAE_ROOT/slurm/_common.sh ]] || DIVAE_ROOT=${SLURM_SUBMIT_DIR:-.}
fi
[[ -f $DIVAE_ROOT/slurm/_common.sh ]] || { echo "cannot find slurm/_common.sh; export DIVAE_ROOT=<repo>" >&2; exit 2; }
source "$DIVAE_ROOT/slurm/_common.sh"

divae_train "${@:-$(divae_default_config "$(divae_submitted_script)")}"
