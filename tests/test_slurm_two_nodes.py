"""slurm/train.sh on a real two-node Slurm (tests/cluster/two_nodes.sh: two slurmd, each in a network namespace of
its own with its own address, on this one machine): `sbatch --nodes=2` trains with one machine rank per node, and
on a Slurm whose signals reach only each task's process group (proctrack/pgid, where torchrun's workers never hear a
forwarded USR1) the time-limit warning still stops both ranks at one step through the run folder's stop request:
checkpoint, requeue, resume at that step on both nodes, in the same W&B run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from harness import (
    REPO,
    SMOKE,
    job_cleaned_up,
    job_info,
    metrics_steps,
    sbatch,
    shared_file,
    slurm_in_queue,
    wait_until,
    wandb_ids,
)

CLUSTER = REPO / "tests" / "cluster" / "two_nodes.sh"
STEPS = 30
TINY_RUN = (
    f"--config {SMOKE} --image-size 32 --embed-dim 16 --classes-per-batch 3 --samples-per-class 2 "
    f"--workers 0 --shuffle-buffer 50 --mixed-precision no --warmup-steps 1 --log-every 1 --steps {STEPS} "
    "--checkpoint-every 100 --no-progress --wandb"
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict[str, str]:
    """The two-node cluster, stopped (namespaces and bridge removed) at the end of the module."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("network namespaces and slurmd need root")  # CI runs as root: there, this fails instead
    if not shutil.which("slurmd"):  # Debian's packages, as the single-node cluster installs them
        installed = subprocess.run(["bash", str(shared_file("slurm/start-slurm.sh"))], capture_output=True, text=True)
        subprocess.run(["bash", str(shared_file("slurm/stop-slurm.sh"))], capture_output=True)
        assert installed.returncode == 0, installed.stderr
    state = tmp_path_factory.mktemp("two-nodes")
    try:
        up = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, f"two_nodes.sh start failed:\n{up.stdout}\n{up.stderr}"
        yield {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=180)


def test_a_two_node_job_stops_by_its_stop_request_requeues_and_resumes_on_both_nodes(
    two_nodes, synth_shards, tmp_path
) -> None:
    env, run_dir, logs = two_nodes, tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    job_env = {
        **env,
        "SHARDS": str(synth_shards),
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "EXTRA_ARGS": TINY_RUN,
    }
    job_id = sbatch(job_env, logs, "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "slurm/train.sh")
    log = logs / f"ranking-train-{job_id}.out"
    wait_until(lambda: len(metrics_steps(run_dir)) >= 3, 180, "both nodes to train", log)

    # what Slurm does before the time limit (--signal=B:USR1@120): USR1 to the batch shell on the first node, which
    # forwards it to the step; under proctrack/pgid that reaches each node's task but not the trainers
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    wait_until(lambda: job_info(env, job_id).get("Restarts") == "1", 120, "the job to requeue itself", log)
    stopped_at = int((run_dir / "checkpoints" / "latest").resolve().name.removeprefix("step-"))
    assert 3 <= stopped_at < STEPS, log.read_text()[-3000:]
    # Slurm holds a requeued job (Reason=BeginTime) while the old one cleans up; start it once that is done
    wait_until(lambda: job_cleaned_up(env, job_id), 60, "both nodes to finish cleaning up the stopped job", log)
    time.sleep(2)  # a credential made in the second of the old one's revocation is refused
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
    wait_until(lambda: not slurm_in_queue(env, job_id), 240, f"requeued job {job_id} to finish", log)

    text = log.read_text()
    info = job_info(env, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert info["NodeList"] == "node[1-2]", info
    assert text.count("(2 nodes x 1 processes)") == 2 and "--main_process_ip 10.231.7.11" in text  # node1's address
    # the trainers stopped through the file, which is all that reaches them on this Slurm
    assert f"stopped at step {stopped_at}/{STEPS} (stop request {run_dir / 'stop-request'})" in text, text[-3000:]
    # one line per node for the planned stop, no crash report
    assert text.count("ready to requeue") == 2 and "ChildFailedError" not in text, text[-3000:]
    assert f"step-{stopped_at:07d} at step {stopped_at}" in text  # the requeued job resumed the checkpoint
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))  # no step lost or repeated
    assert not (run_dir / "stop-request").exists()
    launch = yaml.safe_load((run_dir / "config.yaml").read_text())["launch"]
    assert (launch["world_size"], launch["processes_per_node"]) == (2, 1), launch
    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, ids  # both launches of the requeued job log to one W&B run
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == STEPS
