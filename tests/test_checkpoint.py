"""Checkpoints: atomic folders, rotation, the `latest` link, RNG round trips, load_model and its errors; the folder
publisher and link replacement they (and index folders) are written with."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from harness import SMOKE
from ranking.core import files, flags
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.folders import checkpoint, runfolder
from ranking.learning.models import build_model
from ranking.retrieval.inference import EmbeddingModel


def tiny_state(step: int, **changes) -> checkpoint.TrainState:
    return (
        checkpoint.TrainState(
            step=step,
            model={"w": torch.full((2,), float(step))},
            optimizer={},
            scheduler={},
            wandb_run_id="abc123",
            stream_seeds=(0, step),
        )
        if not changes
        else dataclasses.replace(tiny_state(step), **changes)
    )


def test_save_keeps_newest_and_points_latest(tmp_path):
    for step in (10, 20, 30):
        folder = checkpoint.save(tmp_path, tiny_state(step), keep=2)
        assert folder.name == f"step-{step:07d}"
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000020", "step-0000030"]
    assert (root / "latest").is_symlink() and (root / "latest").resolve() == root / "step-0000030"

    latest = runfolder.resume_checkpoint(tmp_path, "latest")
    state = checkpoint.load_state(latest)
    assert state.step == 30 and state.wandb_run_id == "abc123" and state.stream_seeds == (0, 30)
    assert torch.equal(state.model["w"], torch.full((2,), 30.0))
    rank_file = torch.load(latest / "rng-rank0.pt", weights_only=True)
    assert rank_file["step"] == 30


def test_same_step_saved_twice_is_replaced(tmp_path):
    checkpoint.save(tmp_path, tiny_state(5), keep=2)
    state = tiny_state(5, wandb_run_id="second")
    checkpoint.save(tmp_path, state, keep=2)
    assert checkpoint.load_state(runfolder.resume_checkpoint(tmp_path, "latest")).wandb_run_id == "second"


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, tiny_state(10), keep=2)
    real_write = checkpoint._write

    def crash_on_state(obj, path):
        if path.name == checkpoint.STATE:
            raise OSError("disk full")
        real_write(obj, path)

    monkeypatch.setattr(checkpoint, "_write", crash_on_state)
    root = tmp_path / "checkpoints"
    with pytest.raises(RankingError) as error:  # one line (issue 22.13), the partial folder removed
        checkpoint.save(tmp_path, tiny_state(20), keep=2)
    assert str(error.value) == (
        f"{root / 'step-0000020'}: could not write the checkpoint (disk full); its partial "
        f"files are removed, the last checkpoint is {root / 'step-0000010'}"
    )
    assert not (root / "step-0000020").exists()  # never under its final name half-written
    assert not (root / ".tmp-step-0000020").exists()
    assert checkpoint.load_state(runfolder.resume_checkpoint(tmp_path, "latest")).step == 10

    monkeypatch.setattr(checkpoint, "_write", real_write)
    checkpoint.save(tmp_path, tiny_state(20), keep=2)
    assert checkpoint.load_state(runfolder.resume_checkpoint(tmp_path, "latest")).step == 20


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.randn(3), random.random(), np.random.rand()  # move away from the seeded states
    checkpoint.save(tmp_path, tiny_state(1), keep=1)
    expected = torch.randn(4), random.random(), np.random.rand(3)

    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    rng = checkpoint.load_rng(runfolder.resume_checkpoint(tmp_path, "latest"), rank=0)
    checkpoint.set_rng_state(rng)
    again = torch.randn(4), random.random(), np.random.rand(3)
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and np.array_equal(expected[2], again[2])
    latest = runfolder.resume_checkpoint(tmp_path, "latest")
    assert checkpoint.load_rng(latest, rank=5) is None  # more ranks than before


def write_run(run_dir, step: int) -> tuple[torch.nn.Module, TrainConfig]:
    cfg = flags.build(TrainConfig, str(SMOKE), {"embed_dim": 8, "run_dir": str(run_dir)})
    flags.save(cfg, run_dir / "config.yaml")
    model = build_model(cfg)
    with torch.no_grad():
        model.head.bias.fill_(0.5)  # not the initialisation: the loaded weights must be these
    checkpoint.save(run_dir, tiny_state(step, model=model.state_dict()), keep=2)
    return model, cfg


def test_load_model_from_run_or_checkpoint_folder(tmp_path):
    model, cfg = write_run(tmp_path, step=7)
    for path in (tmp_path, tmp_path / "checkpoints" / "step-0000007", tmp_path / "checkpoints" / "latest"):
        loaded = EmbeddingModel.from_run(path, device="cpu")
        assert loaded.step == 7 and loaded.spec.embed_dim == 8 and loaded.spec.backbone == cfg.backbone
        assert not loaded.net.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.net.state_dict()[key], value), key


def test_corrupt_or_missing_checkpoints_are_one_line_errors(tmp_path):
    write_run(tmp_path, step=3)
    state = tmp_path / "checkpoints" / "step-0000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(RankingError, match=r"state\.pt: sha256 differs from checkpoint.json") as error:
        EmbeddingModel.from_run(tmp_path)  # checkpoint.json catches the truncation before torch reads the file
    assert "\n" not in str(error.value)
    (state.parent / "checkpoint.json").unlink()  # a checkpoint written before manifests: torch's error, one line
    with pytest.raises(RankingError, match=r"state\.pt: corrupt checkpoint") as error:
        EmbeddingModel.from_run(tmp_path)
    assert "\n" not in str(error.value)

    state.unlink()
    with pytest.raises(RankingError, match="without state.pt"):
        EmbeddingModel.from_run(state.parent)
    with pytest.raises(RankingError, match="neither a checkpoint folder"):
        EmbeddingModel.from_run(tmp_path / "nowhere")
    with pytest.raises(RankingError, match="no checkpoint to resume from"):
        runfolder.resume_checkpoint(tmp_path / "fresh-run", "latest")


def test_weights_of_another_architecture_are_refused(tmp_path):
    write_run(tmp_path, step=3)
    cfg = flags.build(TrainConfig, str(tmp_path / "config.yaml"), {"embed_dim": 16})
    flags.save(cfg, tmp_path / "config.yaml")
    with pytest.raises(RankingError, match="do not fit the model"):
        EmbeddingModel.from_run(tmp_path)


# ------------------------------------------------------------------------------- publishing a folder (core/files)


def filled(folder, text: str):
    folder.mkdir()
    (folder / "marker").write_text(text)
    return folder


def test_a_published_folder_replaces_the_old_one_and_readers_never_find_it_missing(tmp_path):
    """A reader in another process opens FINAL/marker in a loop while FINAL is replaced 200 times: it always finds
    the old folder or the new one, never neither, and nothing is left beside FINAL."""
    final = tmp_path / "index"
    files.publish_folder(filled(tmp_path / ".index.tmp", "0"), final)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
found, missing, end = set(), 0, time.time() + 60
while time.time() < end and "199" not in found:
    try:
        found.add(open({str(final / "marker")!r}).read())
    except FileNotFoundError:
        missing += 1
print(len(found), missing)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    for n in range(1, 200):
        files.publish_folder(filled(tmp_path / ".index.tmp", str(n)), final)
        time.sleep(0.005)
    seen, missing = map(int, reader.communicate(timeout=120)[0].split())
    assert seen > 1 and missing == 0
    assert (final / "marker").read_text() == "199" and [p.name for p in tmp_path.iterdir()] == ["index"]


def test_without_an_exchange_the_old_folder_is_put_back_if_the_rename_fails(tmp_path):
    final = filled(tmp_path / "index", "old")
    with pytest.raises(FileNotFoundError):
        files.replace_by_renames(tmp_path / ".index.tmp-gone", final)
    assert (final / "marker").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["index"]
    files.replace_by_renames(filled(tmp_path / ".index.tmp", "new"), final)
    assert (final / "marker").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["index"]


def test_a_link_is_repointed_in_one_step(tmp_path):
    for name in ("step-1", "step-2"):
        filled(tmp_path / name, name)
    files.replace_link(tmp_path / "latest", "step-1")
    files.replace_link(tmp_path / "latest", "step-2")
    assert os.readlink(tmp_path / "latest") == "step-2" and (tmp_path / "latest" / "marker").read_text() == "step-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]
