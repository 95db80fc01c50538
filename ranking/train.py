"""Train the deep-ranking embedding: ``ranking train ...`` (one process) or ``accelerate launch -m ranking.train ...``.

Every rank streams its own infinite, resampled view of the train shards, so every rank takes exactly
``--steps`` optimizer steps whatever the number of shards. DataLoader workers ship uint8 batches at the stored size;
each step augments its batch on the training device (``augment.TrainAugment``: a random resized crop and flip of its
own for each image, resize, normalise) and embeds its images in one forward pass;
the paper sampler's triplets index into them, the batch sampler mines triplets on the batch gathered from all ranks
(``losses.DistributedLoss``).

Run folder: config.yaml, metrics.jsonl, loss.png, checkpoints/ (``--resume latest`` continues the run), wandb/.
SIGUSR1 or SIGTERM: finish the step, checkpoint, exit 75 (EX_TEMPFAIL) so that a launcher requeues the job.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from ranking import (
    augment,
    checkpoint,
    cli,
    config,
    distributed,
    losses,
    models,
    optim,
    runfolder,
    sampling,
    stream,
    tracking,
)
from ranking.checkpoint import TrainState
from ranking.config import TrainConfig
from ranking.errors import EXIT_OK, EXIT_REQUEUE, RankingError
from ranking.losses import StepLoss
from ranking.sampling import Batch
from ranking.shardformat import load_manifest

# ------------------------------------------------------------------------------------------------------------ data


def stream_seeds(seed: int, step: int) -> tuple[int, int]:
    """(samples seed, batches seed) of the stream starting at ``step``: a resumed run reads new, reproducible data."""
    samples_seed, batches_seed = np.random.SeedSequence([seed, step]).generate_state(2)
    return int(samples_seed), int(batches_seed)


def train_batches(cfg: TrainConfig, seeds: tuple[int, int], pin_memory: bool) -> Iterator[Batch]:
    """This rank's infinite iterator of batches of uint8 ``[N, 3, stored_size, stored_size]`` images, not yet
    augmented (stream.py mixes the rank and the worker into the seeds). An image of another size is resized to the
    square (aspect ratio not kept): raise ``stored_size`` for a folder source of larger images."""
    num_classes = len(load_manifest(cfg.shards)["classes"])
    samples_seed, batches_seed = seeds
    records = stream.train_records(cfg.shards, cfg.shuffle_buffer, samples_seed)
    decode = augment.StoredDecoder(cfg.stored_size).image
    batches = sampling.build_batches(records, cfg, num_classes, batches_seed, decode)
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    return iter(loader)


class DeviceAugment:
    """A worker's uint8 batch -> the model's input on the training device: ``augment.TrainAugment`` there, its crops
    and flips drawn from a generator of this run segment's stream seed and this rank (a resumed run restarts from
    the seeds of its step: the same crops again), then channels_last."""

    def __init__(self, cfg: TrainConfig, seeds: tuple[int, int], rank: int, device: torch.device) -> None:
        self.augment = augment.TrainAugment(cfg.image_size, *models.input_normalization(cfg.backbone))
        self.generator = augment.seeded_generator(seeds[1], rank)
        self.device, self.channels_last = device, cfg.channels_last

    def __call__(self, batch: Batch) -> Batch:
        images = self.augment(batch.images.to(self.device, non_blocking=True), self.generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        triplets = None if batch.triplets is None else batch.triplets.to(self.device, non_blocking=True)
        return Batch(images, batch.labels.to(self.device, non_blocking=True), batch.ids, triplets)


def triplets_in(batch: Batch) -> int:
    """Triplets a batch trains on; a mined batch counts one per anchor image (exact for batch-hard mining)."""
    return len(batch.triplets) if batch.triplets is not None else len(batch.ids)


# ------------------------------------------------------------------------------------------------ logs and stops


class Meter:
    """Loss, active fraction and triplets per second since the last read; kept on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)
        self.steps, self.triplets, self.started = 0.0, 0, time.perf_counter()

    def add(self, out: StepLoss, triplets: int, weight: float) -> None:
        self.sums += weight * torch.stack([out.loss, out.active_fraction])
        self.steps += weight
        self.triplets += triplets

    def read(self, accelerator: Accelerator) -> tuple[float, float, float]:
        """(loss, active fraction) averaged over steps and ranks, and triplets/s; a collective; starts anew."""
        loss, active_fraction = (accelerator.reduce(self.sums, reduction="mean") / self.steps).tolist()
        triplets_per_s = self.triplets / (time.perf_counter() - self.started)
        self.sums.zero_()
        self.steps, self.triplets, self.started = 0.0, 0, time.perf_counter()
        return loss, active_fraction, triplets_per_s


