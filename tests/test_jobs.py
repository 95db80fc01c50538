"""jobs/: submitit launchers. A local 2-task CPU training job that gets the time-limit signal checkpoints,
requeues with --resume latest and finishes the run; plus the launcher's arguments and resubmission."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import REPO, SMOKE, stand_in_commands
from jobs import common
from jobs import train as train_job
from ranking.core.errors import RankingError

TINY_RUN = [
    "--config",
    str(SMOKE),
    "--image-size",
    "32",
    "--embed-dim",
    "16",
    "--classes-per-batch",
    "3",
    "--samples-per-class",
    "2",
    "--workers",
    "0",
    "--shuffle-buffer",
    "50",
    "--mixed-precision",
    "no",
    "--warmup-steps",
    "1",
    "--log-every",
    "1",
    "--checkpoint-every",
    "100",
    "--no-progress",
    "--no-wandb",
]
STEPS = 10


def test_checkpoint_resubmits_the_trainer_with_resume_latest() -> None:
    task = common.TrainTask(
        "ranking.train", ["--run-dir", "r", "--resume", "runs/x/checkpoints/step-0000001", "--steps", "5"], use_cpu=True
    )
    resubmission = task.checkpoint()
    again = resubmission.function
    assert isinstance(again, common.TrainTask) and again is not task
    assert again.argv == ["--run-dir", "r", "--steps", "5", "--resume", "latest"]
    assert again.module == "ranking.train" and again.use_cpu
    assert common.with_resume(["--resume=latest", "--lr", "1"]) == ["--lr", "1", "--resume", "latest"]
    assert common.with_resume(["--overwrite", "--lr", "1"]) == ["--lr", "1", "--resume", "latest"]  # its own run


def test_train_launcher_always_resumes_latest_unless_told_otherwise(tmp_path, monkeypatch) -> None:
    """Issue 22.3: --resume latest was passed only when checkpoints/latest existed, so a job killed before its first
    checkpoint (a folder with metrics.jsonl, no checkpoint) was refused on every restart. The trainer now starts such
    a run, so the launcher always passes it; a --resume PATH or --overwrite of the user's is kept as given."""
    submitted: list[common.StageTask] = []
    monkeypatch.setattr(train_job, "run", lambda stage, task, config: submitted.append(task) or 0)
    run_dir = tmp_path / "run"
    argv = ["--cluster", "local", "--shards", "s", "--run-dir", str(run_dir), "--", "--steps", "3"]
    assert train_job.main(argv) == 0
    assert submitted[-1].argv == ["--shards", "s", "--run-dir", str(run_dir), "--steps", "3", "--resume", "latest"]
    for own in (["--resume", "ckpt"], ["--resume=ckpt"], ["--overwrite"]):
        train_job.main([*argv, *own])
        assert submitted[-1].argv == ["--shards", "s", "--run-dir", str(run_dir), "--steps", "3", *own]


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--cluster", "kubernetes"], "--cluster must be one of slurm, local, debug"),
        (["--cluster", "local", "--nodes", "2"], "runs on this machine only"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--gpus-per-node", "-1"], "cannot be negative"),
    ],
)
def test_bad_launcher_flags_are_one_line_errors(flags, problem) -> None:
    with pytest.raises(RankingError, match=problem):
        train_job.main([*flags, "--shards", "s", "--run-dir", "r"])


def test_gloo_takes_the_interface_that_reaches_the_main_node() -> None:
    """A multi-node CPU job binds gloo to the interface towards MASTER_ADDR, not to the host name's address."""
    own = [
        (name, a.address)
        for name, addresses in psutil.net_if_addrs().items()
        for a in addresses
        if a.family.name == "AF_INET" and name != "lo"
    ]
    assert common.interface_to("127.0.0.1") == "lo"
    for name, address in own:  # the main node: the interface that holds its address, not loopback
        assert common.interface_to(address) == name
    assert common.interface_to("not a host name") is None


def test_bad_flag_on_the_command_line_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--cluster", "kubernetes", "--shards", "s", "--run-dir", "r"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "jobs.train: error: --cluster must be one of slurm, local, debug; got 'kubernetes'"
    ]


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def submitit_tasks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "submitit.core._submit" in " ".join(p.cmdline())
    ]


