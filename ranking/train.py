"""Train the deep-ranking embedding: ``ranking train ...`` (one process) or ``accelerate launch -m ranking.train ...``.

Every rank streams its own infinite, resampled view of the train shards, so every rank takes exactly
``--steps`` optimizer steps whatever the number of shards. Each step embeds the batch's images in one forward pass;
the paper sampler's triplets index into them, the batch sampler mines triplets on the batch gathered from all ranks.

Run folder: config.yaml, metrics.jsonl, loss.png, checkpoints/ (``--resume latest`` continues the run), wandb/.
SIGUSR1 or SIGTERM: finish the step, checkpoint, exit 75 (EX_TEMPFAIL) so that a launcher requeues the job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from ranking import checkpoint, cli, config, distributed, losses, models, sampling, shards, stream
from ranking.config import TrainConfig
from ranking.errors import RankingError
from ranking.sampling import Batch

EX_TEMPFAIL = 75  # stopped on request after checkpointing: requeue me
METRICS = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------- the step

class StepLoss(NamedTuple):
    objective: Tensor  # what to back-propagate
    loss: Tensor  # the loss value, detached, for logging
    active_fraction: Tensor  # share of triplets with non-zero loss, detached


def ranking_loss(model: nn.Module, loss_fn: nn.Module, batch: Batch) -> StepLoss:
    """One forward pass over all the batch's images, then the loss.

    Triplets given (paper sampler): each rank's own triplets and mean loss; with equal-sized batches DDP's gradient
    average is the gradient of the concatenated batch. Triplets mined (batch sampler): the loss is mined on the
    embeddings of all ranks, identical on every rank; each rank's gradient reaches only its own rows, so the
    objective is scaled by the world size to make DDP's average equal the concatenated batch's gradient.
    """
    embeddings = model(batch.images)
    if batch.triplets is not None:
        loss, active_fraction = loss_fn(embeddings, batch.labels, batch.triplets)
        return StepLoss(loss, loss.detach(), active_fraction)
    all_embeddings = distributed.all_gather_with_grad(embeddings)
    all_labels = distributed.all_gather(batch.labels)
    loss, active_fraction = loss_fn(all_embeddings, all_labels, None)
    return StepLoss(loss * distributed.world_size(), loss.detach(), active_fraction)


def triplets_in(batch: Batch) -> int:
    """Triplets a batch trains on; a mined batch counts one per anchor image (exact for batch-hard mining)."""
    return len(batch.triplets) if batch.triplets is not None else len(batch.ids)


def to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    images = batch.images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    triplets = None if batch.triplets is None else batch.triplets.to(device, non_blocking=True)
    return Batch(images, batch.labels.to(device, non_blocking=True), batch.ids, triplets)


# ------------------------------------------------------------------------------------------ data, optimizer, schedule

def stream_seeds(seed: int, step: int) -> tuple[int, int]:
    """(samples seed, batches seed) of the stream starting at ``step``: a resumed run reads new, reproducible data."""
    samples_seed, batches_seed = np.random.SeedSequence([seed, step]).generate_state(2)
    return int(samples_seed), int(batches_seed)


def train_batches(cfg: TrainConfig, seeds: tuple[int, int], pin_memory: bool) -> Iterator[Batch]:
    """This rank's infinite iterator of batches (stream.py mixes the rank and the worker into the seeds)."""
    num_classes = len(shards.load_manifest(cfg.shards)["classes"])
    mean, std = models.input_normalization(cfg.backbone)
    samples_seed, batches_seed = seeds
    records = stream.train_records(cfg.shards, cfg.shuffle_buffer, samples_seed)
    decode = stream.Decoder(stream.train_transform(cfg.image_size, mean, std))
    batches = sampling.build_batches(records, cfg, num_classes, batches_seed, decode.image)
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory,
                        prefetch_factor=4 if cfg.workers > 0 else None)
    return iter(loader)


