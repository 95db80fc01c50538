"""`ranking demo`: the whole pipeline on embedded synthetic data, as the stages run on a cluster.

synth -> shards -> distributed training (2 processes) -> sharded evaluation (2 processes) -> report.
Each stage is the same command a user would type, run as a subprocess, so the demo exercises the real launch path.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ranking.core.errors import RankingError
from ranking.core.flags import at_least, parse


def launch_command(processes: int) -> list[str]:
    """`accelerate launch` for `processes` ranks: GPUs when there are enough, else gloo ranks on the CPU."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]
    if processes > 1:
        command.append("--multi_gpu")
    return command + ["--mixed_precision", "no", "--dynamo_backend", "no"]


def run(command: list[str], env: dict[str, str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    started = time.time()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RankingError(f"demo step failed with exit code {result.returncode}: {shlex.join(command)}")
    print(f"  ({time.time() - started:.0f} s)", flush=True)


@dataclass
class DemoConfig:
    # where
    workdir: str = "demo"  # where the synthetic archive and the run go
    shards: str = "shards/demo"  # where the shards go

    # the synthetic data
    classes: int = 10  # synthetic classes
    train_per_class: int = 200  # train images of each class
    val_per_class: int = 20  # val images of each class

    # training and evaluation
    steps: int = 100  # training steps (about 2 minutes on 2 CPU cores)
    processes: int = 2  # ranks for training and evaluation

    def validate(self) -> None:
        for name in ("classes", "train_per_class", "val_per_class", "steps", "processes"):
            at_least(name, getattr(self, name), 1)


def main(argv: list[str] | None = None) -> int:
    config = parse(DemoConfig, argv, "ranking demo", __doc__, config_file=False)

    workdir, shards = Path(config.workdir), Path(config.shards)
    archive, run_dir = workdir / "synth.zip", workdir / "runs" / "demo"
    eval_dir = run_dir / "eval"
    env = dict(os.environ)
    if torch.cuda.device_count() < config.processes:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo ranks on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    if not env.get("WANDB_API_KEY") and not env.get("WANDB_MODE"):
        env["WANDB_MODE"] = "offline"
    ranking = [sys.executable, "-m", "ranking"]

    run(
        ranking
        + [
            "synth",
            "--out",
            str(archive),
            "--classes",
            str(config.classes),
            "--train-per-class",
            str(config.train_per_class),
            "--val-per-class",
            str(config.val_per_class),
            "--seed",
            "0",
        ],
        env,
    )
    run(ranking + ["shards", str(archive), "--out", str(shards), "--shard-size", "200"], env)
    launch = launch_command(config.processes)
    run(
        launch
        + [
            "-m",
            "ranking.train",
            "--shards",
            str(shards),
            "--run-dir",
            str(run_dir),
            "--steps",
            str(config.steps),
            "--classes-per-batch",
            str(min(8, config.classes)),
            "--run-name",
            "demo",
            "--overwrite",  # a rerun moves the last aside
            "--wandb-tags",
            "demo",
            "--workers",
            "1",
        ],
        env,
    )
    run(
        launch + ["-m", "ranking.evaluate", "--checkpoint", str(run_dir), "--out", str(eval_dir), "--workers", "1"], env
    )
    run(ranking + ["report", str(run_dir), str(eval_dir)], env)

    print(f"\nDone. Metrics: {eval_dir / 'metrics.json'} and {eval_dir / 'table.md'}")
    print(f"Pictures: {run_dir / 'loss.png'}, {eval_dir}/pr_curve.png, {eval_dir}/ranked_*.png")
    print(f"Search: ranking search IMAGE.jpg --index {eval_dir} --top 10")
    return 0
