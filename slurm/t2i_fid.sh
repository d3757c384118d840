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
divae_activate

nnodes=${SLURM_NNODES:-1}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[[ $nproc =~ ^[0-9]+$ && $nproc -gt 0 ]] || nproc=1
cpus=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

out=runs/t2i_fid  # --out as t2i_fid parses it (the last one wins); the REQUEUE marker is written there
args=("$@")
for (( i = 0; i < ${#args[@]}; i++ )); do
    [[ ${args[i]} == --out ]] && out=${args[i+1]:-$out}
    [[ ${args[i]} == --out=* ]] && out=${args[i]#--out=}
done
rm -f "$out/$DIVAE_REQUEUE_MARKER"

step=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus"
      bash -c 'trap "" USR1; exec "$@"' torchrun-ignoring-usr1
      torchrun --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d
      --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
      -m evaluation.t2i_fid "$@")
divae_log "restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc rank(s), master $MASTER_ADDR:$MASTER_PORT"
divae_log "${step[*]}"

# USR1/TERM: forward to the step; the ranks save, then exit 75 after USR1 (requeue) or 143 after TERM (scancel:
# the job ends for good, as for training).
_forward() {
    divae_log "batch shell got SIG$1; forwarding it to the evaluation step (the ranks save, then exit)"
    [[ $1 == USR1 ]] && preempted=1
    kill -s "$1" "$step_pid" 2>/dev/null
    return 0
}
preempted=0
trap '_forward USR1' USR1
trap '_forward TERM' TERM
"${step[@]}" &
step_pid=$!
while :; do
    wait "$step_pid"
    rc=$?
    kill -0 "$step_pid" 2>/dev/null || break  # else `wait` was interrupted by a trapped signal
done
trap - USR1 TERM
divae_log "evaluation step exited with code $rc"
(( rc == 0 )) && exit 0
if [[ $rc == "$DIVAE_REQUEUE_EXIT_CODE" || -f $out/$DIVAE_REQUEUE_MARKER ]]; then
    rm -f "$out/$DIVAE_REQUEUE_MARKER"
    if (( ${SLURM_RESTART_COUNT:-0} >= ${DIVAE_MAX_REQUEUES:-50} )); then
        divae_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (DIVAE_MAX_REQUEUES)"
        exit "$rc"
    fi
    divae_log "ranks saved their partial sums and asked for a requeue: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
(( preempted )) && divae_log "the step stopped (code $rc) after a preemption signal without saving; not requeueing"
exit "$rc"
