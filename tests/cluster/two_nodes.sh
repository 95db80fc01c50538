#!/usr/bin/env bash
# two_nodes.sh start|stop DIR - a throw-away two-node Slurm cluster on this one machine, for tests.
#
# Each node is a network namespace of its own (drk-node1, drk-node2) with its own address (10.231.7.11 and .12) on a
# bridge in this sandbox (drk-br0, 10.231.7.1): two slurmd, each in its namespace, and slurmctld on the bridge's
# address. A job step's processes run in their node's namespace, so the trainers of a two-node job meet through the
# first node's address as they would on a cluster. Nothing is sent outside those addresses.
#
# Adapted from ../shared/slurm/start-slurm.sh (single node): munged, slurmctld and slurmd in the foreground, no
# systemd, no accounting, all state under DIR. Ports differ from that cluster's (6817/6818), so both can run at once.
# After `start`: export SLURM_CONF=DIR/etc/slurm.conf. Needs root (namespaces, SlurmUser=root) and Debian's slurmctld,
# slurmd, slurm-client and munge, which ../shared/slurm/start-slurm.sh installs. `stop` cancels the jobs, stops the
# daemons and removes the namespaces and the bridge; both commands are idempotent.
set -euo pipefail

ACTION=${1:?usage: two_nodes.sh start|stop DIR}
D=${2:?usage: two_nodes.sh start|stop DIR}
NODES=(node1 node2)
NET=10.231.7
CTLD_PORT=6837
SLURMD_PORT=6838
TIMEOUT=${TWO_NODES_TIMEOUT:-60}
CONF=$D/etc/slurm.conf
SOCK=$D/run/munge.socket
export SLURM_CONF=$CONF

log() { echo "[two_nodes $(date +%T)] $*"; }
die() {
  echo "two_nodes: error: $*" >&2
  for f in "$D"/log/*; do [[ -f "$f" ]] && { echo "==== $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}
namespace() { echo "drk-$1"; }

wait_for() { # wait_for WHAT COMMAND...: poll COMMAND every 0.2 s for TIMEOUT seconds
  local what=$1 end=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "$what: not within $TIMEOUT s"
    sleep 0.2
  done
}

start_daemon() { # start_daemon NAME CMD...: in the background, detached from our output, its PID in run/NAME.pid
  local name=$1
  shift
  nohup "$@" >"$D/log/$name.out" 2>&1 </dev/null &
  echo $! >"$D/run/$name.pid"
}

network_up() {
  ip link show drk-br0 >/dev/null 2>&1 && return 0
  ip link add drk-br0 type bridge
  ip addr add "$NET.1/24" dev drk-br0
  ip link set drk-br0 up
  local i=11 node
  for node in "${NODES[@]}"; do
    ip netns add "$(namespace "$node")"
    ip link add "drk-$node" type veth peer name eth0 netns "$(namespace "$node")"
    ip link set "drk-$node" master drk-br0 up
    ip -n "$(namespace "$node")" addr add "$NET.$i/24" dev eth0
    ip -n "$(namespace "$node")" link set eth0 up
    ip -n "$(namespace "$node")" link set lo up
    i=$((i + 1))
  done
}

network_down() {
  local node
  for node in "${NODES[@]}"; do
    ip netns del "$(namespace "$node")" 2>/dev/null || true # removes the veth pair with it
  done
  ip link del drk-br0 2>/dev/null || true
  # the kernel removes a namespace's veth pairs after `ip netns del` returns
  for _ in $(seq 50); do ip -o link show | grep -q ' drk-' || return 0; sleep 0.1; done
}

write_config() {
  local i=11 node
  cat >"$CONF" <<EOF
# written by tests/cluster/two_nodes.sh: two nodes in network namespaces, no cgroups, no accounting
ClusterName=twonodes
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$D/var/state
SlurmdSpoolDir=$D/var/spool-%n
SlurmctldPidFile=$D/run/slurmctld.pidfile
SlurmdPidFile=$D/run/slurmd-%n.pidfile
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# pgid: a step's signals reach the process group of each task only, not torchrun's workers (sessions of their own);
# the harder case for a stop, which the run folder's stop request must still reach
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
EOF
  for node in "${NODES[@]}"; do
    echo "NodeName=$node NodeAddr=$NET.$i CPUs=2 RealMemory=4000 State=UNKNOWN" >>"$CONF"
    i=$((i + 1))
  done
  echo "PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

start() {
  if ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    die "Slurm is not installed: bash ../shared/slurm/start-slurm.sh installs Debian's packages"
  fi
  stop >/dev/null 2>&1 || true
  mkdir -p "$D/etc" "$D/log" "$D/run" "$D/var/state" "$D/munge"
  chmod 700 "$D/munge"
  chmod 755 "$D/run"
  [[ -s "$D/munge/munge.key" ]] || {
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$D/munge/munge.key"
  }
  network_up
  write_config
  start_daemon munged munged --foreground --force --key-file="$D/munge/munge.key" --socket="$SOCK" \
    --pid-file="$D/run/munged.pidfile" --seed-file="$D/munge/munged.seed" --log-file="$D/log/munged.log"
  wait_for munged bash -c "munge -n -S '$SOCK' | unmunge -S '$SOCK'"
  start_daemon slurmctld slurmctld -D -c -f "$CONF"
  wait_for slurmctld bash -c "scontrol ping | grep -q UP"
  local node
  for node in "${NODES[@]}"; do
    mkdir -p "$D/var/spool-$node"
    # nsenter, not `ip netns exec`: that also mounts a /sys of its own, without the cgroup file system slurmd reads
    start_daemon "slurmd-$node" nsenter --net="/run/netns/$(namespace "$node")" slurmd -D -N "$node" -f "$CONF"
  done
  wait_for "both nodes idle" bash -c "[[ \$(sinfo -h -N -o %T | sort -u) == idle ]]"
  log "up: $(sinfo -h -N -o '%N=%o:%T' | tr '\n' ' ')"
}

stop() {
  if [[ -f "$CONF" ]] && scontrol ping 2>/dev/null | grep -q UP; then
    scancel --partition=two 2>/dev/null || true
    local end=$((SECONDS + 30))
    while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS < end)); do sleep 0.2; done
  fi
  local name pid
  for name in slurmd-node1 slurmd-node2 slurmctld munged; do
    [[ -s "$D/run/$name.pid" ]] || continue
    pid=$(cat "$D/run/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$D/run/$name.pid"
  done
  # a job step's processes live in a node's namespace; none may outlive it
  for name in "${NODES[@]}"; do
    ip netns pids "$(namespace "$name")" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  network_down
  log "stopped"
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) die "usage: two_nodes.sh start|stop DIR" ;;
esac
