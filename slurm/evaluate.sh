#!/usr/bin/env bash
# Evaluate a run as an image search engine, embedding on all GPUs of all nodes.
#
#   RUN_DIR=runs/ranking-train-1234 sbatch slurm/evaluate.sh [EVAL FLAGS]
#
# Knobs (environment): RUN_DIR (required: a run folder or one of its checkpoint folders), SHARDS (default: the
# shards the run was trained on), OUT (default RUN_DIR/eval-STEP), EXTRA_ARGS (split on whitespace, see slurm/common.sh), and those of slurm/common.sh.
#SBATCH --job-name=ranking-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
setup_python
validate_knobs

if [[ -z "${RUN_DIR:-}" ]]; then
  echo "slurm/evaluate.sh: set RUN_DIR to the run folder to evaluate" >&2
  exit 2
fi
split_extra_args

args=(--checkpoint "$RUN_DIR")
if [[ -n "${SHARDS:-}" ]]; then
  args+=(--shards "$SHARDS")
fi
if [[ -n "${OUT:-}" ]]; then
  args+=(--out "$OUT")
fi

rc=0
accelerate_launch ranking.evaluate "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$@" || rc=$?
log "finished with status $rc"
exit "$rc"
