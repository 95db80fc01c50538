"""Safe run folders and "check first, then act": an existing run is refused unless --resume or --overwrite, one
training per folder (a lock), a resume cannot change the model, and bad input leaves nothing behind (one line,
printed once under accelerate launch)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import launch, train_flags
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.core.files import LOCK, check_writable_folder, folder_lock
from ranking.core.flags import parse
from ranking.folders import runfolder
from ranking.train import check_inputs


def tiny_flags(shards: Path, run_dir: Path, **overrides) -> list[str]:
    return train_flags(shards, run_dir, **({"steps": 2, "classes-per-batch": 3, "samples-per-class": 2,
                                            "checkpoint-every": 100, "no-wandb": None} | overrides))


def train(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ranking", "train", *flags], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "ACCELERATE_USE_CPU": "1"})


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every symlink's target under ``folder``."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(folder))] = path.read_bytes()
    return found


@pytest.fixture(scope="module")
def finished_run(synth_shards, tmp_path_factory) -> Path:
    """A 2-step single-process run (random-init ResNet-18 at 32 px, embed_dim 32)."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    done = train(*tiny_flags(synth_shards, run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ranking train: error: "), done.stderr
    return lines[0]


def test_a_second_start_in_a_run_folder_is_refused_and_changes_nothing(finished_run, synth_shards):
    before = snapshot(finished_run)
    line = one_error_line(train(*tiny_flags(synth_shards, finished_run)))
    assert f"{finished_run}: holds a run (checkpoints/, metrics.jsonl); give --resume latest" in line
    assert snapshot(finished_run) == before


def test_a_resume_that_would_change_the_model_is_refused_and_leaves_config_yaml(finished_run, synth_shards):
    """Issue 15.1: config.yaml was written before the checkpoint was loaded, so a failed resume broke the run."""
    before = snapshot(finished_run)
    line = one_error_line(train(*tiny_flags(synth_shards, finished_run, **{"embed-dim": 16, "image-size": 48}),
                                "--resume", "latest"))
    assert "config.yaml: a resumed run keeps its model and input; --embed-dim 16 (was 32), --image-size 48 (was 32)" \
        in line
    assert snapshot(finished_run) == before  # config.yaml (embed_dim 32) still rebuilds the checkpoint's model
    from ranking.learning.models import load_trained

    model, cfg, step = load_trained(finished_run)
    assert cfg.embed_dim == 32 and step == 2


def test_overwrite_moves_the_old_run_aside(finished_run, synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, symlinks=True)
    before = snapshot(run_dir)
    done = train(*tiny_flags(synth_shards, run_dir, steps=1), "--overwrite")
    assert done.returncode == 0, done.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the previous run of {run_dir} to {aside[0]}" in done.stderr
    assert {k: v for k, v in snapshot(aside[0]).items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
    assert runfolder.read_metrics_log(run_dir)[-1]["step"] == 1  # the new run, from scratch


def trainer_config(shards: Path, run_dir: Path, *flags: str) -> TrainConfig:
    return parse(TrainConfig, tiny_flags(shards, run_dir) + list(flags), "ranking train", "")


def test_a_second_training_into_a_locked_run_folder_fails_at_once(synth_shards, tmp_path):
    """What rank 0 of a second `ranking train` runs first (train.check_inputs), while the first one holds the lock."""
    run_dir = tmp_path / "run"
    with folder_lock(run_dir, "ranking train"), contextlib.ExitStack() as held:
        with pytest.raises(RankingError, match=rf"{run_dir}: in use by ranking train \(pid {os.getpid()} on "):
            check_inputs(trainer_config(synth_shards, run_dir), held)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # the second one wrote nothing
    with contextlib.ExitStack() as held:  # the first one ended: the folder is free
        assert check_inputs(trainer_config(synth_shards, run_dir), held) is None
        assert f"ranking train (pid {os.getpid()} on " in (run_dir / LOCK).read_text()


def test_the_lock_goes_with_its_holder(tmp_path):
    with folder_lock(tmp_path, "first"):
        with pytest.raises(RankingError, match=r"in use by first \(pid"):
            with folder_lock(tmp_path, "second"):
                pass
    with folder_lock(tmp_path, "third"):  # released on exit: free again
        assert "third" in (tmp_path / LOCK).read_text()


def test_output_folders_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RankingError, match="file: --out exists and is not a folder"):
        check_writable_folder(tmp_path / "file", "--out")
    with pytest.raises(RankingError, match=r"--out cannot be created: .*file is not a folder"):
        check_writable_folder(tmp_path / "file" / "sub", "--out")
    with pytest.raises(RankingError, match=r"/proc/deep-ranking/out: --out is not writable \(/proc: "):
        check_writable_folder("/proc/deep-ranking/out", "--out")  # unwritable even for root
    check_writable_folder(tmp_path / "new" / "deeper", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # checking created nothing


def test_an_unwritable_run_folder_or_missing_shards_are_refused_before_anything_is_written(synth_shards, tmp_path):
    with contextlib.ExitStack() as held, pytest.raises(RankingError, match="--run-dir is not writable"):
        check_inputs(trainer_config(synth_shards, Path("/proc/deep-ranking-run")), held)
    with contextlib.ExitStack() as held, pytest.raises(RankingError, match="no-shards/manifest.json: missing"):
        check_inputs(trainer_config(tmp_path / "no-shards", tmp_path / "run"), held)
    assert not (tmp_path / "run").exists()


def test_bad_input_under_accelerate_launch_is_printed_once_and_is_the_launchers_root_cause(tmp_path):
    """Every rank exits 2; rank 0 alone prints the line, and torchelastic's summary names it as the root cause
    (its error file) instead of "To enable traceback see ..."."""
    run_dir = tmp_path / "run"
    done = launch(tiny_flags(tmp_path / "no-shards", run_dir, **{"no-wandb": None}) + ["--wandb"], timeout=180)
    message = f"{tmp_path / 'no-shards'}/manifest.json: missing"
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(f"ranking.train: error: {message}") == 2, output  # the line, then the root cause's copy
    assert output.count("exitcode  : 2") == 2  # every rank exits with the bad-input code
    root_cause = output[output.index("Root Cause"):]
    assert f"traceback : ranking.train: error: {message}" in root_cause
    assert not run_dir.exists()


def test_a_bad_flag_under_accelerate_launch_is_printed_once(tmp_path):
    done = launch(["--stesp", "4"], timeout=180)
    output = done.stdout + done.stderr
    expected = "ranking.train: error: unknown flag --stesp; did you mean --steps? (see ranking train --help)"
    assert output.count(expected) == 2 and output.count("exitcode  : 2") == 2, output
