#!/bin/bash
# Text-to-image FID (MSCOCO 256, the paper's Table 2) on Slurm: one srun task per node runs torchrun (c10d
# rendezvous), one rank per GPU.
#
#   sbatch slurm/t2i_fid.sh --prior runs/prior/prior.safetensors --divae runs/decoder_f8/divae.safetensors \
#       --data data/coco_t2i_val --out runs/t2i_fid
#   sbatch --nodes=4 slurm/t2i_fid.sh --prior ... --divae ... --data ... --sampler ddpm --out runs/t2i_fid_ddpm
#   # CPU nodes (gloo), 2 ranks per node:
#   NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=4 slurm/t2i_fid.sh --prior ... --divae ... --data ...
#
# Arguments go to `python -m evaluation.t2i_fid` unchanged. Every rank saves its partial sums into
# <out>/partial every --save-every images and every --save-every-min minutes (default 10). When the job is
# preempted or nears its time limit (USR1 120 s before it; or `scancel --signal=USR1 --full`), the batch shell
# forwards the signal to the step (torchrun itself ignores USR1, the ranks handle it): every rank saves at the
# next batch boundary, rank 0 leaves <out>/REQUEUE and the ranks exit with code 75; then this script requeues
# the job and the rerun continues from the partial sums, ending with the same figure.
# Knobs: DIVAE_VENV, NPROC_PER_NODE, MASTER_PORT, OMP_NUM_THREADS (see slurm/_common.sh).
#SBATCH --job-name=divae-t2i-fid
#SBATCH --nodes=1
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

[[ -n ${SLURM_JOB_ID:-} ]] || divae_die "not inside a Slurm job: submit with sbatch, or run torchrun directly"
[[ " $* " == *" --prior "* && " $* " == *" --divae "* && " $* " == *" --data "* ]] \
    || divae_die "usage: sbatch $0 --prior PRIOR --divae DIVAE --data COCO_PAIRS [--out DIR] ..."
divae_eval evaluation.t2i_fid runs/t2i_fid "$@"
