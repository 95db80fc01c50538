#!/usr/bin/env bash
# Repack tiny-imagenet-200.zip into WebDataset shards on one node (CPU only).
#
#   SOURCE=data/tiny-imagenet-200.zip OUT=shards/tiny-imagenet-200 sbatch slurm/shards.sh [SHARDS FLAGS]
#
# Knobs (environment): SOURCE, OUT, EXTRA_ARGS (split on whitespace, see slurm/common.sh), and VENV / PYTHON of slurm/common.sh.
#SBATCH --job-name=ranking-shards
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out

# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
setup_python

SOURCE=${SOURCE:-data/tiny-imagenet-200.zip}
OUT=${OUT:-shards/tiny-imagenet-200}
split_extra_args

log "ranking shards $SOURCE --out $OUT ${EXTRA[*]-} $*"
"$PYTHON" -m ranking shards "$SOURCE" --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
