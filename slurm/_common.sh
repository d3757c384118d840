# Shared launch helpers for slurm/train.sh (divae_train; train_vq.sh, train_decoder.sh, train_prior.sh link to it)
# and slurm/recon_fid.sh, t2i_fid.sh (divae_eval)
# (sourced, not run). One `srun` task per node starts
# `torchrun` with c10d rendezvous on the job's first node; the batch shell forwards preemption
# signals to the step and requeues the job when the trainer stopped for preemption.
#
# Signals (submitit's convention, runtime/signals.py): USR1 (`--signal=B:USR1@N` before the time limit,
# or `scancel --signal=USR1 --full`) = checkpoint, then requeue and resume. A plain `scancel JOBID`
# (SIGTERM) = checkpoint at the next step, then the job ends for good: never requeued.
#
# Environment knobs (all optional):
#   DIVAE_VENV            virtualenv to activate (default: <repo>/.venv when it exists)
#   NPROC_PER_NODE        ranks per node (default: SLURM_GPUS_ON_NODE, the GPUs allocated on the node; on a node
#                         without GPUs 1 = CPU; a node with GPUs whose count Slurm does not give is refused,
#                         divae_nproc); "cpus": one rank per CPU the job holds on the node (CPU runs: a requeued
#                         job given fewer CPUs then runs on fewer ranks, and resumes elastically, docs/reliability.md
#                         "Elastic resume")
#   MASTER_PORT           rendezvous port (default: 20000 + job id % 20000)
#   DIVAE_LAUNCHER        torchrun (default) | srun (one srun task per rank, no torchrun)
#   DIVAE_MAX_REQUEUES    stop requeueing after this many restarts (default 50)
#   DIVAE_SHUTDOWN_TIMEOUT seconds torchrun waits for ranks to checkpoint after SIGTERM (default 100)
#   DIVAE_RESIGNAL_S      after a USR1, repeat it to the step every this many seconds until the step ends, for
#                         ranks still starting up when it came (default 10)
#   OMP_NUM_THREADS       default: CPUs of the task / ranks per node
#   DIVAE_INIT_TIMEOUT_S  seconds the ranks wait for each other at start-up (default 300; runtime/launch.py), apart
#                         from the collective timeout (30 min training, --pg-timeout-min evaluation)
#   DIVAE_NCCL_DUMP_DIR   where NCCL's flight recorder writes each rank's last collectives when a collective times
#                         out (default <submit dir>/nccl_dumps/<job id>; runtime/launch.py sets the TORCH_NCCL_*)
#
# Rendezvous: the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`) is the c10d endpoint, and every
# torchrun passes its own Slurm node name as --local-addr, so the MASTER_ADDR the ranks (and the watchdog)
# connect to is a name from the node list, not the rank-0 agent's getfqdn(), which may not resolve elsewhere.

# Exit code of a preempted rank and the marker file it leaves in the run folder (runtime/signals.py).
DIVAE_REQUEUE_EXIT_CODE=75
DIVAE_REQUEUE_MARKER=REQUEUE

# torchrun wrapped for the step: ignores USR1 (see divae_train) and gives its node's Slurm name as --local-addr.
DIVAE_TORCHRUN=(bash -c 'trap "" USR1; exec "$1" --local-addr="${SLURMD_NODENAME:-$(hostname)}" "${@:2}"'
                torchrun-ignoring-usr1 torchrun)

divae_log() { echo "[divae $(date +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] $*"; }
divae_die() { echo "[divae] error: $*" >&2; exit 2; }

# Activate the project's environment: $DIVAE_VENV, else <repo>/.venv, else the python on PATH.
divae_activate() {
    local venv=${DIVAE_VENV:-$DIVAE_ROOT/.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    elif [[ -n ${DIVAE_VENV:-} ]]; then
        divae_die "DIVAE_VENV=$DIVAE_VENV has no bin/activate"
    fi
    command -v python >/dev/null || divae_die "no python on PATH; set DIVAE_VENV to the project's virtualenv"
    if ! python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("trainer") is None)' 2>/dev/null; then
        export PYTHONPATH=$DIVAE_ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
}