def parameter_groups(cfg: TrainConfig, model: models.EmbeddingNet) -> list[dict]:
    """The head learns at ``lr`` (the first group: the logged lr), the pretrained trunk at ``lr * trunk_lr_scale``.

    A scale of 0 freezes the whole trunk, ``frozen_stages`` its first stages: frozen parameters get no gradients at
    all, so no backward pass runs through them (fine-tuning's cost is mostly the backward pass of the early layers).
    """
    if cfg.trunk_lr_scale == 0:
        model.trunk.requires_grad_(False)
    elif cfg.frozen_stages:
        models.freeze_stages(model, cfg.frozen_stages)
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    in_trunk = {id(p) for p in model.trunk.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_trunk]
    if not trunk:
        return [{"params": rest}]
    if cfg.trunk_lr_scale == 1:
        return [{"params": rest + trunk}]
    return [{"params": rest}, {"params": trunk, "lr": cfg.lr * cfg.trunk_lr_scale}]


def set_train_mode(model: nn.Module, accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Train mode, except the trunk's BatchNorm layers whose statistics are frozen (all of them with
    ``freeze_bn_stats``, else those in a frozen part of the trunk): the running statistics of small class-balanced
    batches of upsampled 64-px crops drift far from the pretrained ones and ruin the features the evaluation sees."""
    model.train()
    for module in accelerator.unwrap_model(model).trunk.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = module.weight is not None and not module.weight.requires_grad
            if cfg.freeze_bn_stats or frozen:
                module.eval()


def build_optimizer(cfg: TrainConfig, model: models.EmbeddingNet) -> torch.optim.Optimizer:
    params = parameter_groups(cfg, model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to zero at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------ logs and W&B

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


def start_metrics(run_dir: Path, resumed_step: int) -> None:
    """Keep the logged steps up to the resumed one, so the resumed curve continues without duplicates."""
    path = run_dir / METRICS
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resumed_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def use_wandb_offline_without_key() -> None:
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"


def init_wandb(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path, run_id: str) -> None:
    init = {"name": cfg.run_name or run_dir.name, "group": cfg.wandb_group or None, "tags": cfg.wandb_tags,
            "id": run_id, "resume": "allow", "dir": str(run_dir)}
    accelerator.init_trackers(cfg.wandb_project, config=dataclasses.asdict(cfg), init_kwargs={"wandb": init})


def new_run_id(cfg: TrainConfig) -> str:
    if not cfg.wandb:
        return ""
    from wandb.sdk.lib.runid import generate_id  # what wandb.init uses (wandb 0.31 dropped wandb.util.generate_id)

    return generate_id()


# ---------------------------------------------------------------------------------------------------------- training

def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(TrainConfig, argv, "ranking train", "train the deep-ranking embedding")
    if cfg.wandb:
        use_wandb_offline_without_key()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="wandb" if cfg.wandb else None)
    try:
        return train(cfg, accelerator)
    finally:
        distributed.shutdown()


def train(cfg: TrainConfig, accelerator: Accelerator) -> int:
    run_dir = Path(cfg.run_dir)
    resume_from = checkpoint.resume_path(run_dir, cfg.resume) if cfg.resume else None
    if accelerator.is_main_process:
        config.save(cfg, run_dir / "config.yaml")

    set_seed(cfg.seed)  # the same initial weights on every rank
    with accelerator.main_process_first():  # pretrained weights are downloaded once, then read from the cache
        model = models.build_model(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    # Not given to accelerate.prepare: its scheduler wrapper steps once per process per optimizer step.
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = losses.build_loss(cfg)
    set_seed(cfg.seed, device_specific=True)  # different augmentations and dropout on every rank

    step, run_id, data_seeds = 0, new_run_id(cfg), stream_seeds(cfg.seed, 0)
    if resume_from is not None:
        step, run_id, data_seeds = restore(resume_from, accelerator, model, optimizer, scheduler, cfg)
    if accelerator.is_main_process:
        start_metrics(run_dir, step)
    if cfg.wandb:
        init_wandb(accelerator, cfg, run_dir, run_id)

    def save_checkpoint() -> None:
        state = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            "step": step,
            "wandb_run_id": run_id,
            # a resumed run reads a new stream, not the first segment's samples again
            "stream": dict(zip(("samples_seed", "batches_seed"), stream_seeds(cfg.seed, step))),
        }
        checkpoint.save(run_dir, step, state, cfg.keep_checkpoints)

    batches = train_batches(cfg, data_seeds, pin_memory=accelerator.device.type == "cuda")
    progress = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
                    dynamic_ncols=True)
    meter = Meter(accelerator.device)
    set_train_mode(model, accelerator, cfg)
    deadline = time.monotonic() + 60 * cfg.time_limit_minutes
    with distributed.StopRequest() as stop:
        while step < cfg.steps:
            lr = optimizer.param_groups[0]["lr"]
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), accelerator.device, cfg.channels_last)
                with accelerator.accumulate(model):
                    out = ranking_loss(model, loss_fn, batch)
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
                    append_metrics(run_dir, record)
                    progress.set_postfix(loss=f"{loss:.4f}", triplets_per_s=f"{triplets_per_s:.0f}")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

            stopping = distributed.any_rank(stop.requested, accelerator.device)
            out_of_time = cfg.time_limit_minutes > 0 and distributed.any_rank(time.monotonic() > deadline,
                                                                             accelerator.device)
            if stopping or out_of_time or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
            if stopping and step < cfg.steps:
                progress.close()
                why = stop.signal.name if stop.signal else "another rank's stop request"
                accelerator.print(f"ranking train: stopped at step {step}/{cfg.steps} ({why}); checkpoint "
                                  f"{checkpoint.checkpoints_dir(run_dir) / checkpoint.step_dir_name(step)}; "
                                  f"exit {EX_TEMPFAIL} to be requeued", file=sys.stderr)
                finish(accelerator, run_dir)
                return EX_TEMPFAIL
            if out_of_time and step < cfg.steps:
                accelerator.print(f"ranking train: time limit of {cfg.time_limit_minutes:g} min reached at step "
                                  f"{step}/{cfg.steps}; checkpoint saved", file=sys.stderr)
                break
    progress.close()
    finish(accelerator, run_dir)
    return 0


def restore(resume_from: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: LambdaLR, cfg: TrainConfig) -> tuple[int, str, tuple[int, int]]:
    """Load a checkpoint into the prepared objects; returns (step, W&B run id, stream seeds)."""
    state = checkpoint.load_state(resume_from)
    try:
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as e:
        raise RankingError(f"{resume_from}: weights do not fit the configured model "
                                      f"({str(e).splitlines()[0]})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = checkpoint.load_rng(resume_from, accelerator.process_index)
    if rng is not None:
        checkpoint.set_rng_state(rng)
    run_id = state.get("wandb_run_id") or new_run_id(cfg)
    step = int(state["step"])
    stream = state.get("stream")
    data_seeds = (stream["samples_seed"], stream["batches_seed"]) if stream else stream_seeds(cfg.seed, step)
    accelerator.print(f"ranking train: resumed from {resume_from} at step {step}", file=sys.stderr)
    return step, run_id, data_seeds


def finish(accelerator: Accelerator, run_dir: Path) -> None:
    """Loss plot and W&B files first, then a barrier: when a rank exits early (exit 75), the launcher SIGTERMs the
    others, which must not cut rank 0 while it still writes."""
    if accelerator.is_main_process and (run_dir / METRICS).exists():
        from ranking import report  # matplotlib and PIL: only where a plot is drawn

        report.plot_loss(report.read_metrics_log(run_dir), run_dir / "loss.png", run_dir.name)
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.train")