@pytest.fixture(scope="module")
def interrupted_local_run(synth_shards, tmp_path_factory) -> dict:
    """`python -m jobs.train --cluster local` with 2 CPU tasks that get the time-limit signal after their first step."""
    tmp = tmp_path_factory.mktemp("submitit")
    run_dir, folder = tmp / "run", tmp / "submitit"
    cmd = [
        sys.executable,
        "-m",
        "jobs.train",
        "--cluster",
        "local",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--timeout-min",
        "10",
        "--folder",
        str(folder),
        "--wait",
        "--shards",
        str(synth_shards),
        "--run-dir",
        str(run_dir),
        "--",
        *TINY_RUN,
        "--steps",
        str(STEPS),
    ]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not metrics_steps(run_dir) and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        tasks = submitit_tasks(launcher)
        for task in tasks:  # what submitit's local controller (or Slurm, under submitit) sends before the limit
            os.kill(task.pid, signal.SIGUSR2)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = "\n".join(p.read_text() for p in sorted(folder.glob("*_log.out")))
    return {
        "run_dir": run_dir,
        "tasks": len(tasks),
        "returncode": launcher.returncode,
        "output": output + logs[-3000:],
        "logs": logs,
    }


@pytest.mark.slow
def test_local_job_checkpoints_on_the_time_limit_signal_requeues_and_finishes(interrupted_local_run) -> None:
    run = interrupted_local_run
    assert run["tasks"] == 2 and run["returncode"] == 0, run["output"]
    logs, run_dir = run["logs"], run["run_dir"]
    stopped = [line for line in logs.splitlines() if "ranking train: stopped at step" in line]
    assert stopped, logs[-3000:]
    stopped_at = int(stopped[0].split("stopped at step ")[1].split("/")[0])
    assert 0 < stopped_at < STEPS
    assert "Requeued job" in logs  # submitit's requeue, after the trainer checkpointed
    assert f"step-{stopped_at:07d} at step {stopped_at}" in logs  # resumed from that checkpoint
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{STEPS:07d}"


def test_a_job_for_a_real_account_writes_every_slurm_parameter(tmp_path) -> None:
    """python -m jobs.train on Slurm with account, QoS, memory, constraint, exclusive and free sbatch parameters:
    the batch script submitit hands to (a stand-in) sbatch asks for all of them."""
    record = tmp_path / "submitted.sh"
    sbatch = f'cp "${{@: -1}}" {record}\necho "Submitted batch job 4242"\n'
    bin_dir = stand_in_commands(tmp_path / "bin", {"sbatch": sbatch, "srun": "exit 0\n"})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--account",
            "proj42",
            "--qos",
            "high",
            "--mem",
            "200G",
            "--constraint",
            "a100|h100",
            "--exclusive",
            "--sbatch",
            "reservation=r1",
            "mail-type=END",
            "requeue",
            "--folder",
            str(tmp_path / "submitit"),
            "--shards",
            "s",
            "--run-dir",
            "r",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    assert "submitted train job 4242" in done.stdout
    lines = set(record.read_text().splitlines())
    # submitit shell-quotes a value with | in it; sbatch reads #SBATCH values with quotes removed
    for wanted in (
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --mem=200G",
        "#SBATCH --constraint='a100|h100'",
        "#SBATCH --exclusive",
        "#SBATCH --reservation=r1",
        "#SBATCH --mail-type=END",
        "#SBATCH --requeue",
        "#SBATCH --nodes=1",
        "#SBATCH --gpus-per-node=8",
    ):
        assert wanted in lines, (wanted, sorted(line for line in lines if line.startswith("#SBATCH")))


@pytest.mark.parametrize(
    "item, problem",
    [
        ("reservation=", "give sbatch parameters as KEY=VALUE"),
        ("Bad Key=1", "give sbatch parameters as KEY=VALUE"),
        ("nodes=2", "set it with --nodes instead"),
        ("time=60", "set it with --timeout-min instead"),
    ],
)
def test_a_bad_sbatch_parameter_is_one_line(item, problem) -> None:
    with pytest.raises(RankingError, match=problem):
        train_job.main(["--sbatch", item, "--shards", "s", "--run-dir", "r"])