# divae_nproc: ranks per node (NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else 1 on a node without GPUs); refuses,
# in one line, a node with GPUs whose count Slurm does not give (one rank would silently use one GPU of them).
divae_nproc() {
    local n=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    [[ $n == cpus ]] && n=${SLURM_CPUS_ON_NODE:-1}
    if [[ -z $n || $n == 0 ]]; then
        if [[ -n $(nvidia-smi -L 2>/dev/null | grep '^GPU') ]]; then
            divae_die "cannot tell how many GPUs per node this job holds (SLURM_GPUS_ON_NODE unset on a node with GPUs): submit with --gpus-per-node=N or set NPROC_PER_NODE"
        fi
        n=1  # a CPU node
    fi
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || divae_die "NPROC_PER_NODE=$n: need a positive number of ranks or 'cpus'"
    echo "$n"
}

# divae_dist_env: the rendezvous variables of the step (MASTER_ADDR from the node list, MASTER_PORT) and the
# NCCL flight-recorder dump folder.
divae_dist_env() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $MASTER_ADDR ]] || divae_die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    export DIVAE_NCCL_DUMP_DIR=${DIVAE_NCCL_DUMP_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/nccl_dumps/$SLURM_JOB_ID}
}

# The run folder the trainer will use (where it leaves the REQUEUE marker), resolved by the trainer's
# own config loader; empty when it cannot be resolved (the exit-code and signal rules still apply).
divae_run_dir() {
    python - "$@" 2>/dev/null <<'EOF' || true
import sys
from trainer.config import load_train_config
print(load_train_config(sys.argv[2], sys.argv[3:]).train.run_dir)
EOF
}

# divae_submitted_script: the path this batch script was started as. sbatch runs a spool copy named slurm_script;
# `scontrol show job` keeps the submitted path (a link's own name, not its target's). Outside sbatch: $0.
divae_submitted_script() {
    if [[ $(basename "$0") != slurm_script ]]; then
        echo "$0"
        return
    fi
    scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p'
}

# divae_default_config SCRIPT: the default config of the stage a training script's name stands for (train_vq.sh,
# train_decoder.sh, train_prior.sh: links to slurm/train.sh, so the name is all that tells them apart); nothing for
# slurm/train.sh, which needs a config.
divae_default_config() {
    case $(basename "$1") in
        train_vq.sh) echo configs/vq_f16.yaml ;;
        train_decoder.sh) echo configs/decoder_f16.yaml ;;
        train_prior.sh) echo configs/prior_base.yaml ;;
    esac
}

