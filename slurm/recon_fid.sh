#!/bin/bash
# Reconstruction FID (Table 1) on Slurm: one srun task per node runs torchrun (c10d rendezvous), one rank per GPU.
#
#   sbatch slurm/recon_fid.sh --checkpoint runs/decoder_f16/divae.safetensors --data data/imagenet_val \
#       --decoder both --out runs/eval_f16
#   sbatch --nodes=4 slurm/recon_fid.sh --checkpoint ... --data ... --sampler ddim --steps 25 --out runs/eval_ddim25
#   # CPU nodes (gloo), 2 ranks per node:
#   NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=4 slurm/recon_fid.sh --checkpoint ... --data ...
#
# Arguments go to `python -m evaluation.recon_fid` unchanged. Every rank saves its partial sums every
# --save-every images into <out>/partial; when the job is preempted or nears its time limit (USR1 120 s
# before it) it requeues itself and the rerun continues from there, ending with the same figure.
# Knobs: DIVAE_VENV, NPROC_PER_NODE, MASTER_PORT, OMP_NUM_THREADS (see slurm/_common.sh).
#SBATCH --job-name=divae-recon-fid
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

# Under sbatch this file runs from a spool copy: find the repository through the submitted path.
if [[ -z ${DIVAE_ROOT:-} ]]; then
    script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    DIVAE_ROOT=$(cd "$(dirname "${script:-${BASH_SOURCE[0]}}")/.." 2>/dev/null && pwd)
    [[ -f $DIVAE_ROOT/slurm/_common.sh ]] || DIVAE_ROOT=${SLURM_SUBMIT_DIR:-.}
fi
[[ -f $DIVAE_ROOT/slurm/_common.sh ]] || { echo "cannot find slurm/_common.sh; export DIVAE_ROOT=<repo>" >&2; exit 2; }
source "$DIVAE_ROOT/slurm/_common.sh"

[[ -n ${SLURM_JOB_ID:-} ]] || divae_die "not inside a Slurm job: submit with sbatch, or run torchrun directly"
[[ " $* " == *" --checkpoint "* && " $* " == *" --data "* ]] \
    || divae_die "usage: sbatch $0 --checkpoint WEIGHTS --data VAL_SHARDS [--decoder both] [--out DIR] ..."
divae_activate

nnodes=${SLURM_NNODES:-1}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[[ $nproc =~ ^[0-9]+$ && $nproc -gt 0 ]] || nproc=1
cpus=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

step=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus"
      torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d
      --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
      -m evaluation.recon_fid "$@")
divae_log "restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc rank(s), master $MASTER_ADDR:$MASTER_PORT"
divae_log "${step[*]}"

# Preemption warning: the partial sums on disk are at most --save-every images old, so requeue at once.
_requeue() {
    if (( ${SLURM_RESTART_COUNT:-0} >= ${DIVAE_MAX_REQUEUES:-50} )); then
        divae_log "got SIG$1; not requeueing: already restarted ${SLURM_RESTART_COUNT} times"
        return
    fi
    divae_log "got SIG$1: requeueing job $SLURM_JOB_ID (the rerun resumes from the partial sums)"
    scontrol requeue "$SLURM_JOB_ID"
}
trap '_requeue USR1' USR1
trap '_requeue TERM' TERM
"${step[@]}" &
step_pid=$!
while :; do
    wait "$step_pid"
    rc=$?
    kill -0 "$step_pid" 2>/dev/null || break  # else `wait` was interrupted by a trapped signal
done
divae_log "evaluation step exited with code $rc"
exit "$rc"
