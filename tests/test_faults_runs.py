"""Issue 22, trainer and run side: a run can always restart, never holds its node, stops on Ctrl-C like on SIGTERM,
goes where --run-dir says, and refuses impossible settings and inconsistent input in one line (real processes,
signals and files where the finding needs them)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from harness import (
    REPO,
    cli_refusal,
    copy_shards,
    descendants,
    error_line,
    fault_flags,
    launch,
    logged,
    lying_class_counts,
    rank_steps,
    reap,
    small_tmpfs,
    stand_in_commands,
    train_one,
    wait_for,
    write_smoke_run,
)
from jobs import common
from jobs import train as train_job
from ranking import evaluate
from ranking.core import flags
from ranking.core.config import EvalConfig, TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.core.files import file_sha256
from ranking.folders import checkpoint
from ranking.train import check_inputs, expand_run_dir

FAKE_SLURM = {  # just enough Slurm for slurm/train.sh on this machine: srun runs its command once, as node 0
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
    "scontrol": '#!/bin/bash\nif [[ "$1" == show ]]; then echo localhost; else echo "scontrol $*" >> "$REQUEUED"; fi\n',
    "sinfo": "#!/bin/bash\nexit 0\n",
}


def small_state(step: int) -> checkpoint.TrainState:
    return checkpoint.TrainState(step=step, model={"w": torch.full((10,), float(step))}, optimizer={}, scheduler={})


def resume_cfg(shards: Path, run_dir: Path, resume: str) -> TrainConfig:
    return flags.parse(TrainConfig, fault_flags(shards, run_dir, steps=2, resume=resume), "ranking train", "")


def slurm_train(
    shards: Path, run_dir: Path, tmp_path: Path, train: list[str], restart: int = 0
) -> subprocess.CompletedProcess:
    """slurm/train.sh as sbatch would run it on one CPU node, with srun, scontrol and sinfo faked."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, script in FAKE_SLURM.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "ranking-train",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "n1",
        "GPUS_PER_NODE": "0",
        "PROCS_PER_NODE": "1",
        "MAIN_PROCESS_PORT": str(port),
        "PYTHON": sys.executable,
        "HF_HOME": str(tmp_path / "hf"),
        "SHARDS": str(shards),
        "RUN_DIR": str(run_dir),
        "EXTRA_ARGS": " ".join(train),
        "REQUEUED": str(tmp_path / "requeued"),
        "OMP_NUM_THREADS": "1",
        "SLURM_RESTART_COUNT": str(restart),
    }
    return subprocess.run(
        ["bash", str(REPO / "slurm" / "train.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )


# ---------------------------------------------------------------------- 3: a restart that cannot start


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_job_killed_before_its_first_checkpoint_restarts_through_the_slurm_script(synth_shards, tmp_path):
    """kill -9 after the first logged step, before any checkpoint: the folder holds metrics.jsonl and config.yaml but
    no checkpoint. The requeued job used to be refused on every restart; now it starts the run with one warning."""
    run_dir = tmp_path / "run"
    run = train_one(fault_flags(synth_shards, run_dir, steps=400, **{"checkpoint-every": 1000}), start_new_session=True)
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", run)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert not list((run_dir / "checkpoints").glob("step-*")) and (run_dir / "metrics.jsonl").exists()

    tiny = [
        arg
        for arg in fault_flags(synth_shards, run_dir, steps=2, **{"checkpoint-every": 1000}, **{"no-wandb": None})
        if arg not in ("--shards", str(synth_shards), "--run-dir", str(run_dir))
    ]
    done = slurm_train(synth_shards, run_dir, tmp_path, tiny)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert (
        "--resume latest" in output
        and "no checkpoint to resume from (the run stopped before its first); "
        "--resume latest starts the run from step 0"
        in output
    ), output
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step-0000002"
    steps = [
        int(line.split('"step": ')[1].split(",")[0]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]  # the killed segment's records were cut: the curve starts again at step 1

    # a job submitted with --overwrite, requeued: it continues its own run instead of moving it aside
    more = [arg if arg != "2" or previous != "--steps" else "3" for previous, arg in zip(["", *tiny], tiny)]
    done = slurm_train(synth_shards, run_dir, tmp_path, [*more, "--overwrite"], restart=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step-0000002'} at step 2" in done.stdout + done.stderr
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step-0000003"
    assert not list(tmp_path.glob("run.replaced-*"))


def test_resume_latest_without_a_checkpoint_starts_the_run_with_one_warning(synth_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp-step-0000005").mkdir(parents=True)  # a save cut by a hard kill
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(RankingError, match="holds a run"):  # without --resume: still refused (nothing to lose?)
        with contextlib.ExitStack() as held:
            check_inputs(flags.parse(TrainConfig, fault_flags(synth_shards, run_dir, steps=2), "t", ""), held)
    with caplog.at_level(logging.WARNING, "ranking.train"), contextlib.ExitStack() as held:
        assert check_inputs(resume_cfg(synth_shards, run_dir, "latest"), held) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{run_dir / 'checkpoints'}: no checkpoint to resume from (the run stopped before its first); "
        "--resume latest starts the run from step 0"
    ]
    with pytest.raises(RankingError, match="neither a checkpoint folder"), contextlib.ExitStack() as held:
        check_inputs(resume_cfg(synth_shards, run_dir, str(run_dir / "checkpoints" / "step-0000005")), held)


def test_a_dangling_latest_resumes_from_the_intact_earlier_checkpoint(synth_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    for step in (10, 20):
        checkpoint.save(run_dir, small_state(step), keep=3)
    root = run_dir / "checkpoints"
    for file in (root / "step-0000020").iterdir():
        file.unlink()
    (root / "step-0000020").rmdir()
    with caplog.at_level(logging.WARNING, "ranking.train"), contextlib.ExitStack() as held:
        assert check_inputs(resume_cfg(synth_shards, run_dir, "latest"), held) == root / "step-0000010"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipping {root / 'latest'}: it points at step-0000020, which is missing"]
    (root / "step-0000010" / "state.pt").unlink()  # nothing intact left: refused, the damaged one is kept
    with pytest.raises(RankingError, match="no intact checkpoint to resume from"), contextlib.ExitStack() as held:
        check_inputs(resume_cfg(synth_shards, run_dir, "latest"), held)
    with pytest.raises(RankingError, match="without state.pt"), contextlib.ExitStack() as held:  # PATH: strict
        check_inputs(resume_cfg(synth_shards, run_dir, str(root / "step-0000010")), held)


# ---------------------------------------------------------------------- 2: a node held after a stall


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("then", ["batch timeout", "SIGTERM"])
def test_a_stopped_dataloader_worker_does_not_hold_the_node(synth_shards, tmp_path, then):
    """A worker stuck in a hung file system (here: stopped with SIGSTOP) used to keep its rank alive after the
    watchdog's line, or after SIGTERM during the stall: multiprocessing joined the worker at exit with no timeout."""
    timeout_s = 3 if then == "batch timeout" else 600
    run_dir = tmp_path / "run"
    run = train_one(
        fault_flags(
            synth_shards, run_dir, steps=400, workers=1, **{"checkpoint-every": 1000, "batch-timeout-s": timeout_s}
        ),
        start_new_session=True,
    )
    workers: list[psutil.Process] = []
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", run)
        workers = psutil.Process(run.pid).children()
        assert len(workers) == 1, workers
        workers[0].suspend()  # SIGSTOP: the prefetched batches run out, then no batch comes
        if then == "SIGTERM":
            time.sleep(8)
            run.send_signal(signal.SIGTERM)  # the rank only: Slurm's signal to the stopped worker would wait anyway
        _, stderr = run.communicate(timeout=90)
    finally:
        reap([psutil.Process(run.pid)] if run.poll() is None else [])
        reap([w for w in workers if w.is_running()])
    if then == "batch timeout":
        assert run.returncode == 2 and "no batch for 3 s (--batch-timeout-s) at step " in stderr, stderr
    else:
        assert run.returncode == 75 and "after waiting" in stderr and "(SIGTERM); no new checkpoint" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    wait_for(
        lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
        10,
        "the stopped worker was killed",
    )


# ---------------------------------------------------------------------- 12: Ctrl-C is a stop request


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_on_a_two_rank_run_with_workers_checkpoints_and_exits_75(synth_shards, tmp_path):
    """SIGINT to every process of the job used to give a traceback from every rank and no checkpoint."""
    run_dir = tmp_path / "run"
    launcher = launch(
        fault_flags(synth_shards, run_dir, steps=400, workers=2, **{"checkpoint-every": 1000}), wait=False
    )
    processes: list[psutil.Process] = []
    try:
        wait_for(lambda: logged(run_dir), 180, "the first logged step", launcher)
        processes = [*descendants(launcher.pid), psutil.Process(launcher.pid)]  # the launcher last
        assert sum("ranking.train" in " ".join(p.cmdline()) for p in processes) >= 2 + 2 * 2  # ranks and workers
        for process in processes:
            process.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=120)
    finally:
        reap([p for p in processes if p.is_running()])
    assert (run_dir / "checkpoints" / "latest").exists(), output
    stop_step = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)["step"]
    assert stop_step >= 1 and rank_steps(run_dir / "checkpoints" / "latest") == {0: stop_step, 1: stop_step}
    assert f"stopped at step {stop_step}/400 (SIGINT); checkpoint " in output and "exit 75 to be requeued" in output
    assert "KeyboardInterrupt" not in output and "killed by signal" not in output, output
    assert "ranking/train.py" not in output and "ranking/training/" not in output, output


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(synth_shards, tmp_path):
    """The first SIGINT asks for a checkpoint; during a long wait for a batch (a stalled stream) the second ends the
    process at once with 130 and one line, instead of the grace period."""
    shards = copy_shards(synth_shards, tmp_path / "shards")
    lying_class_counts(shards, 100)
    run = train_one(
        fault_flags(shards, tmp_path / "run", steps=3, **{"samples-per-class": 50, "batch-timeout-s": 600}),
        start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "run" / "config.yaml").exists(), 60, "the run started", run)
        time.sleep(2)  # into the wait for the first batch
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGINT)  # the same Ctrl-C twice (torchrun forwards what it got): still one request
        time.sleep(3)
        assert run.poll() is None
        sent = time.monotonic()
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=30)
    finally:
        reap([psutil.Process(run.pid)] if run.poll() is None else [])
    assert time.monotonic() - sent < 5 and run.returncode == 130, stderr
    assert (
        stderr.strip().splitlines()[-1] == "rank 0: interrupted again: exiting now, without a checkpoint "
        "(the last is kept)"
    ), stderr
    assert "Traceback" not in stderr and not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------- 5: the run goes where --run-dir says


@pytest.mark.parametrize(
    "run_dir, value, problem",
    [
        ("$EMPTY", "", "--run-dir $EMPTY: empty once its environment variables are expanded"),
        ("${EMPTY}  ", "", "--run-dir ${EMPTY}  : empty once its environment variables are expanded"),
        ("$ROOT", "/", "--run-dir $ROOT: is the root of the file system (/); name a folder for the run"),
        ("$ROOT/..", "/", "--run-dir $ROOT/..: is the root of the file system (//..); name a folder for the run"),
        (
            "~nobody-here-xyz/run",
            "",
            "--run-dir ~nobody-here-xyz/run: ~nobody-here-xyz is not a user this machine knows",
        ),
    ],
)
def test_a_run_dir_that_expands_to_nothing_or_the_root_is_refused(
    synth_shards, tmp_path, monkeypatch, capsys, run_dir, value, problem
):
    monkeypatch.chdir(tmp_path)  # where an empty run folder used to write the run
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.setenv("ROOT", value)
    line = cli_refusal(capsys, "train", *fault_flags(synth_shards, Path(run_dir), steps=2))
    assert line == f"ranking train: error: {problem}"
    assert list(tmp_path.iterdir()) == []


def test_a_tilde_in_the_run_dir_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JOB", "7")
    assert expand_run_dir("~/runs/job-$JOB") == str(tmp_path / "home" / "runs" / "job-7")
    assert expand_run_dir("runs/~x") == "runs/~x"  # only a leading ~ names a home folder


# ---------------------------------------------------------------------- 13: one line, not a traceback


@pytest.mark.parametrize(
    "override, message",
    [
        ({"seed": -1}, "seed must be at least 0; got -1"),
        ({"seed": 2**31}, f"seed must be at most {2**31 - 1}; got {2**31}"),
        ({"image_size": 100000}, "image_size must be at most 1024; got 100000"),
        ({"stored_size": 5000}, "stored_size must be at most 1024; got 5000"),
        ({"embed_dim": 100000000}, "embed_dim must be at most 16384; got 100000000"),
    ],
)
def test_sizes_and_seeds_beyond_honest_bounds_are_refused_by_the_config(override, message):
    """image_size 100000 and embed_dim 10^8 used to try to allocate hundreds of GB; seed -1 was numpy's traceback."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        flags.build(TrainConfig, None, override)
    flags.build(TrainConfig, None, {"seed": 2**31 - 1, "image_size": 1024, "embed_dim": 16384})  # the bounds hold


def test_a_config_file_that_is_not_utf8_is_one_line(synth_shards, tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("run_name: caf\u00e9\n".encode("latin-1"))
    line = cli_refusal(
        capsys, "train", "--config", str(config), "--shards", str(synth_shards), "--run-dir", str(tmp_path / "run")
    )
    assert line == f"ranking train: error: {config}: not UTF-8 text (byte 13 is b'\\xe9'): save it as UTF-8"


@pytest.mark.system  # submitit runs sbatch
@pytest.mark.parametrize("sbatch", ["fails", "missing"])
def test_jobs_train_when_sbatch_fails_is_one_line(tmp_path, monkeypatch, sbatch):
    bin_dir = tmp_path / "bin"
    if sbatch == "fails":
        # submitit refuses a cluster without srun on PATH before it calls sbatch
        sbatch_fails = 'echo "sbatch: error: Invalid partition name specified" >&2\nexit 1\n'
        stand_in_commands(bin_dir, {"sbatch": sbatch_fails, "srun": "exit 0\n"})
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    else:
        bin_dir.mkdir()
        monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(RankingError) as error:
        train_job.main(
            [
                "--cluster",
                "slurm",
                "--folder",
                str(tmp_path / "submitit"),
                "--shards",
                "s",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    reason = "sbatch: error: Invalid partition name specified" if sbatch == "fails" else 'Could not detect "srun"'
    assert str(error.value).startswith(f"--cluster slurm: could not submit the train job: {reason}"), error.value
    assert "\n" not in str(error.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for a run's small files, not for a checkpoint of a ResNet-18 and its optimizer state."""
    with small_tmpfs(tmp_path / "disk", size_kib=24 * 1024) as disk:
        yield disk


@pytest.mark.timeout(200)
def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_no_partial_folder(synth_shards, small_disk):
    run_dir = small_disk / "run"
    result = train_one(fault_flags(synth_shards, run_dir, steps=2, **{"checkpoint-every": 1000}), timeout=180)
    line = error_line(result)
    assert (
        f"error: {run_dir / 'checkpoints' / 'step-0000002'}: could not write the checkpoint (no space left on "
        "the device: "
        in line
        or "(No space left on device" in line
    ), line
    assert line.endswith("its partial files are removed, the last checkpoint is none"), line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []  # no .tmp-step-0000002 left


# ---------------------------------------------------------------------- 14: inconsistent input is refused


def three_of_six_classes(synth_shards: Path, target: Path) -> Path:
    """The synthetic shards (6 classes) with a manifest edited to list only the first 3."""
    shards = copy_shards(synth_shards, target)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:3]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards


