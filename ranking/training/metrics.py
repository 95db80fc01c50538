"""What the trainer measures and where its records go: ``Meter`` sums a logging interval, ``MetricsSink`` is the one
place a record is written (metrics.jsonl on rank 0, the progress bar or log lines, W&B through ``log_to_trackers``).

Names, the same in metrics.jsonl and W&B: ``train/loss``, ``train/active_fraction``, ``train/lr`` (and
``train/lr/<group>``), ``train/triplets_per_s``, ``train/images_per_s``, ``train/step_s``, ``train/data_wait_s``;
the validation's ``val/...`` (``ranking.retrieval.validation``). W&B also gets ``trainer/step``, their x-axis.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ranking.core.config import TrainConfig
from ranking.core.logs import Progress
from ranking.data import sampling
from ranking.data.sampling import Batch
from ranking.folders import runfolder
from ranking.folders.shardformat import manifest_digest
from ranking.learning import models
from ranking.learning.losses import StepLoss
from ranking.reporting import tracking
from ranking.retrieval.validation import Validation
from ranking.training.scale import LAUNCH_KEY, Scale

log = logging.getLogger("ranking.train")  # the stage's name on every line: users and tests grep `ranking.train:`


def triplets_in(batch: Batch) -> int:
    """Triplets a batch trains on; a mined batch counts one per anchor image (exact for batch-hard mining)."""
    return len(batch.triplets) if batch.triplets is not None else len(batch.ids)


class Meter:
    """What one logging interval measured; loss sums stay on the device (no sync per step).

    Time spent validating is not training time: ``exclude`` takes it out of the rates. The time spent waiting for
    the next batch (``waited``) shows an input-bound run: step_s is a step's whole time, data_wait_s its wait.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)
        self.steps, self.triplets, self.images, self.waiting = 0.0, 0, 0, 0.0
        self.started = time.perf_counter()

    def add(self, out: StepLoss, triplets: int, images: int, weight: float) -> None:
        self.sums += weight * torch.stack([out.loss, out.active_fraction])
        self.steps += weight
        self.triplets += triplets
        self.images += images

    def waited(self, seconds: float) -> None:
        self.waiting += seconds

    def exclude(self, seconds: float) -> None:
        self.started += seconds

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Loss and active fraction averaged over steps and ranks, triplets/s and images/s (all ranks), step and
        data-wait seconds (this rank's); a collective; starts anew."""
        loss, active_fraction = (accelerator.reduce(self.sums, reduction="mean") / self.steps).tolist()
        seconds = time.perf_counter() - self.started
        read = {
            "loss": loss,
            "active_fraction": active_fraction,
            "triplets_per_s": self.triplets / seconds,
            "images_per_s": self.images / seconds,
            "step_s": seconds / self.steps,
            "data_wait_s": self.waiting / self.steps,
        }
        self.sums.zero_()
        self.steps, self.triplets, self.images, self.waiting = 0.0, 0, 0, 0.0
        self.started = time.perf_counter()
        return read


def logged_config(cfg: TrainConfig, accelerator: Accelerator, scale: Scale | None = None) -> dict:
    """The run's config as W&B shows it: the TrainConfig as given, the job's scale (the ``launch`` block of
    config.yaml: world size, global batch, the scaled lr, ...) and what neither says (the code's commit, the shards'
    manifest digest), so runs can be compared and filtered by them."""
    scale = scale or Scale.of(cfg, accelerator.num_processes)
    return {
        **dataclasses.asdict(cfg),
        LAUNCH_KEY: scale.to_dict(),
        "world_size": scale.world_size,
        "processes_per_node": scale.processes_per_node,
        "images_per_step_per_rank": sampling.images_per_batch(cfg) * cfg.grad_accum,
        "global_batch": scale.global_batch,
        "git_commit": tracking.code_version(),
        "shards_manifest_sha256": manifest_digest(cfg.shards),
    }


def start_records(
    cfg: TrainConfig, accelerator: Accelerator, step: int, run_id: str, scale: Scale | None = None
) -> None:
    """Before the first step: metrics.jsonl cut back to the step the run starts at (a resumed curve continues without
    duplicates) and the W&B run started, or resumed by ``run_id``."""
    if accelerator.is_main_process:
        runfolder.restart_metrics_log(cfg.run_dir, step)
    if cfg.wandb:
        mode = tracking.resolve_mode(cfg.wandb_mode) if accelerator.is_main_process else None
        tracking.init_trainer(accelerator, cfg, logged_config(cfg, accelerator, scale), Path(cfg.run_dir), run_id, mode)


def log_to_trackers(
    accelerator: Accelerator, values: dict, step: int, then: Callable[[], object] | None = None
) -> None:
    """``values`` to the trackers at ``step``, then ``then()`` (more W&B calls: a summary, an artifact).

    W&B's service process gets a job's stop signal too (Slurm signals every process): its death must not crash
    the rank before it checkpoints. Warn once and go on without it; metrics.jsonl has every record."""
    try:
        if values:
            accelerator.log(values, step=step)
        if then is not None:
            then()
    except Exception as e:  # noqa: BLE001 - whatever the tracker raised, training goes on
        accelerator.trackers.clear()
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        accelerator.print(
            f"ranking train: warning: W&B logging stopped at step {step} ({reason}); metrics.jsonl goes on",
            file=sys.stderr,
        )


class MetricsSink:
    """The one place the trainer's records go, from the step it starts at: the meter's reading every ``log_every``
    steps and at the last, and each validation, to metrics.jsonl (rank 0), the progress display and W&B.
    Created right before the first step: the ETA and the first interval's rates count from here."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, step: int) -> None:
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, Path(cfg.run_dir)
        self.progress = Progress(log, cfg.steps, step, shown=accelerator.is_main_process, bar=cfg.progress)
        self.meter = Meter(accelerator.device)
        self.at_step: dict = {"step": step}  # what metrics.jsonl holds for the newest step: a checkpoint's metrics
        self.model_logged_at: int | None = None  # the step of the model artifact's newest version
        self.best: tracking.BestSummary | None = None
        if cfg.wandb and accelerator.is_main_process:  # a resumed run's earlier validations still count
            earlier = runfolder.read_metrics_log(self.run_dir) if (self.run_dir / runfolder.METRICS).exists() else []
            self.best = tracking.BestSummary(tracking.best_keys(), earlier)

    def advance(self, step: int) -> None:
        self.progress.update(step)

    def due(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def log_step(self, step: int, lr: float, lrs: dict[str, float]) -> None:
        """The interval's loss, rates and the learning rate the step ran with (``lrs``: each parameter group's, kept
        when the groups learn at different rates); a collective (the meter's reduction)."""
        measured = self.meter.read(self.accelerator)
        record = {
            "step": step,
            **{
                tracking.TRAIN_PREFIX + key: value
                for key, value in {**measured, "lr": lr, **(lrs if len(lrs) > 1 else {})}.items()
            },
        }
        self._write(record)
        self.progress.log(step, measured["loss"], measured["active_fraction"], lr, measured["images_per_s"])
        self._log(record)

    def log_validation(self, step: int, validated: Validation) -> None:
        """A validation's metrics; its time is not training time, so the meter's rates leave it out."""
        self.meter.exclude(validated.seconds)
        record = {"step": step, **validated.record()}
        self._write(record)
        run, best = self._wandb_run(), self.best
        self._log(record, then=None if run is None or best is None else lambda: best.update(run, record))

    def _write(self, record: dict) -> None:
        self.at_step = {**self.at_step, **record} if record["step"] == self.at_step["step"] else record
        if self.accelerator.is_main_process:
            runfolder.append_metrics(self.run_dir, record)

    def _log(self, record: dict, then: Callable[[], object] | None = None) -> None:
        step = record["step"]
        log_to_trackers(
            self.accelerator,
            {tracking.TRAINER_STEP: step, **{k: v for k, v in record.items() if k != "step"}},
            step,
            then,
        )

    def _wandb_run(self) -> Any:
        """The W&B run, on the main process while W&B logs (None once a dead service stopped it)."""
        if not self.accelerator.is_main_process or not any(t.name == "wandb" for t in self.accelerator.trackers):
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def log_model(self, step: int, net: torch.nn.Module, best: bool) -> None:
        """The weights of the checkpoint just saved at ``step`` as the run's model artifact (``--wandb-artifacts``;
        main process): aliases ``latest``, and ``best`` when it is the best validation so far."""
        run = self._wandb_run()
        if run is None or not self.cfg.wandb_artifacts:
            return
        metrics = {k: v for k, v in self.at_step.items() if k != "step"} if self.at_step["step"] == step else {}
        aliases = [runfolder.LATEST, runfolder.BEST] if best else [runfolder.LATEST]
        spec = models.ModelSpec.of(self.cfg).to_dict()
        log_to_trackers(
            self.accelerator,
            {},
            step,
            then=lambda: tracking.log_model(run, self.run_dir, net, step, spec, metrics, aliases),
        )
        self.model_logged_at = step

    def close(self) -> None:
        """The progress bar ends (before any line about why the run stopped)."""
        self.progress.close()

    def finish(self, last: tuple[int, torch.nn.Module] | None = None) -> None:
        """Loss plot and W&B files first, then a barrier: when a rank exits early (exit 75), the launcher SIGTERMs the
        others, which must not cut rank 0 while it still writes. ``last``: the step and model of the run's last
        checkpoint, logged as the model artifact's ``latest`` unless that step is logged already."""
        accelerator = self.accelerator
        if accelerator.is_main_process and (self.run_dir / runfolder.METRICS).exists():
            from ranking.reporting import plots  # matplotlib: only where a plot is drawn

            plots.plot_loss(
                runfolder.read_metrics_log(self.run_dir), self.run_dir / runfolder.LOSS_PLOT, self.run_dir.name
            )
        if last is not None and last[0] != self.model_logged_at:
            self.log_model(*last, best=False)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
        accelerator.wait_for_everyone()
