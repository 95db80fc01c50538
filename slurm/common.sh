# shellcheck shell=bash
# Launch logic shared by slurm/*.sh (sourced, not run): Python, the main process, one accelerate launch per node,
# and the USR1 -> checkpoint -> requeue hand-off.
#
# Knobs (environment): VENV (a virtualenv to activate), PYTHON (default python3), GPUS_PER_NODE (default: the GPUs
# Slurm gave this node, else the GPUs nvidia-smi sees), PROCS_PER_NODE (processes per node on nodes without GPUs;
# default 1), MAIN_PROCESS_PORT (the rendezvous port on the first node; default 15000 + job id % 15000, fixed per job
# and below Linux's ephemeral range 32768-60999, so that no outgoing connection already holds it), MAIN_PROCESS_IP
# (the first node's address that the others connect to; default: its NodeAddr in Slurm), EXTRA_ARGS
# (appended to the stage's arguments), MIXED_PRECISION (no, fp16 or bf16: passed to accelerate launch; unset: an
# `accelerate config` file decides, and without one the stage picks bf16 where the GPU has it (compute capability
# 8.0+), else fp16; ranking/core/precision.py).
#
# One Slurm task per node: each task runs one `accelerate launch`, which starts one process per GPU. A job submitted
# with more tasks per node (--ntasks-per-node=8, the open_clip / Lightning habit) is refused in one line, exit 2.
#
# On bad input every rank exits 2 and prints nothing but rank 0's one line; accelerate launch (torchrun) then exits 1
# with its own traceback and a ChildFailedError summary whose "Root Cause" repeats that line; this script's last line
# is "finished with status 1". A planned stop (every process exited 75 after checkpointing) is not a crash: each node
# says so in one line instead of torchrun's traceback, and its task exits 75.
#
# The numeric knobs must be plain decimal integers (validate_knobs checks them before any shell arithmetic reads
# them: bash arithmetic would evaluate a value such as `HOME[$(cmd)]` as an expression and run cmd); a bad value
# stops the script with one line naming the knob and exit status 2.
# EXTRA_ARGS is split on whitespace like a shell command line, but quotes, `$(...)` and globs are not interpreted,
# so one argument cannot contain a space; arguments after the script name are passed as they are.
# Arrays that may be empty are expanded as ${A[@]+"${A[@]}"}: bash before 4.4 (RHEL/CentOS 7) calls an empty
# "${A[@]}" an unbound variable under set -u.

set -euo pipefail

# This file, for the tasks of a step to source on their node (the submit folder is on a shared file system).
COMMON_SH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh

log() { echo "[$(date +%T) ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-local}] $*"; }

# knob_error NAME VALUE PROBLEM: one line on stderr, exit status 2 (bad input).
knob_error() {
  echo "slurm: error: $1=$(printf '%q' "$2"): $3" >&2
  exit 2
}

# require_integer NAME MIN MAX: the variable NAME, if set and not empty, is a decimal integer in [MIN, MAX].
# Checked with a regex before any arithmetic reads it; leading zeros are refused (bash would read 010 as octal).
require_integer() {
  local name=$1 min=$2 max=$3 value
  value=${!name:-}
  if [[ -z "$value" ]]; then
    return 0
  fi
  if ! [[ "$value" =~ ^(0|[1-9][0-9]{0,8})$ ]]; then
    knob_error "$name" "$value" "must be a whole number from $min to $max"
  fi
  if ((value < min || value > max)); then
    knob_error "$name" "$value" "must be a whole number from $min to $max"
  fi
}

# split_extra_args: the array EXTRA from EXTRA_ARGS, split on spaces, tabs and newlines; nothing in it is expanded
# or unquoted (a plain `read -a` would also drop every line after the first).
# shellcheck disable=SC2034  # EXTRA is used by the scripts that source this file
split_extra_args() {
  local IFS=$' \t\n'
  EXTRA=()
  if [[ -n "${EXTRA_ARGS:-}" ]]; then
    read -r -d '' -a EXTRA <<<"$EXTRA_ARGS" || true
  fi
}

# validate_knobs: the numeric knobs of the environment, and the Slurm variables the launch does arithmetic on.
validate_knobs() {
  case "${MIXED_PRECISION:-}" in
    "" | no | fp16 | bf16) ;;
    *) knob_error MIXED_PRECISION "$MIXED_PRECISION" "must be no, fp16 or bf16 (or unset)" ;;
  esac
  require_integer GPUS_PER_NODE 0 1024
  require_integer PROCS_PER_NODE 1 1024
  require_integer MAIN_PROCESS_PORT 1 65535
  require_integer SLURM_NNODES 1 100000
  require_integer SLURM_JOB_ID 0 999999999
  require_integer SLURM_GPUS_ON_NODE 0 1024
  require_integer SLURM_NTASKS 1 100000000
  require_integer SLURM_NTASKS_PER_NODE 1 100000
  one_task_per_node
}

