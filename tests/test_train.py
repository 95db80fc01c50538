"""The trainer with real processes: 2 gloo ranks through `accelerate launch`, on the synthetic shards.

This file is also the script of the DDP gradient check: `accelerate launch tests/test_train.py ddp-gradients OUT`.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import torch
from torch import nn

from harness import SMOKE, launch, metrics, rank_steps, train_flags, wandb_history_and_config
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.data.sampling import Batch
from ranking.learning import losses
from ranking.learning.miners import mine_triplets
from ranking.learning.optim import lr_factor
from ranking.training.scale import Scale

GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # fp32; the two sides differ only in summation order


# --------------------------------------------------------------------------------------------------- fast units


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(109, cfg) < 0.001
    constant = TrainConfig(steps=110, warmup_steps=10, schedule="constant")
    assert lr_factor(109, constant) == 1.0


@pytest.mark.system  # DataLoader worker processes
def test_the_trainers_input_is_uint8_from_workers_and_its_crops_are_reproducible(synth_shards, monkeypatch):
    """Workers ship uint8 at the stored size; the device side crops with a generator of (stream seeds, rank): the
    same seeds and rank give the same model input, as a resumed run that restarts from its step's seeds does."""
    from ranking.data.loader import DeviceAugment, stream_seeds, train_batches

    cfg = flags.build(
        TrainConfig,
        str(SMOKE),
        {
            "shards": str(synth_shards),
            "workers": 2,
            "shuffle_buffer": 50,
            "classes_per_batch": 3,
            "samples_per_class": 4,
        },
    )

    def model_inputs(step: int, rank: int) -> list[Batch]:
        monkeypatch.setenv("RANK", str(rank))  # the rank the stream's workers seed from
        seeds = stream_seeds(cfg.seed, step)
        batches = train_batches(cfg, seeds, pin_memory=False)
        raw = [next(batches) for _ in range(3)]
        assert all(b.images.dtype == torch.uint8 and b.images.shape == (12, 3, 64, 64) for b in raw)
        on_device = DeviceAugment(cfg, seeds, rank, torch.device("cpu"))
        return [on_device(batch) for batch in raw]

    first = model_inputs(step=0, rank=0)
    assert all(b.images.dtype == torch.float32 and b.images.shape == (12, 3, 32, 32) for b in first)
    assert first[0].images.is_contiguous(memory_format=torch.channels_last)
    again = model_inputs(step=0, rank=0)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.ids, b.ids) for a, b in zip(first, again))
    for other in (model_inputs(step=0, rank=1), model_inputs(step=30, rank=0)):  # another rank; a resumed run
        assert not any(torch.equal(a.images, b.images) for a, b in zip(first, other))
    larger = dataclasses.replace(cfg, stored_size=48, workers=0)  # e.g. a folder source of larger images
    assert next(train_batches(larger, stream_seeds(0, 0), pin_memory=False)).images.shape == (12, 3, 48, 48)
    for crop_scale in (0.5, 1.0):  # the crops cover [crop_scale, 1] of the image; 1: the whole image
        crops = DeviceAugment(
            dataclasses.replace(cfg, crop_scale=crop_scale), stream_seeds(0, 0), 0, torch.device("cpu")
        )
        boxes = crops.augment.sample_boxes(200, 64, 64, crops.generator).boxes
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64**2
        assert areas.min() >= crop_scale - 0.05 and (areas.min() < 0.6 if crop_scale < 1 else areas.max() == 1)


def test_compile_is_refused_in_one_line_without_a_compiler(monkeypatch):
    """--compile (torch.compile; a tiny CPU run compiles in about 2 minutes here, too slow for the suite) is refused
    before training where TorchInductor has no C compiler to build its kernels with."""
    import shutil

    from ranking.core.errors import RankingError
    from ranking.training.parts import compiled

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RankingError, match=r"^--compile: no C compiler found \(g\+\+, .*run without --compile$"):
        compiled(nn.Linear(2, 2), torch.device("cpu"))


# ------------------------------------------------------------------------------- 2 ranks: train, stop, resume

STEPS = 40


class StoppedRun(NamedTuple):
    run_dir: Path
    stop_step: int
    stopped_checkpoint: Path
    stopped: subprocess.CompletedProcess
    resumed: subprocess.CompletedProcess