def test_a_manifest_listing_fewer_classes_than_the_shards_hold_is_refused_by_train_and_evaluate(synth_shards, tmp_path):
    """It used to train and evaluate with exit 0 (`ranking shards --verify` refused it): labels 3-5 had no class."""
    shards = three_of_six_classes(synth_shards, tmp_path / "shards")
    refusal = (
        f"{shards / 'manifest.json'}: lists 3 classes, but 120 train samples have labels outside them "
        "(3, 4, 5): the manifest and the shards disagree (`ranking shards --verify` checks every sample)"
    )
    with pytest.raises(RankingError) as error, contextlib.ExitStack() as held:
        check_inputs(flags.parse(TrainConfig, fault_flags(shards, tmp_path / "run", steps=2), "t", ""), held)
    assert str(error.value) == refusal
    assert not (tmp_path / "run").exists()
    run_dir = write_smoke_run(tmp_path / "smoke", str(synth_shards))
    with pytest.raises(RankingError) as error:
        evaluate.check_inputs(flags.build(EvalConfig, None, {"checkpoint": str(run_dir), "shards": str(shards)}))
    assert str(error.value) == refusal
    evaluate.check_inputs(flags.build(EvalConfig, None, {"checkpoint": str(run_dir), "shards": str(synth_shards)}))


