#!/usr/bin/env bash
# Train on all GPUs of all nodes; before the time limit the trainer checkpoints and the job requeues itself.
#
#   mkdir -p logs && SHARDS=shards/tiny-imagenet-200 CONFIG=configs/paper.yaml sbatch slurm/train.sh [TRAIN FLAGS]
#   sbatch --nodes=4 --time=12:00:00 slurm/train.sh --steps 20000
#
# Knobs (environment): SHARDS, RUN_DIR (default runs/JOBNAME-JOBID, kept across requeues), CONFIG (a YAML file),
# EXTRA_ARGS (more train flags, split on whitespace; arguments after the script name are passed as they are),
# and those of slurm/common.sh (VENV, PYTHON, GPUS_PER_NODE, PROCS_PER_NODE, MAIN_PROCESS_PORT).
#
# USR1 goes to this batch shell (B:) 120 s before the time limit: the shell forwards it to the step (srun forwards
# it to every process there) and writes RUN_DIR/stop-request, which the trainers look for every step (that reaches
# them also where Slurm's signals do not), the trainer checkpoints and exits 75, and only then does the shell
# requeue the job.
# Without B: only the step would hear it, and the shell could not tell the trainer's stop from a crash
# (accelerate launch reports the trainer's exit status 75 as 1).
#SBATCH --job-name=ranking-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
setup_python
validate_knobs

SHARDS=${SHARDS:-shards/tiny-imagenet-200}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
split_extra_args
# shellcheck disable=SC2034  # read by forward_usr1 in slurm/common.sh
STOP_REQUEST_FILE=$RUN_DIR/stop-request

args=(--shards "$SHARDS" --run-dir "$RUN_DIR")
if [[ -n "${CONFIG:-}" ]]; then
  args+=(--config "$CONFIG")
fi
# Always --resume latest: it continues from the newest intact checkpoint, or starts the run when there is none yet
# (the first start, or a job killed before its first checkpoint), so every requeue can start. A user's --overwrite
# starts the first run without it; a requeued job continues its own run, so it drops the --overwrite.
user_args=(${EXTRA[@]+"${EXTRA[@]}"} "$@")
if [[ "${SLURM_RESTART_COUNT:-0}" != 0 ]]; then
  kept=()
  for arg in ${user_args[@]+"${user_args[@]}"}; do
    if [[ "$arg" != --overwrite ]]; then
      kept+=("$arg")
    fi
  done
  user_args=(${kept[@]+"${kept[@]}"})
fi
if [[ " ${user_args[*]-} " != *" --overwrite "* ]]; then
  args+=(--resume latest)
fi
log "restart ${SLURM_RESTART_COUNT:-0}, run folder $RUN_DIR"

rc=0
accelerate_launch ranking.train "${args[@]}" ${user_args[@]+"${user_args[@]}"} || rc=$?
requeue_if_stopped "$rc"