class Stop(enum.Enum):
    DONE = "done"
    TIME_LIMIT = "time limit"
    SIGNAL = "signal"

    @property
    def exit_code(self) -> int:
        """A run stopped by a signal has more to do: exit 75 so that its launcher requeues it."""
        return EXIT_REQUEUE if self is Stop.SIGNAL else EXIT_OK


class StopPolicy:
    """Why the loop stops after a step, the same answer on every rank (a collective: all ranks ask every step)."""

    def __init__(self, cfg: TrainConfig, signals: distributed.StopRequest, device: torch.device) -> None:
        self.steps, self.minutes = cfg.steps, cfg.time_limit_minutes
        self.signals, self.device = signals, device
        self.deadline = time.monotonic() + 60 * cfg.time_limit_minutes

    def reason(self, step: int) -> Stop | None:
        signalled = distributed.any_rank(self.signals.requested, self.device)
        out_of_time = self.minutes > 0 and distributed.any_rank(time.monotonic() > self.deadline, self.device)
        if step >= self.steps:
            return Stop.DONE
        return Stop.SIGNAL if signalled else Stop.TIME_LIMIT if out_of_time else None

    def explain(self, stop: Stop, step: int, saved: Path) -> str:
        if stop is Stop.SIGNAL:
            why = self.signals.signal.name if self.signals.signal else "another rank's stop request"
            return (f"ranking train: stopped at step {step}/{self.steps} ({why}); checkpoint {saved}; "
                    f"exit {stop.exit_code} to be requeued")
        if stop is Stop.TIME_LIMIT:
            return (f"ranking train: time limit of {self.minutes:g} min reached at step {step}/{self.steps}; "
                    "checkpoint saved")
        return ""


# ---------------------------------------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(TrainConfig, argv, "ranking train", "train the deep-ranking embedding")
    if cfg.wandb:
        tracking.apply_default_mode()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="wandb" if cfg.wandb else None)
    try:
        return train(cfg, accelerator)
    finally:
        distributed.shutdown()


def train(cfg: TrainConfig, accelerator: Accelerator) -> int:
    run_dir = Path(cfg.run_dir)
    resume_from = resume_checkpoint(cfg, accelerator.is_main_process)
    if accelerator.is_main_process:
        runfolder.write_config(cfg, run_dir)

    set_seed(cfg.seed)  # the same initial weights on every rank
    with accelerator.main_process_first():  # pretrained weights are downloaded once, then read from the cache
        net = models.build_model(cfg)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(cfg, net)
    scheduler = optim.build_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(net, optimizer)
    if cfg.compile:
        model = compiled(model, accelerator.device)
    objective = losses.build_objective(cfg)
    set_seed(cfg.seed, device_specific=True)  # different dropout on every rank (crops: DeviceAugment's generator)

    step, run_id, data_seeds = 0, tracking.new_run_id() if cfg.wandb else "", stream_seeds(cfg.seed, 0)
    if resume_from is not None:
        step, run_id, data_seeds = restore(resume_from, accelerator, net, optimizer, scheduler, cfg)
    if accelerator.is_main_process:
        runfolder.restart_metrics_log(run_dir, step)
    if cfg.wandb:
        tracking.init_trainer(accelerator, cfg.wandb_project, dataclasses.asdict(cfg), run_dir, run_id,
                              cfg.run_name or run_dir.name, cfg.wandb_group, cfg.wandb_tags)

    def save_checkpoint() -> Path:
        state = TrainState(step=step, model=net.state_dict(), optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(),
                           scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                           wandb_run_id=run_id, stream_seeds=stream_seeds(cfg.seed, step))
        return checkpoint.save(run_dir, state, cfg.keep_checkpoints)

    batches = train_batches(cfg, data_seeds, pin_memory=accelerator.device.type == "cuda")
    on_device = DeviceAugment(cfg, data_seeds, accelerator.process_index, accelerator.device)
    progress = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
                    dynamic_ncols=True)
    meter = Meter(accelerator.device)
    stop: Stop | None = None
    saved = runfolder.checkpoints_dir(run_dir)
    models.set_train_mode(model, cfg.freeze_bn_stats)
    with distributed.StopRequest() as signals:
        policy = StopPolicy(cfg, signals, accelerator.device)
        while True:
            lr = optimizer.param_groups[0]["lr"]
            for _ in range(cfg.grad_accum):
                batch = on_device(next(batches))
                with accelerator.accumulate(model):
                    out = objective(model(batch.images), batch.labels, batch.triplets)
                    accelerator.backward(out.objective)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.add(out, triplets_in(batch) * accelerator.num_processes, weight=1 / cfg.grad_accum)
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
                scheduler.step()
            step += 1
            progress.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                loss, active_fraction, triplets_per_s = meter.read(accelerator)
                record = {"step": step, "loss": loss, "active_fraction": active_fraction, "lr": lr,
                          "triplets_per_s": triplets_per_s}
                if accelerator.is_main_process:
                    runfolder.append_metrics(run_dir, record)
                    progress.set_postfix(loss=f"{loss:.4f}", triplets_per_s=f"{triplets_per_s:.0f}")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

            stop = policy.reason(step)
            if stop is not None or step % cfg.checkpoint_every == 0:
                saved = save_checkpoint()
            if stop is not None:
                break
    progress.close()
    assert stop is not None
    if stop is not Stop.DONE:
        accelerator.print(policy.explain(stop, step, saved), file=sys.stderr)
    finish(accelerator, run_dir)
    return stop.exit_code


