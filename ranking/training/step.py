"""One optimizer step of the trainer, the whole of it in one function (``train_step``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from ranking.core.config import TrainConfig
from ranking.data.sampling import Batch
from ranking.training.metrics import Meter, triplets_in
from ranking.training.parts import TrainParts


@dataclass
class StepOutcome:
    lr: float  # the first parameter group's learning rate, the one the step ran with
    lrs: dict[str, float]  # "lr/<group name or index>" -> each group's
    diverged: torch.Tensor  # this rank's 0-d bool on the device: a loss or gradient norm of the step was not finite


def train_step(
    cfg: TrainConfig,
    accelerator: Accelerator,
    parts: TrainParts,
    batches: Iterator[Batch],
    on_device: Callable[[Batch], Batch],
    meter: Meter,
) -> StepOutcome:
    """``grad_accum`` micro-steps (the next batch, made the model's input on the device, embedded in one forward pass,
    its objective back-propagated; the gradients sync and are clipped on the last), the optimizer step, then the
    schedule's step unless fp16's scaler skipped the update. The divergence flag stays on the device: the stop
    policy's all-reduce reads it. A ``BatchStall`` from ``batches`` goes to the caller."""
    optimizer, model = parts.optimizer, parts.model
    lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
    lr = optimizer.param_groups[0]["lr"]
    diverged = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    for _ in range(cfg.grad_accum):
        waiting = time.perf_counter()
        raw = next(batches)
        meter.waited(time.perf_counter() - waiting)
        batch = on_device(raw)
        with accelerator.accumulate(model):
            out = parts.objective(model(batch.images), batch.labels, batch.triplets)
            accelerator.backward(out.objective)
            diverged |= ~torch.isfinite(out.loss.detach())
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if accelerator.scaler is None:  # fp16: an inf norm is an overflow the scaler skips
                    diverged |= ~torch.isfinite(torch.as_tensor(norm, device=accelerator.device))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        meter.add(
            out,
            triplets_in(batch) * accelerator.num_processes,
            len(batch.ids) * accelerator.num_processes,
            weight=1 / cfg.grad_accum,
        )
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
        parts.scheduler.step()
    return StepOutcome(lr, lrs, diverged)