# one_task_per_node: refuse a job submitted with more than one task per node in one line (exit 2). srun inherits the
# batch job's task count, and each task would start a whole accelerate launch of its own.
one_task_per_node() {
  local per_node=${SLURM_NTASKS_PER_NODE:-1} tasks=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
  if ((per_node > 1 || tasks > ${SLURM_NNODES:-1})); then
    echo "slurm: error: the job has ${SLURM_NTASKS:-?} tasks on ${SLURM_NNODES:-?} node(s)" \
      "(SLURM_NTASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-unset}); these scripts start one task per node and one" \
      "process per GPU themselves: submit with --ntasks-per-node=1 (and --gpus-per-node=G)" >&2
    exit 2
  fi
}

# The rendezvous port: MAIN_PROCESS_PORT, else 15000 + job id % 15000 (the same on every node and every requeue of
# the job, and below the ephemeral range 32768-60999 that outgoing connections take their ports from).
main_process_port() {
  echo "${MAIN_PROCESS_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}"
}

setup_python() {
  if [[ -n "${VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
  fi
  PYTHON=${PYTHON:-python3}
  export PYTHON
}

# The first node of the job, as an address every node can reach. Slurm knows each node's NodeAddr; a bare host
# name that does not resolve would make c10d retry until the time limit instead of failing.
main_process_ip() {
  local node addr
  node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  addr=$(sinfo -h -N -n "$node" -o %o 2>/dev/null | head -n1 || true)
  if [[ -z "$addr" && "${SLURM_NNODES:-1}" == 1 ]]; then
    addr=127.0.0.1
  fi
  echo "${addr:-$node}"
}

# GPUs on each node (nodes of a job are assumed alike).
gpus_per_node() {
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    echo "$GPUS_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Sets PROCS_PER_NODE and NUM_PROCESSES; without GPUs, takes the CPU/gloo path.
plan_processes() {
  local gpus
  validate_knobs
  gpus=$(gpus_per_node)
  if ! [[ "$gpus" =~ ^[0-9]{1,4}$ ]]; then
    knob_error GPUS_PER_NODE "$gpus" "found no whole number of GPUs on this node; set GPUS_PER_NODE"
  fi
  if ((10#$gpus > 0)); then
    PROCS_PER_NODE=$((10#$gpus))
  else
    PROCS_PER_NODE=${PROCS_PER_NODE:-1}
    export ACCELERATE_USE_CPU=1
  fi
  NUM_PROCESSES=$((SLURM_NNODES * PROCS_PER_NODE))
}

# accelerate_launch MODULE ARGS...: one `accelerate launch` per node (srun, one task per node) running
# `python -m MODULE ARGS...` on every GPU (or PROCS_PER_NODE CPU processes) of every node.
accelerate_launch() {
  local module=$1
  shift
  plan_processes
  MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(main_process_ip)}
  export MAIN_PROCESS_IP # read again on every node (launch_on_node)
  local launch=(--num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES"
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$(main_process_port)"
    --rdzv_backend static --dynamo_backend no)
  if ((NUM_PROCESSES > 1)); then
    launch+=(--multi_gpu)
  fi
  # accelerate launch sets ACCELERATE_MIXED_PRECISION=no when neither its flag nor a config file names a precision;
  # RANKING_PRECISION_DEFAULTED tells the stage that this "no" was nobody's choice, so it picks by device instead.
  local accelerate_config=${HF_HOME:-${XDG_CACHE_HOME:-${HOME:-}/.cache}/huggingface}/accelerate/default_config.yaml
  if [[ -n "${MIXED_PRECISION:-}" ]]; then
    launch+=(--mixed_precision "$MIXED_PRECISION")
  elif [[ ! -f "$accelerate_config" ]]; then
    export RANKING_PRECISION_DEFAULTED=1
  fi
  log "accelerate launch ${launch[*]} -m $module $* (${SLURM_NNODES} nodes x ${PROCS_PER_NODE} processes)"
  # One task per node, stated: srun would otherwise inherit SLURM_NTASKS of the batch job. srun does not pass the
  # batch job's CPUs per task on to the step in every Slurm version.
  # --wait: once one node's task has ended, the others get 60 s to end too, then srun ends them. Not
  # --kill-on-bad-exit, which ends them at once: a planned stop exits 75 on every node within a second or two, and
  # the node that is a moment later would be cut off mid-exit and reported as a crash.
  local step=(srun --wait=60 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1)
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  fi
  # shellcheck disable=SC2016
  local per_node='source "$1"; shift; launch_on_node "$@"'
  run_step "${step[@]}" bash -c "$per_node" accelerate-task "$COMMON_SH" "${launch[@]}" -m "$module" "$@"
}

# launch_on_node ARGS...: runs in each task of the step: `accelerate launch --machine_rank NODEID ARGS...`, its
# output through quiet_requeue. The machine rank is that node's id, so it is read there, not on the batch host.
# A forwarded USR1 reaches every process of the step; this shell, the launcher and the filter ignore it (the
# ignore is inherited through exec) so that only the trainer, which installs its own handler, acts on it.
# Exit status: 75 when every process of this node stopped with 75 (a planned stop), else the launcher's.
launch_on_node() {
  trap "" USR1
  use_the_interface_to_the_main_node
  local codes
  set +e
  "$PYTHON" -m accelerate.commands.launch --machine_rank "${SLURM_NODEID:-0}" "$@" 2>&1 | quiet_requeue
  codes=("${PIPESTATUS[@]}")
  set -e
  if ((codes[1] == 75)); then
    exit 75
  fi
  exit "${codes[0]}"
}

# use_the_interface_to_the_main_node: gloo (the CPU back end) binds each rank to the address its host name resolves
# to, which is a loopback address wherever /etc/hosts maps the host name there (Debian's 127.0.1.1): the other
# nodes' ranks are then told to connect to 127.0.0.1 and the job fails in connectFullMesh. On a multi-node job, and
# unless the user set GLOO_SOCKET_IFNAME, gloo gets the interface this node reaches the main node through: the one
# holding MAIN_PROCESS_IP on the main node, the route's on the others. (NCCL picks a non-loopback interface itself.)
use_the_interface_to_the_main_node() {
  local dev=""
  if [[ -n "${GLOO_SOCKET_IFNAME:-}" || "${SLURM_NNODES:-1}" == 1 || -z "${MAIN_PROCESS_IP:-}" ]]; then
    return 0
  fi
  if command -v ip >/dev/null; then
    dev=$(ip -o addr show to "$MAIN_PROCESS_IP" 2>/dev/null | awk '{print $2; exit}')
    if [[ -z "$dev" ]]; then
      dev=$(ip -o route get "$MAIN_PROCESS_IP" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    fi
  fi
  if [[ -n "$dev" && "$dev" != lo ]]; then
    export GLOO_SOCKET_IFNAME=$dev
  fi
}

# quiet_requeue: copies its input, except torchrun's report of failed processes (the "failed (exitcode: N)" line,
# accelerate's traceback and the ChildFailedError box) when processes in it exited 75 and the others were only
# ended by torchrun itself (-15: it sends SIGTERM to the rest once one has exited, and a trainer exits 75 only after
# the checkpoint every rank took part in): that is a stop to be requeued, said in one line per node, with exit
# status 75. Any other failure is copied whole.
quiet_requeue() {
  awk -v node="${SLURM_NODEID:-0}" -v job="${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-local}" '
    function flush() { for (i = 1; i <= n; i++) print held[i]; n = 0; fflush() }
    !inside && /torch\/distributed\/elastic\/.*\] failed \(exitcode: / { inside = 1; root = 0; planned = 0; other = 0 }
    inside {
      held[++n] = $0
      if ($0 ~ /^ *exitcode *: /) { if ($3 == "75") planned++; else if ($3 != "-15") other++ }
      if ($0 ~ /^Root Cause/) root = 1
      if (root && $0 ~ /^=====/) {
        inside = 0
        if (planned > 0 && other == 0) {
          n = 0; stopped = 1
          printf "[%s] node %s: the trainers stopped after checkpointing (exit status 75), ready to requeue\n", job, node
          fflush()
        } else flush()
      }
      next
    }
    { print; fflush() }
    END { flush(); exit stopped ? 75 : 0 }'
}

# run_step COMMAND...: runs a job step in the background so that USR1 traps run while it is going, and returns
# its exit status once it has really ended (a trap cuts `wait` short).
STOP_REQUESTED=0
run_step() {
  "$@" &
  STEP_PID=$!
  local rc
  while :; do
    INTERRUPTED=0
    rc=0
    wait "$STEP_PID" || rc=$?
    ((INTERRUPTED)) || break
  done
  return "$rc"
}

# Slurm sends USR1 to this shell only (--signal=B:USR1@...); hand it to the step, whose trainer checkpoints and
# exits 75. Requeueing now would kill the trainer mid-checkpoint, so the requeue waits for the step to end.
# It also writes STOP_REQUEST_FILE (slurm/train.sh: RUN_DIR/stop-request), which the trainers look for every
# step: on a Slurm that signals process groups (proctrack/pgid) the USR1 never reaches torchrun's workers, which run
# in sessions of their own; the file does, on any Slurm.
forward_usr1() {
  INTERRUPTED=1
  STOP_REQUESTED=1
  log "USR1: asking the step to checkpoint and stop"
  if [[ -n "${STOP_REQUEST_FILE:-}" && -d "$(dirname "$STOP_REQUEST_FILE")" ]]; then
    echo "USR1 to job ${SLURM_JOB_ID:-local} at $(date +%FT%T)" >"$STOP_REQUEST_FILE" ||
      log "could not write the stop request $STOP_REQUEST_FILE"
  fi
  if [[ -n "${STEP_PID:-}" ]]; then
    kill -USR1 "$STEP_PID" 2>/dev/null || true
  fi
}
trap forward_usr1 USR1

# requeue_if_stopped STATUS: requeue after a stop on USR1 (accelerate launch reports the trainer's 75 as 1) or
# on exit status 75; otherwise exit with STATUS.
requeue_if_stopped() {
  local rc=$1
  if ((rc == 75 || (STOP_REQUESTED && rc != 0))); then
    log "stopped after checkpointing (status $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "finished with status $rc"
  exit "$rc"
}
