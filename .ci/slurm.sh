#!/usr/bin/env bash
# A real, tiny Slurm cluster on this machine for the Slurm tests: munged, slurmctld and two slurmd
# "nodes" (n1, n2) on loopback, each with 2 CPUs. Needs root (CI and the dev machines run as root).
#
#   bash .ci/slurm.sh up      # install (apt) if missing, write the config, start, wait until idle
#   bash .ci/slurm.sh down    # stop slurmd x2, slurmctld, munged (only the ones this script started)
#   bash .ci/slurm.sh status
#
# Both commands are idempotent. State, spool and logs live in $DIVAE_SLURM_DIR (default
# /tmp/divae-slurm); the config is written to /etc/slurm/slurm.conf, which is refused if a
# slurm.conf not written by this script is already there (a real cluster's config is never touched).
# Measured recipe and pitfalls: shared/notes/slurm-local.md.
set -euo pipefail

DIR=${DIVAE_SLURM_DIR:-/tmp/divae-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by divae .ci/slurm.sh"
NODES=(n1 n2)
HOST=$(hostname -s)

log() { echo "[slurm.sh] $*"; }
die() { echo "[slurm.sh] error: $*" >&2; exit 1; }

pid_alive() {  # pidfile -> true when its process runs (a <defunct> zombie counts as dead)
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ -d /proc/$pid ]] || return 1
    ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null
}

install_packages() {
    local missing=()
    for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing+=("$b"); done
    if ((${#missing[@]} == 0)); then return; fi
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]} and not root: install slurmctld slurmd slurm-client munge"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

ensure_hosts() {
    # node names (and this host) must resolve, or c10d fails with "gai error: -2"
    local name
    for name in "${NODES[@]}" "$HOST"; do
        if ! getent hosts "$name" >/dev/null; then
            log "adding '127.0.0.1 $name' to /etc/hosts"
            echo "127.0.0.1 $name" >>/etc/hosts
        fi
    done
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    mkdir -p /etc/slurm "$DIR"/{state,log} "${NODES[@]/#/$DIR/spool/}"
    log "writing $CONF (state, spool, logs in $DIR)"
    {
        echo "$MARK"
        cat <<EOF
ClusterName=divae
SlurmctldHost=$HOST
AuthType=auth/munge
# a requeued job otherwise waits ~121 s before it may start again
AuthInfo=cred_expire=10
CredType=cred/munge
CommunicationParameters=NoInAddrAny
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# otherwise requeued jobs start only on 30 s backfill ticks
SchedulerParameters=bf_interval=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    } >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged already running"; return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (munge -n | unmunge fails)"
}

wait_idle() {
    local states
    for _ in $(seq 150); do
        states=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ $states == "idle " ]]; then log "cluster up: $(sinfo -h -o '%P %D %T %N')"; return; fi
        sleep 0.2
    done
    die "nodes not idle after 30 s (sinfo: '${states:-no answer}'); see $DIR/log/"
}

up() {
    install_packages
    ensure_hosts
    if [[ -f $CONF ]] && grep -qF "$MARK" "$CONF" && pid_alive "$DIR/state/slurmctld.pid" \
        && pid_alive "$DIR/spool/slurmd-n1.pid" && pid_alive "$DIR/spool/slurmd-n2.pid"; then
        log "already running"
        wait_idle
        return
    fi
    write_config
    start_munge
    if ! pid_alive "$DIR/state/slurmctld.pid"; then
        log "starting slurmctld (clean state)"
        slurmctld -c -i
    fi
    local n
    for n in "${NODES[@]}"; do
        if ! pid_alive "$DIR/spool/slurmd-$n.pid"; then
            log "starting slurmd -N $n"
            slurmd -N "$n"
        fi
    done
    wait_idle
}

down() {
    local n pidfile
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then die "$CONF is not ours; not stopping anything"; fi
    if pid_alive "$DIR/state/slurmctld.pid"; then
        log "scancel all jobs, scontrol shutdown"
        scancel --full --quiet -u root 2>/dev/null || true
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for pidfile in "$DIR/state/slurmctld.pid" "${NODES[@]/#/$DIR/spool/slurmd-}"; do
        [[ $pidfile == *slurmd-* ]] && pidfile+=.pid
        for _ in $(seq 50); do pid_alive "$pidfile" || break; sleep 0.1; done
        if pid_alive "$pidfile"; then log "killing $(cat "$pidfile") ($pidfile)"; kill "$(cat "$pidfile")"; fi
    done
    if [[ -s /run/munge/munged.pid ]] && pid_alive /run/munge/munged.pid; then
        log "stopping munged"
        kill "$(cat /run/munge/munged.pid)"
    fi
    log "down"
}

status() {
    for n in slurmctld "${NODES[@]}"; do
        local f=$DIR/spool/slurmd-$n.pid
        [[ $n == slurmctld ]] && f=$DIR/state/slurmctld.pid
        if pid_alive "$f"; then echo "$n: running (pid $(cat "$f"))"; else echo "$n: stopped"; fi
    done
    sinfo 2>/dev/null || true
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
