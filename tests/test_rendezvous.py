"""Two machines without Slurm (issue 19, build item 8): two `accelerate launch --num_machines 2 --machine_rank 0|1
--rdzv_backend static` on localhost train and validate exactly as one launch with two processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from harness import free_port, metrics, train_flags

STEPS = 4


def accelerate(machines: int, machine_rank: int, processes: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        str(machines),
        "--machine_rank",
        str(machine_rank),
        "--num_processes",
        str(processes),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--rdzv_backend",
        "static",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
        "-m",
        "ranking.train",
    ]


ENV = {
    **os.environ,
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
}


@pytest.mark.system
def test_two_machine_ranks_train_and_validate_as_one_launch_of_two(synth_shards, tmp_path) -> None:
    def flags(run_dir):
        return train_flags(
            synth_shards,
            run_dir,
            steps=STEPS,
            **{
                "classes-per-batch": 3,
                "samples-per-class": 2,
                "eval-every": 2,
                "eval-gallery-per-class": 6,
                "checkpoint-every": 100,
                "no-wandb": None,
            },
        )

    one = tmp_path / "one-launch"
    single = subprocess.run(
        accelerate(1, 0, 2, free_port()) + flags(one), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]

    two = tmp_path / "two-machines"
    port = free_port()
    machines = [
        subprocess.Popen(
            accelerate(2, rank, 2, port) + flags(two),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    expected, got = metrics(one), metrics(two)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    losses = [r for r in expected if "train/loss" in r]
    assert len(losses) == STEPS
    for want, have in zip(expected, got):
        for key, value in want.items():
            if key.startswith(("train/loss", "train/active_fraction", "train/lr", "val/")) and key != "val/seconds":
                assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (want["step"], key)
    assert any("val/precision@30" in r for r in got)  # validation ran across the two machines

    one_launch, two_launch = (yaml.safe_load((run / "config.yaml").read_text())["launch"] for run in (one, two))
    assert (one_launch["world_size"], one_launch["processes_per_node"]) == (2, 2)
    assert (two_launch["world_size"], two_launch["processes_per_node"]) == (2, 1)
    assert two_launch["global_batch"] == one_launch["global_batch"] == 12
