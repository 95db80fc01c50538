"""Safe run folders and "check first, then act": an existing run is refused unless --resume or --overwrite, one
training per folder (a lock), a resume cannot change the model, and bad input leaves nothing behind (one line,
printed once under accelerate launch)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import launch, train_flags
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.core.files import LOCK, NO_LOCK, check_writable_folder, file_system, folder_lock
from ranking.core.flags import parse
from ranking.folders import runfolder
from ranking.train import check_inputs


def tiny_flags(shards: Path, run_dir: Path, **overrides) -> list[str]:
    return train_flags(
        shards,
        run_dir,
        **(
            {"steps": 2, "classes-per-batch": 3, "samples-per-class": 2, "checkpoint-every": 100, "no-wandb": None}
            | overrides
        ),
    )


def train(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranking", "train", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )


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
    line = one_error_line(
        train(*tiny_flags(synth_shards, finished_run, **{"embed-dim": 16, "image-size": 48}), "--resume", "latest")
    )
    assert (
        "config.yaml: a resumed run keeps its model and input; --embed-dim 16 (was 32), --image-size 48 (was 32)"
        in line
    )
    assert snapshot(finished_run) == before  # config.yaml (embed_dim 32) still rebuilds the checkpoint's model
    from ranking.retrieval.inference import load

    model = load(finished_run, device="cpu")
    assert model.spec.embed_dim == 32 and model.step == 2


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


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_is_one_line_naming_it_and_the_way_on(code, synth_shards, tmp_path, monkeypatch):
    """Lustre mounted noflock, NFS without lockd: flock raises; the stage stops with one line naming the file system
    and RANKING_NO_LOCK, and with RANKING_NO_LOCK=1 it writes without the lock."""

    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.delenv(NO_LOCK, raising=False)
    with pytest.raises(RankingError) as refused:
        with folder_lock(tmp_path / "run", "ranking train"):
            pytest.fail("entered the folder without a lock")
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'run' / LOCK}: cannot lock ({os.strerror(code)}) on ")
    assert f" at {file_system(tmp_path).split(' at ')[1]};" in line and "set RANKING_NO_LOCK=1" in line
    assert "overwrite each other" in line  # the risk, said where the way on is offered
    fs_type = file_system(tmp_path).split(" ")[0]
    assert fs_type in Path("/proc/mounts").read_text().split() and fs_type != "an"
    # what rank 0 of `ranking train` runs first refuses the same way, before writing anything
    run_dir = tmp_path / "train"
    with contextlib.ExitStack() as held, pytest.raises(RankingError, match="set RANKING_NO_LOCK=1"):
        check_inputs(trainer_config(synth_shards, run_dir), held)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]
    monkeypatch.setenv(NO_LOCK, "1")
    with contextlib.ExitStack() as held:
        assert check_inputs(trainer_config(synth_shards, run_dir), held) is None


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
    root_cause = output[output.index("Root Cause") :]
    assert f"traceback : ranking.train: error: {message}" in root_cause
    assert not run_dir.exists()


def test_a_bad_flag_under_accelerate_launch_is_printed_once(tmp_path):
    done = launch(["--stesp", "4"], timeout=180)
    output = done.stdout + done.stderr
    expected = "ranking.train: error: unknown flag --stesp; did you mean --steps? (see ranking train --help)"
    assert output.count(expected) == 2 and output.count("exitcode  : 2") == 2, output


# ---------------------------------------------------------------------------------------------------------------
# config.yaml: its schema, the model block, and runs of other versions


def test_config_yaml_holds_its_schema_and_model_and_is_still_a_config_file_to_train_from(tmp_path):
    import yaml

    from ranking.learning.models import ModelSpec

    cfg = TrainConfig(run_dir=str(tmp_path), backbone="resnet18", embed_dim=32, image_size=48, lr=0.01)
    spec = ModelSpec.of(cfg)
    runfolder.write_config(cfg, tmp_path, spec.to_dict())
    saved = yaml.safe_load(runfolder.config_path(tmp_path).read_text())
    assert list(saved)[0] == "schema" and saved["schema"] == runfolder.SCHEMA == 2
    assert saved["model"] == spec.to_dict() and saved["lr"] == 0.01
    assert runfolder.read_saved(tmp_path) == (cfg, spec.to_dict())
    assert ModelSpec.of_run(tmp_path) == spec
    # `ranking train --config RUN/config.yaml` reruns a run: the derived keys are skipped, not taken for typos
    assert parse(TrainConfig, ["--config", str(runfolder.config_path(tmp_path))], "ranking train", "") == cfg
    typo = tmp_path / "mine.yaml"
    typo.write_text("lrr: 0.1\n")  # a user's own file stays strict: an unknown key there is a typo
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'lrr' for TrainConfig"):
        parse(TrainConfig, ["--config", str(typo)], "ranking train", "")


def test_upgrade_maps_renamed_keys_and_lists_unknown_and_missing_ones():
    import dataclasses

    current = dataclasses.asdict(TrainConfig())
    old = {key: value for key, value in current.items() if key not in ("lr", "stored_size")}
    old |= {"learning_rate": 0.5, "embed-dim": 64, "old_flag": 3, "schema": 2, "model": {"backbone": "resnet18"}}
    saved = runfolder.upgrade(old, renamed={"learning_rate": "lr"})
    assert saved.values["lr"] == 0.5 and saved.values["embed_dim"] == 64  # renamed, and dashes as flags write them
    assert saved.unknown == ["old_flag"] and saved.missing == ["stored_size"]
    assert saved.schema == 2 and saved.model == {"backbone": "resnet18"}
    line = saved.warning(Path("run/config.yaml"))
    assert line == (
        "warning: run/config.yaml: written by another version of deep-ranking: ignoring old_flag (no such "
        "setting in this version); stored_size not in the file (taking today's defaults)"
    )
    assert runfolder.upgrade(current).warning(Path("x")) is None  # schema 1, every key: nothing to say
    assert runfolder.upgrade(current).schema == 1 and runfolder.upgrade(current).model is None
    assert "schema 3 is newer than this version's 2" in runfolder.upgrade({**old, "schema": 3}).warning(Path("x"))
    with pytest.raises(ConfigError, match="schema must be a positive integer, got 'two'"):
        runfolder.upgrade({"schema": "two"})


def test_an_older_runs_config_is_read_with_one_warning_line_printed_once(tmp_path, capsys):
    """A run written before stored_size existed, with a setting since removed: evaluate, search, index, compare and
    report all read it (the stages themselves: test_evaluate's real process)."""
    from ranking.learning.models import ModelSpec

    cfg = TrainConfig(run_dir=str(tmp_path), backbone="resnet18", embed_dim=16, image_size=40)
    flags.save(cfg, runfolder.config_path(tmp_path))  # schema 1: the fields alone
    text = runfolder.config_path(tmp_path).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("stored_size:")] + ["old_flag: true"]
    runfolder.config_path(tmp_path).write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert runfolder.read_config(tmp_path) == cfg  # stored_size at its default, as before
    assert ModelSpec.of_run(tmp_path) == ModelSpec.of(cfg)  # no model block: derived from the train keys
    assert runfolder.read_config(tmp_path) == cfg
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {runfolder.config_path(tmp_path)}: ")
    assert "ignoring old_flag" in err[0] and "stored_size not in the file" in err[0]


def test_the_stored_model_block_is_the_runs_identity_and_a_bad_value_is_one_line(tmp_path):
    """What the run was fed stays what it is fed: the block, not today's derivation from the backbone."""
    import yaml

    from ranking.learning.models import ModelSpec

    cfg = TrainConfig(run_dir=str(tmp_path), backbone="resnet18", embed_dim=16, image_size=40)
    as_trained = {**ModelSpec.of(cfg).to_dict(), "mean": [0.5, 0.5, 0.5]}
    runfolder.write_config(cfg, tmp_path, as_trained)
    assert ModelSpec.of_run(tmp_path).mean == (0.5, 0.5, 0.5)
    path = runfolder.config_path(tmp_path)
    saved = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**saved, "model": {**as_trained, "embed_dim": "big"}}))
    with pytest.raises(RankingError, match=rf"{path}: model: embed_dim must be an integer, got 'big'"):
        ModelSpec.of_run(tmp_path)
    path.write_text(yaml.safe_dump({**saved, "embed_dim": "big"}))
    with pytest.raises(RankingError, match=rf"{path}: cannot rebuild the run's config \(.*embed_dim must be int"):
        runfolder.read_config(tmp_path)