def compiled(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` of the prepared model (TorchInductor; the first steps pay for compiling), refused in one line
    where it cannot run: Inductor builds its kernels with a C compiler (C++ on the CPU, Triton's launchers on CUDA).
    Checkpoints keep saving the plain module's weights."""
    import shutil

    import torch._dynamo

    compilers = ("g++", "c++", "clang++") if device.type == "cpu" else ("cc", "gcc", "clang")
    if not torch._dynamo.is_dynamo_supported():
        raise RankingError(f"--compile: torch.compile is not supported with Python {sys.version.split()[0]} and "
                           f"torch {torch.__version__}; run without --compile")
    if not any(shutil.which(name) for name in compilers):
        raise RankingError(f"--compile: no C compiler found ({', '.join(compilers)}) for TorchInductor's "
                           f"{device.type} kernels; install one or run without --compile")
    return cast(torch.nn.Module, torch.compile(model))


def resume_checkpoint(cfg: TrainConfig, is_main_process: bool) -> Path | None:
    """The checkpoint to resume from, decided by rank 0 for every rank (``latest`` may move while ranks look);
    a bad ``--resume`` fails on every rank with rank 0's message."""
    if not cfg.resume:
        return None
    found: tuple[Path | None, str] = (None, "")
    if is_main_process:
        try:
            found = (runfolder.resume_checkpoint(cfg.run_dir, cfg.resume), "")
        except RankingError as e:
            found = (None, str(e))
    path, error = distributed.broadcast_from_main(found)
    if error:
        raise RankingError(error)
    return path


def restore(resume_from: Path, accelerator: Accelerator, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig) -> tuple[int, str, tuple[int, int]]:
    """Load a checkpoint into the prepared objects; returns (step, W&B run id, stream seeds)."""
    state = checkpoint.load_state(resume_from)
    try:
        net.load_state_dict(state.model)
    except RuntimeError as e:
        raise RankingError(f"{resume_from}: weights do not fit the configured model "
                           f"({str(e).splitlines()[0]})") from None
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    if accelerator.scaler is not None and state.scaler:
        accelerator.scaler.load_state_dict(state.scaler)
    rng = checkpoint.load_rng(resume_from, accelerator.process_index)
    if rng is not None:
        checkpoint.set_rng_state(rng)
    run_id = state.wandb_run_id or (tracking.new_run_id() if cfg.wandb else "")
    accelerator.print(f"ranking train: resumed from {resume_from} at step {state.step}", file=sys.stderr)
    return state.step, run_id, state.stream_seeds or stream_seeds(cfg.seed, state.step)


def finish(accelerator: Accelerator, run_dir: Path) -> None:
    """Loss plot and W&B files first, then a barrier: when a rank exits early (exit 75), the launcher SIGTERMs the
    others, which must not cut rank 0 while it still writes."""
    if accelerator.is_main_process and (run_dir / runfolder.METRICS).exists():
        from ranking import plots  # matplotlib: only where a plot is drawn

        plots.plot_loss(runfolder.read_metrics_log(run_dir), run_dir / runfolder.LOSS_PLOT, run_dir.name)
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.train")
