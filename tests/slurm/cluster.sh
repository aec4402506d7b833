#!/usr/bin/env bash
# A one-node Slurm for the tests (Debian's slurm-wlm and munge), as root:
#   cluster.sh install   installs the packages if srun is missing (needs apt-get)
#   cluster.sh start     starts munged, slurmctld and slurmd unless they answer already; waits
#                        until the node is idle
#   cluster.sh stop      stops what start started
# Every step is idempotent. Its state lives under /run/distsrv-slurm. The node is "localhost" at
# 127.0.0.1, so that the tasks srun starts (and Slurm's own daemons) talk over loopback only.
set -euo pipefail

STATE=/run/distsrv-slurm
CONF=/etc/slurm/slurm.conf

install() {
    command -v srun >/dev/null && return
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

answers() {
    timeout 5 sinfo --noheader --responding --states=idle,mixed,allocated 2>/dev/null | grep -q .
}

start() {
    answers && return
    mkdir -p "$STATE"/spool/ctld "$STATE"/spool/d "$STATE"/log /run/munge /etc/munge
    chown munge:munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        head -c 1024 /dev/urandom >/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    local cpus
    cpus=$(nproc)
    mkdir -p /etc/slurm
    cat >"$CONF" <<CONF
ClusterName=distsrv-tests
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=tests Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -N localhost
    for _ in $(seq 60); do
        answers && return
        sleep 0.5
    done
    echo "slurm did not come up; its logs:" >&2
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

stop() {
    for daemon in slurmd slurmctld munged; do
        pkill -x "$daemon" || true
    done
    for _ in $(seq 20); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null ||
            return 0
        sleep 0.25
    done
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