# divae_train CONFIG.yaml [key=value ...]: run the trainer on every node of the allocation. The config is checked
# first, so that a missing one is a one-line usage error in or out of Slurm.
divae_train() {
    local config=${1:-} me
    me=$(divae_submitted_script)
    me=slurm/$(basename "${me:-train.sh}")
    [[ $config == *.yaml || $config == *.yml ]] || divae_die "usage: sbatch $me configs/<preset>.yaml [key=value ...]"
    [[ -f $config ]] || divae_die "config '$config' not found (relative paths start at the submit dir $PWD)"
    [[ -n ${SLURM_JOB_ID:-} ]] \
        || divae_die "not inside a Slurm job (config $config): submit with sbatch, or run torchrun directly"
    shift
    divae_activate

    local nnodes=${SLURM_NNODES:-1} nproc
    nproc=$(divae_nproc) || exit 2
    local cpus=${SLURM_CPUS_PER_TASK:-1}
    local cpus_per_rank=$(( cpus / nproc > 0 ? cpus / nproc : 1 ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_rank}
    divae_dist_env
    # Seconds torchrun gives its ranks to checkpoint after a SIGTERM before it SIGKILLs them.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${DIVAE_SHUTDOWN_TIMEOUT:-100}

    local run_dir launcher=${DIVAE_LAUNCHER:-torchrun}
    local -a step
    case $launcher in
        torchrun)
            step=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1
                  --cpus-per-task="$cpus"
                  "${DIVAE_TORCHRUN[@]}" --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d
                  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
                  -m trainer.train --config "$config" "$@") ;;
        srun)
            step=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks=$(( nnodes * nproc ))
                  --ntasks-per-node="$nproc" --cpus-per-task="$cpus_per_rank"
                  python -m trainer.train --config "$config" "$@") ;;
        *) divae_die "DIVAE_LAUNCHER must be torchrun or srun, not '$launcher'" ;;
    esac
    divae_log "restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc rank(s), master $MASTER_ADDR:$MASTER_PORT," \
              "OMP_NUM_THREADS=$OMP_NUM_THREADS, python $(command -v python)"
    divae_log "${step[*]}"

    # The batch shell gets USR1 from `--signal=B:USR1@N` or `scancel --signal=USR1 --full`: remember it
    # and forward it to srun, which signals every process of the step. torchrun itself ignores USR1
    # (inherited SIG_IGN; the trainer installs its own handler): torchrun treats a signal it handles as
    # fatal, and a second one (a --full scancel reaches the step twice) makes it SIGKILL the ranks
    # while they are still writing their checkpoint.
    DIVAE_PREEMPTED=0
    DIVAE_CANCELLED=0
    DIVAE_STEP_PID=
    trap '_divae_forward USR1' USR1
    trap '_divae_forward TERM' TERM
    # Resolve the run folder (a python start-up: seconds) while the step runs; needed only after it.
    local run_dir_file
    run_dir_file=$(mktemp)
    divae_run_dir --config "$config" "$@" >"$run_dir_file" &
    local run_dir_pid=$!
    local rc
    _divae_wait_step "${step[@]}"
    rc=$DIVAE_STEP_RC
    divae_log "training step exited with code $rc"
    while kill -0 "$run_dir_pid" 2>/dev/null; do wait "$run_dir_pid"; done
    run_dir=$(cat "$run_dir_file")
    rm -f "$run_dir_file"
    (( rc == 0 )) && return 0
    if [[ $DIVAE_CANCELLED == 1 && $DIVAE_PREEMPTED == 0 ]]; then
        divae_log "the job was cancelled (SIGTERM without a preemption USR1): not requeueing"
        [[ -n $run_dir ]] && rm -f "$run_dir/$DIVAE_REQUEUE_MARKER"
        return "$rc"
    fi

    local why=
    if [[ $rc == "$DIVAE_REQUEUE_EXIT_CODE" ]]; then
        why="a rank exited with the requeue code $rc"
    elif [[ -n $run_dir && -f $run_dir/$DIVAE_REQUEUE_MARKER ]]; then
        why="the trainer left $run_dir/$DIVAE_REQUEUE_MARKER (step $(cat "$run_dir/$DIVAE_REQUEUE_MARKER"))"
    elif [[ $DIVAE_PREEMPTED == 1 && $rc != 0 ]]; then
        why="the job was signalled for preemption and the step stopped (code $rc)"
    fi
    [[ -n $why ]] || return "$rc"
    [[ -n $run_dir ]] && rm -f "$run_dir/$DIVAE_REQUEUE_MARKER"
    if (( ${SLURM_RESTART_COUNT:-0} >= ${DIVAE_MAX_REQUEUES:-50} )); then
        divae_log "not requeueing: already restarted ${SLURM_RESTART_COUNT:-0} times (DIVAE_MAX_REQUEUES)"
        return "$rc"
    fi
    divae_log "requeueing job $SLURM_JOB_ID: $why"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
}

_divae_forward() {
    divae_log "batch shell got SIG$1; forwarding it to the step (the ranks save, then exit)"
    [[ $1 == TERM ]] && DIVAE_CANCELLED=1
    [[ -n $DIVAE_STEP_PID ]] && kill -s "$1" "$DIVAE_STEP_PID" 2>/dev/null
    if [[ $1 == USR1 && $DIVAE_PREEMPTED == 0 && -n $DIVAE_STEP_PID ]]; then
        # A rank that is still importing has USR1 ignored (inherited from torchrun-ignoring-usr1) until the
        # trainer installs its handler, and would lose the signal: repeat it every DIVAE_RESIGNAL_S seconds
        # until the step ends (harmless to a rank that already has it: it only sets a flag again).
        _divae_resignal "$DIVAE_STEP_PID" "${DIVAE_RESIGNAL_S:-10}" &
        DIVAE_RESIGNAL_PID=$!
    fi
    [[ $1 == USR1 ]] && DIVAE_PREEMPTED=1
    return 0
}

