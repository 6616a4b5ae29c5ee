#!/bin/bash
# bash tests/slurm/cluster.sh install|up|down DIR
#
# A one-node Slurm cluster on this machine, for `make test-slurm`: Debian's slurmctld, slurmd and
# munge, everything (config, keys, state, logs, sockets) under DIR, ports 16817/16818, no cgroups
# (proctrack/linuxproc, task/none), the node's real CPUs, no GPUs. Needs root. Clients find it
# through SLURM_CONF=DIR/slurm.conf. `down` cancels what is left in the queue and stops the
# three daemons by the pids they wrote, nothing else.
set -euo pipefail

cmd=${1:?install|up|down}
DIR=${2:-}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    echo "installing slurmctld slurmd slurm-client munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

up() {
    local node cpus
    mkdir -p "$DIR"/{state,spool,log}
    node=$(hostname -s)
    cpus=$(nproc --all)
    [ -f "$DIR/munge.key" ] || mungekey -c -k "$DIR/munge.key"
    # munged refuses to run as root unless forced; its socket lives in DIR so a system munged (if
    # any) is left alone.
    munged --force -S "$DIR/munge.sock" --key-file="$DIR/munge.key" --log-file="$DIR/log/munged.log" \
        --pid-file="$DIR/munged.pid" --seed-file="$DIR/munged.seed"
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=vsrtest
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.sock
CredType=cred/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName=$node CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld
    slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "slurm up: node $node, $cpus CPUs, SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 1
    done
    echo "slurm did not come up; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

stop_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    export SLURM_CONF=$DIR/slurm.conf
    if [ -f "$DIR/slurmctld.pid" ] && scontrol ping >/dev/null 2>&1; then
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 60); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"
    echo "slurm down"
}

case $cmd in
    install) install ;;
    up) up ;;
    down) down ;;
    *) echo "usage: $0 install|up|down DIR" >&2; exit 2 ;;
esac
