"""What a recipe becomes at the job's size: the global batch, the steps of an image budget, the warm-up in images and
the learning rate scaled with the global batch (``lr_scaling`` against ``reference_batch``).

The rule, for a global batch G = images per step per process x grad_accum x processes:
  steps   = images // G when ``images`` is set, else ``steps``
  warm-up = ceil(warmup_images / G) steps when ``warmup_images`` is set, else ``warmup_steps``
  lr      = lr x sqrt(G / R) (``sqrt``), lr x G / R (``linear``) or lr (``none``), R = ``reference_batch``, or one
            process's batch when it is 0, so that a recipe's maths at one process never moves.
The run's config.yaml keeps the recipe as given (it reads back the same at any size) and records this in its
``launch`` block; the W&B config holds the same block.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError
from ranking.data.sampling import images_per_batch
from ranking.folders.runfolder import LAUNCH_KEY

__all__ = ["LAUNCH_KEY", "Scale"]  # LAUNCH_KEY: config.yaml's block (TrainConfig.saved_alongside), and W&B's


@dataclass(frozen=True)
class Scale:
    world_size: int  # processes in the job
    processes_per_node: int
    global_batch: int  # images per optimizer step, all processes
    reference_batch: int  # the batch `lr` is stated for
    lr: float  # the scaled learning rate the run trains with
    steps: int
    warmup_steps: int
    precision: str  # the mixed precision that ran

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int, processes_per_node: int | None = None) -> Scale:
        per_process = images_per_batch(cfg) * cfg.grad_accum
        batch = per_process * world_size
        reference = cfg.reference_batch or per_process
        factor = {"sqrt": math.sqrt(batch / reference), "linear": batch / reference, "none": 1.0}[cfg.lr_scaling]
        steps = cfg.steps
        if cfg.images:
            steps = cfg.images // batch
            if steps < 1:
                raise ConfigError(
                    f"--images {cfg.images} is less than one step of the global batch {batch} "
                    f"({per_process} images x {world_size} processes)"
                )
        warmup = math.ceil(cfg.warmup_images / batch) if cfg.warmup_images else cfg.warmup_steps
        local = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return cls(world_size, local, batch, reference, cfg.lr * factor, steps, warmup, str(cfg.mixed_precision))

    def applied(self, cfg: TrainConfig) -> TrainConfig:
        """The config the run trains with: steps, warm-up and lr at this size."""
        return dataclasses.replace(cfg, steps=self.steps, warmup_steps=self.warmup_steps, lr=self.lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self, cfg: TrainConfig) -> str:
        """One line: the job's size and what the recipe became at it."""
        budget = f" ({cfg.images:,} images)" if cfg.images else ""
        scaling = (
            "" if self.lr == cfg.lr else f" ({cfg.lr:g} x {cfg.lr_scaling}({self.global_batch}/{self.reference_batch}))"
        )
        return (
            f"world size {self.world_size} ({self.processes_per_node} per node), global batch "
            f"{self.global_batch}, {self.steps:,} steps{budget}, lr {self.lr:.6g}{scaling}, warm-up "
            f"{self.warmup_steps} steps, precision {self.precision}"
        )