def stop_rank_once_it_logged(launcher: subprocess.Popen, run_dir: Path, rank: int) -> subprocess.CompletedProcess:
    """Send SIGUSR1 to one rank (a direct child of the launcher) after the first logged step; wait for the end."""
    try:
        deadline = time.time() + 180
        while not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir):
            assert launcher.poll() is None and time.time() < deadline, "the run never logged a step"
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == str(rank)]
        assert len(ranks) == 1
        ranks[0].send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=180)
        return subprocess.CompletedProcess(launcher.args, launcher.returncode, output, "")
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.fixture(scope="module")
def stopped_run(synth_shards, tmp_path_factory) -> StoppedRun:
    """One run on 2 ranks (batch sampler, all valid triplets mined over both ranks' batches, a DataLoader worker
    per rank), stopped by SIGUSR1 sent to rank 1 only right after step 1, then resumed with --resume latest."""
    run_dir = tmp_path_factory.mktemp("runs") / "two-ranks"
    flags = train_flags(
        synth_shards,
        run_dir,
        steps=STEPS,
        sampler="batch",
        miner="all",
        lr=3e-3,
        workers=1,
        **{
            "classes-per-batch": 3,
            "samples-per-class": 4,
            "checkpoint-every": 15,
            "keep-checkpoints": 2,
            "run-name": "two-ranks",
            "wandb-group": "tests",
        },
    )
    stopped = stop_rank_once_it_logged(launch(flags, wait=False), run_dir, rank=1)
    stopped_checkpoint = (run_dir / "checkpoints" / "latest").resolve()
    stop_step = torch.load(stopped_checkpoint / "state.pt", weights_only=True)["step"]
    resumed = launch(flags + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return StoppedRun(run_dir, stop_step, stopped_checkpoint, stopped, resumed)


def test_stop_signal_on_one_rank_checkpoints_both_ranks_and_exits_75(stopped_run):
    output, stop_step = stopped_run.stopped.stdout, stopped_run.stop_step
    # torchrun turns the ranks' exit code 75 into a failure of its own, and names the code
    assert stopped_run.stopped.returncode != 0 and "exitcode  : 75" in output, output
    assert 1 <= stop_step < STEPS
    # rank 0, which prints, got no signal: it stopped at the same step because rank 1 asked
    assert f"stopped at step {stop_step}/{STEPS} (another rank's stop request)" in output, output
    assert stopped_run.stopped_checkpoint.name == f"step-{stopped_run.stop_step:07d}"


def test_resume_continues_the_run_to_the_configured_step(stopped_run):
    run_dir, stop_step = stopped_run.run_dir, stopped_run.stop_step
    assert f"resumed from {stopped_run.stopped_checkpoint} at step {stop_step}" in stopped_run.resumed.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # continuous, no duplicates
    # what 2 ranks train with: the recipe's lr scaled by sqrt(2) (lr_scaling sqrt against one process's batch)
    recipe = flags.build(TrainConfig, str(run_dir / "config.yaml"))
    cfg = Scale.of(recipe, 2).applied(recipe)
    assert cfg.lr == pytest.approx(recipe.lr * 2**0.5)
    for r in records:  # the schedule continues where it stopped instead of warming up again
        assert r["train/lr"] == pytest.approx(cfg.lr * lr_factor(r["step"] - 1, cfg)), r

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000030", "step-0000040"]
    assert (checkpoints / "latest").resolve().name == "step-0000040"
    # every rank wrote the step it reached into its own file of each checkpoint: 5 shards streamed by 2 ranks
    # never leave one rank short of data
    assert rank_steps(checkpoints / "step-0000030") == {0: 30, 1: 30}
    assert rank_steps(checkpoints / "step-0000040") == {0: STEPS, 1: STEPS}
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_two_ranks_loss_falls(stopped_run):
    records = metrics(stopped_run.run_dir)
    early = sum(r["train/loss"] for r in records[:8]) / 8
    late = sum(r["train/loss"] for r in records[-8:]) / 8
    assert late < 0.7 * early, (early, late)
    assert all(0.0 <= r["train/active_fraction"] <= 1.0 and r["train/triplets_per_s"] > 0 for r in records)


def test_wandb_offline_run_is_reused_and_holds_the_loss_and_the_config(stopped_run):
    run_dir, stop_step = stopped_run.run_dir, stopped_run.stop_step
    state = torch.load(run_dir / "checkpoints" / "latest" / "state.pt", weights_only=True)
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))  # one per segment, named by time then run id
    assert len(folders) == 2 and {f.name.rsplit("-", 1)[1] for f in folders} == {state["wandb_run_id"]}
    (first, first_config), (second, second_config) = map(wandb_history_and_config, folders)
    assert [row["_step"] for row in first] == list(range(1, stop_step + 1))
    assert [row["_step"] for row in second] == list(range(stop_step + 1, STEPS + 1))
    for row, record in zip(first + second, metrics(run_dir)):  # the names of metrics.jsonl, on trainer/step
        assert (
            row["train/loss"] == pytest.approx(record["train/loss"])
            and row["train/lr"] == pytest.approx(record["train/lr"])
            and row["trainer/step"] == record["step"]
        )
    assert not any(key for row in first + second for key in row if "/" not in key and not key.startswith("_")), (
        "every logged name is in a section (train/, val/, trainer/)"
    )
    for run_config in (first_config, second_config):
        assert run_config["miner"] == "all" and run_config["steps"] == STEPS and run_config["wandb_tags"] == ["test"]
    assert second_config["resume"] == "latest"


