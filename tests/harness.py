"""What the tests share: paths, a launcher of real gloo ranks, the smoke run's flags, readers of a run's files and of
W&B's offline records, and small real-image fixtures' builders. Test modules import from here, never from each
other; conftest.py holds the pytest fixtures."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch
from PIL import Image

from ranking.core import config, flags
from ranking.folders.shardformat import shard_paths
from ranking.learning.models import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOKE = REPO / "configs" / "smoke.yaml"  # a random-init ResNet-18: the defaults' pretrained Lite0 is too slow here
PER_CLASS = 6  # of the mini zip's 10 classes x 20 train images


def launch(args: list[str], processes: int = 2, timeout: float = 240, script: str | None = None,
           wait: bool = True, launcher_precision: str | None = "no",
           launcher_flags: tuple[str, ...] | list[str] = ()) -> subprocess.CompletedProcess | subprocess.Popen:
    """`accelerate launch` on gloo CPU ranks, as a user would type it; W&B offline and silent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags, "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if launcher_precision is not None:
        command += ["--mixed_precision", launcher_precision]
    command += [script] if script else ["-m", "ranking.train"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=timeout)


def train_flags(shards: Path, run_dir: Path, **overrides) -> list[str]:
    flags = {"config": SMOKE, "shards": shards, "run-dir": run_dir, "image-size": 32, "embed-dim": 32,
             "shuffle-buffer": 50, "workers": 0, "mixed-precision": "no", "warmup-steps": 3, "log-every": 1,
             "no-progress": None, "wandb-tags": "test"} | overrides
    argv = []
    for name, value in flags.items():
        argv += [f"--{name}"] + ([] if value is None else [str(value)])
    return argv


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rank_steps(checkpoint_dir: Path) -> dict[int, int]:
    """The step each rank recorded in its own file of a checkpoint."""
    files = sorted(checkpoint_dir.glob("rng-rank*.pt"))
    return {int(f.stem.removeprefix("rng-rank")): torch.load(f, weights_only=True)["step"] for f in files}


def wandb_records(run_folder: Path):
    """The records of an offline run's `.wandb` file: wandb's LevelDB-style log of protobuf `Record`s.

    wandb 0.31 no longer ships a Python reader (the Go core writes the file), so this follows the format: a 7-byte
    file header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, parts = 7, []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding up to the next block
            position += left_in_block
            continue
        parts.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history_and_config(run_folder: Path) -> tuple[list[dict], dict]:
    def as_dict(items) -> dict:  # an item names its key in `key` or, path-like, in `nested_key`
        return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}

    history, run_config = [], {}
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(as_dict(record.history.item))
        elif kind == "config":
            run_config |= as_dict(record.config.update)
    return history, run_config


def write_smoke_run(run_dir: Path, shards: str, **overrides) -> Path:
    """A run folder with a random-init smoke network at step 5 (what `ranking train` leaves, without training)."""
    train_config = flags.build(config.TrainConfig, str(SMOKE), {"run_dir": str(run_dir), "shards": shards,
                                                                 "wandb": False, **overrides})
    checkpoint = run_dir / "checkpoints" / "step-0000005"
    checkpoint.mkdir(parents=True)
    flags.save(train_config, run_dir / "config.yaml")
    torch.manual_seed(sum(map(ord, str(run_dir))) % 1000)
    model = build_model(train_config).eval()
    torch.save({"model": model.state_dict(), "step": 5, "wandb_run_id": "x"}, checkpoint / "state.pt")
    (run_dir / "checkpoints" / "latest").symlink_to(checkpoint.name)
    return run_dir


def mini_jpegs(mini_zip: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The first PER_CLASS train JPEGs of each class: wnid -> [(file name, bytes)]."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(mini_zip) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 5 and parts[1] == "train" and name.endswith(".JPEG"):
                if len(found.setdefault(parts[2], [])) < PER_CLASS:
                    found[parts[2]].append((parts[4], z.read(name)))
    return found


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def odd_images(jpeg: bytes) -> dict[str, bytes]:
    """A PNG with transparency, a CMYK JPEG and a grayscale JPEG made from one of the real photos."""
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {"odd.png": encoded(rgba, "PNG"), "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
            "gray.jpeg": encoded(photo.convert("L"), "JPEG")}


def shard_samples(shards: Path, split: str) -> dict[int, tuple[int, bytes]]:
    """id -> (label, JPEG bytes), read straight from the tar files."""
    samples: dict[int, tuple[int, bytes]] = {}
    for path in shard_paths(shards, split):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    jpg = tar.extractfile(member.name[: -len("json")] + "jpg").read()
                    samples[meta["id"]] = (meta["label"], jpg)
    return samples