def test_a_pickled_checkpoint_is_refused_in_our_words_not_torchs_advice(tmp_path):
    run_dir = write_smoke_run(tmp_path / "run", "shards")
    state = run_dir / "checkpoints" / "step-0000005" / "state.pt"
    torch.save({"model": {}, "step": 5, "payload": argparse.Namespace(x=1)}, state)  # a global torch does not allow
    manifest = state.parent / "checkpoint.json"  # its sha256 recorded, as whoever planted it would record it
    listed = json.loads(manifest.read_text())
    listed["files"]["state.pt"] = file_sha256(state)
    manifest.write_text(json.dumps(listed))
    with pytest.raises(RankingError) as error:
        checkpoint.load_weights(state.parent)
    assert str(error.value) == (
        f"{state}: holds pickled Python objects besides tensors and plain containers, which "
        "deep-ranking never writes; refused, since loading them could run code"
    )


# ---------------------------------------------------------------------- 15: submitit's folder is private


def test_submitit_pickles_go_to_a_private_folder_by_default(tmp_path, monkeypatch):
    """They went to logs/submitit in the current folder, which the compute node unpickles whoever wrote it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    common.executor(common.LaunchConfig(cluster="local"), "train")
    folder = tmp_path / "cache" / "deep-ranking" / "submitit"
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "logs").exists()
    mine = tmp_path / "mine"
    common.executor(common.LaunchConfig(cluster="local", folder=str(mine)), "train")
    assert mine.stat().st_mode & 0o777 == 0o700


def test_a_submitit_folder_others_may_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RankingError) as error:
        common.executor(common.LaunchConfig(cluster="local", folder=str(shared)), "train")
    assert str(error.value) == (
        f"--folder {shared}: others may write to it (mode 777), and the compute node unpickles "
        f"the job from it: chmod 700 {shared}, or give another --folder"
    )