_divae_resignal() {
    local pid=$1 every=$2
    trap - USR1 TERM
    while sleep "$every" && kill -0 "$pid" 2>/dev/null; do
        kill -s USR1 "$pid" 2>/dev/null || break
    done
}

# divae_eval MODULE DEFAULT_OUT [args ...]: run `python -m MODULE args` (evaluation.recon_fid, evaluation.t2i_fid)
# on every node under torchrun; USR1/TERM go to the step (the ranks save their partial sums, then exit 75 after
# USR1, 143 after TERM); exit 75 or <out>/REQUEUE requeues the job. DEFAULT_OUT: the module's default --out.
divae_eval() {
    local module=$1 default_out=$2
    shift 2
    divae_activate

    local nnodes nproc cpus out args i step rc
    nnodes=${SLURM_NNODES:-1}
    nproc=$(divae_nproc) || exit 2
    cpus=${SLURM_CPUS_PER_TASK:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
    divae_dist_env

    out=$default_out  # --out as the module parses it (the last one wins); the REQUEUE marker is written there
    args=("$@")
    for (( i = 0; i < ${#args[@]}; i++ )); do
        [[ ${args[i]} == --out ]] && out=${args[i+1]:-$out}
        [[ ${args[i]} == --out=* ]] && out=${args[i]#--out=}
    done
    rm -f "$out/$DIVAE_REQUEUE_MARKER"

    step=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus"
          "${DIVAE_TORCHRUN[@]}" --nnodes="$nnodes" --nproc_per_node="$nproc" --rdzv_backend=c10d
          --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
          -m "$module" "$@")
    divae_log "restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc rank(s), master $MASTER_ADDR:$MASTER_PORT"
    divae_log "${step[*]}"

    # USR1/TERM: forward to the step; the ranks save, then exit 75 after USR1 (requeue) or 143 after TERM (scancel:
    # the job ends for good, as for training).
    DIVAE_PREEMPTED=0
    DIVAE_STEP_PID=
    DIVAE_CANCELLED=0
    trap '_divae_forward USR1' USR1
    trap '_divae_forward TERM' TERM
    _divae_wait_step "${step[@]}"
    rc=$DIVAE_STEP_RC
    divae_log "evaluation step exited with code $rc"
    (( rc == 0 )) && exit 0
    if [[ $rc == "$DIVAE_REQUEUE_EXIT_CODE" || -f $out/$DIVAE_REQUEUE_MARKER ]]; then
        rm -f "$out/$DIVAE_REQUEUE_MARKER"
        if (( ${SLURM_RESTART_COUNT:-0} >= ${DIVAE_MAX_REQUEUES:-50} )); then
            divae_log "not requeueing: already restarted ${SLURM_RESTART_COUNT:-0} times (DIVAE_MAX_REQUEUES)"
            exit "$rc"
        fi
        divae_log "ranks saved their partial sums and asked for a requeue: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    (( DIVAE_PREEMPTED )) \
        && divae_log "the step stopped (code $rc) after a preemption signal without saving; not requeueing"
    exit "$rc"
}

# _divae_wait_step CMD ...: run the step in the background (its pid in DIVAE_STEP_PID, for _divae_forward) and
# wait for it through trapped signals; its exit code in DIVAE_STEP_RC; the USR1/TERM traps are cleared after.
_divae_wait_step() {
    "$@" &
    DIVAE_STEP_PID=$!
    while :; do
        wait "$DIVAE_STEP_PID"
        DIVAE_STEP_RC=$?
        kill -0 "$DIVAE_STEP_PID" 2>/dev/null || break  # else `wait` was interrupted by a trapped signal
    done
    trap - USR1 TERM
    [[ -n ${DIVAE_RESIGNAL_PID:-} ]] && kill "$DIVAE_RESIGNAL_PID" 2>/dev/null
    DIVAE_RESIGNAL_PID=
    return 0
}
