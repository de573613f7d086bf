#!/bin/bash
# A real SLURM cluster on this machine for the tests: one controller and two compute nodes
# (two slurmd daemons, node1 and node2, on different ports of this host).
#
#   tests/slurm/cluster.sh start DIR   install slurm-wlm + munge if missing (root), write DIR/slurm.conf,
#                                      start munged, slurmctld, slurmd x2; prints SLURM_CONF=...
#   tests/slurm/cluster.sh stop DIR    stop the daemons started from DIR
#
# Clients (sbatch, squeue, sacct, scontrol) find the cluster through SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(realpath -m "${2:?state directory}")
conf="$dir/slurm.conf"
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || { echo "cluster.sh: installing slurm-wlm and munge needs root" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start() {
    install
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" /run/munge
    cat > "$conf" <<CONF
ClusterName=ftkit-test
SlurmctldHost=$host
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=3600
InactiveLimit=0
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16818 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16819 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
    pgrep -x munged >/dev/null || munged --force
    export SLURM_CONF="$conf"
    slurmctld -f "$conf"
    slurmd -f "$conf" -N node1
    slurmd -f "$conf" -N node2
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o %T 2>/dev/null | grep -c idle)" -ge 1 ] && ! sinfo -h -N -o %T | grep -qv idle; then
            echo "SLURM_CONF=$conf"
            return
        fi
        sleep 1
    done
    echo "cluster.sh: nodes did not come up:" >&2
    sinfo -N >&2 || true
    tail -20 "$dir/log/"*.log >&2 || true
    exit 1
}

stop() {
    for pid in "$dir"/slurmd.*.pid "$dir/slurmctld.pid"; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    sleep 1
}

"$cmd"