# ------------------------------------------------------------------------------------------ DDP gradient check

GLOBAL_IMAGES, CLASSES = 16, 4


def fixed_problem(world: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The same seeded model (eval mode: BatchNorm statistics are per rank in DDP), images, labels and, for each of
    ``world`` ranks, triplets indexing that rank's slice of the images."""
    from ranking.learning.models import build_model

    cfg = TrainConfig(
        backbone="resnet18", pretrained=False, embed_dim=16, image_size=32, loss="hinge", miner="hard", margin=0.5
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(GLOBAL_IMAGES, 3, 32, 32)
    labels = torch.arange(GLOBAL_IMAGES) % CLASSES  # every class on every rank: mined triplets cross ranks
    per_rank = GLOBAL_IMAGES // world
    triplets = []
    for _ in range(world):
        rows = torch.arange(per_rank)
        local_labels = labels[:per_rank]
        query = rows[:6]
        positive = torch.stack([rows[(local_labels == local_labels[q]) & (rows != q)][0] for q in query])
        negative = torch.stack([rows[local_labels != local_labels[q]][q % 3] for q in query])
        triplets.append(torch.stack([query, positive, negative], dim=1))
    return model, losses.build_objective(cfg), images, labels, triplets


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def ddp_gradients_worker(out: str) -> None:
    """Each rank takes its slice of the fixed batch; rank 0 saves the DDP-averaged gradients of both paths."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    model, loss_fn, images, labels, triplets = fixed_problem(world)
    rows = slice(rank * GLOBAL_IMAGES // world, (rank + 1) * GLOBAL_IMAGES // world)
    ddp_model = accelerator.prepare(model)
    results = {}
    for path, batch in (
        ("mined", Batch(images[rows], labels[rows], labels[rows], None)),
        ("triplets", Batch(images[rows], labels[rows], labels[rows], triplets[rank])),
    ):
        ddp_model.zero_grad()
        accelerator.backward(loss_fn(ddp_model(batch.images), batch.labels, batch.triplets).objective)
        results[path] = gradients(accelerator.unwrap_model(ddp_model))
    # control: mining each rank's batch alone is a different problem, so the check can tell the difference
    ddp_model.zero_grad()
    local = ddp_model(images[rows])
    local_loss, _ = loss_fn.loss(local, labels[rows], mine_triplets(local, labels[rows], loss_fn.miner, loss_fn.margin))
    accelerator.backward(local_loss)
    results["local-mining"] = gradients(accelerator.unwrap_model(ddp_model))
    if rank == 0:
        torch.save(results, out)
    accelerator.end_training()


def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "grads.pt"
    result = launch(["ddp-gradients", str(out)], script=__file__, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    ddp = torch.load(out, weights_only=True)

    model, loss_fn, images, labels, triplets = fixed_problem(world=2)
    half = GLOBAL_IMAGES // 2
    concatenated_triplets = torch.cat([triplets[0], triplets[1] + half])
    for path, batch in (
        ("mined", Batch(images, labels, labels, None)),
        ("triplets", Batch(images, labels, labels, concatenated_triplets)),
    ):
        model.zero_grad()
        loss_fn(model(batch.images), batch.labels, batch.triplets).objective.backward()  # one process: no gather
        reference = gradients(model)
        assert reference["head.weight"].abs().max() > 0
        for name, grad in reference.items():
            torch.testing.assert_close(ddp[path][name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=f"{path} {name}")
        if path == "mined":
            assert not torch.allclose(ddp["local-mining"]["head.weight"], reference["head.weight"], rtol=1e-2)


if __name__ == "__main__" and sys.argv[1:2] == ["ddp-gradients"]:
    ddp_gradients_worker(sys.argv[2])
