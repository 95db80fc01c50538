"""Train the deep-ranking embedding: ``ranking train ...`` (one process) or ``accelerate launch -m ranking.train ...``.

Every rank streams its own infinite, resampled view of the train shards, so every rank takes exactly
``--steps`` optimizer steps whatever the number of shards. DataLoader workers ship uint8 batches at the stored size;
each step augments its batch on the training device (``augment.TrainAugment``: a random resized crop and flip of its
own for each image, resize, normalise) and embeds its images in one forward pass;
the paper sampler's triplets index into them, the batch sampler mines triplets on the batch gathered from all ranks
(``losses.DistributedLoss``).

Run folder: config.yaml, metrics.jsonl, loss.png, checkpoints/ (``--resume latest`` continues the run), wandb/.
SIGUSR1 or SIGTERM (or the launcher's death): finish the step, checkpoint, exit 75 (EX_TEMPFAIL) so that a launcher
requeues the job. A loss that is not finite ends the run with exit 2 and no checkpoint; so does a stream that gives
no batch for ``--batch-timeout-s`` (a stop signal during such a wait exits 75 after a short grace, without one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import sys
import time
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ranking import cli
from ranking.core import config, distributed
from ranking.core.config import TrainConfig
from ranking.core.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REQUEUE, RankingError
from ranking.core.logs import Progress, setup_logging
from ranking.core.precision import resolve as resolve_precision
from ranking.data import sampling
from ranking.data.loader import BatchStall, BatchWatchdog, DeviceAugment, stream_seeds, train_batches
from ranking.data.sampling import Batch
from ranking.folders import checkpoint, runfolder
from ranking.folders.checkpoint import TrainState
from ranking.folders.shardformat import manifest_digest, split_counts
from ranking.learning import losses, models, optim
from ranking.learning.losses import StepLoss
from ranking.reporting import tracking
from ranking.retrieval import validation

log = logging.getLogger("ranking.train")

# ------------------------------------------------------------------------------------------------------------ data


def triplets_in(batch: Batch) -> int:
    """Triplets a batch trains on; a mined batch counts one per anchor image (exact for batch-hard mining)."""
    return len(batch.triplets) if batch.triplets is not None else len(batch.ids)


# ------------------------------------------------------------------------------------------------ logs and stops


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
        read = {"loss": loss, "active_fraction": active_fraction, "triplets_per_s": self.triplets / seconds,
                "images_per_s": self.images / seconds, "step_s": seconds / self.steps,
                "data_wait_s": self.waiting / self.steps}
        self.sums.zero_()
        self.steps, self.triplets, self.images, self.waiting = 0.0, 0, 0, 0.0
        self.started = time.perf_counter()
        return read


class Stop(enum.Enum):
    DONE = "done"
    TIME_LIMIT = "time limit"
    SIGNAL = "signal"
    DIVERGED = "diverged"  # a loss or gradient norm that is not finite, on any rank: no checkpoint, exit 2

    @property
    def exit_code(self) -> int:
        """A run stopped by a signal has more to do: exit 75 so that its launcher requeues it."""
        return EXIT_REQUEUE if self is Stop.SIGNAL else EXIT_BAD_INPUT if self is Stop.DIVERGED else EXIT_OK


class StopPolicy:
    """Why the loop stops after a step, the same answer on every rank (a collective: all ranks ask every step)."""

    def __init__(self, cfg: TrainConfig, signals: distributed.StopRequest, device: torch.device) -> None:
        self.steps, self.minutes = cfg.steps, cfg.time_limit_minutes
        self.signals, self.device = signals, device
        self.deadline = time.monotonic() + 60 * cfg.time_limit_minutes

    def exclude(self, seconds: float) -> None:
        """The time limit counts training time: validation does not use it up."""
        self.deadline += seconds

    def reason(self, step: int, diverged: torch.Tensor) -> Stop | None:
        """``diverged``: this rank's flag (a 0-d bool tensor on the device) that a loss or gradient norm of the step
        was not finite. The three flags travel in one all-reduce, the collective this loop always made."""
        local = torch.tensor([self.signals.requested, self.minutes > 0 and time.monotonic() > self.deadline],
                             device=self.device)
        signalled, out_of_time, not_finite = distributed.any_rank_of(torch.cat([local, diverged.view(1)]))
        if not_finite:
            return Stop.DIVERGED
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
    chosen = resolve_precision(cfg.mixed_precision)
    # config.yaml and W&B record the precision that ran; $WANDB_RUN_ID in --run-dir gives each sweep run its own
    cfg = dataclasses.replace(cfg, mixed_precision=chosen.value, run_dir=expand_run_dir(cfg.run_dir))
    accelerator = Accelerator(mixed_precision=chosen.value, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="wandb" if cfg.wandb else None,
                              kwargs_handlers=[distributed.process_group_kwargs(cfg.collective_timeout_s)])
    setup_logging(accelerator.process_index)
    try:
        with contextlib.ExitStack() as held:  # rank 0 holds the run folder's lock until the run ends
            resume_from = distributed.decided_by_main(lambda: check_inputs(cfg, held))
            if accelerator.is_main_process:
                log.info(chosen.describe())
            return train(cfg, accelerator, resume_from)
    except RuntimeError as e:
        raise distributed.timed_out(e, cfg.collective_timeout_s) from None
    finally:
        distributed.shutdown()


def expand_run_dir(run_dir: str) -> str:
    """Environment variables in --run-dir (a W&B sweep agent's $WANDB_RUN_ID, Slurm's $SLURM_JOB_ID) expanded."""
    expanded = os.path.expandvars(run_dir)
    if "$" in expanded:
        raise RankingError(f"--run-dir {run_dir}: names an environment variable that is not set")
    return expanded


def check_inputs(cfg: TrainConfig, held: contextlib.ExitStack) -> Path | None:
    """Rank 0, before anything is written, downloaded or started: the shards, the run folder (then locked for the
    run; --overwrite moves an old run aside) and the checkpoint to resume and its config. Returns that checkpoint."""
    if split_counts(cfg.shards, ["train"])["train"] == 0:
        raise RankingError(f"{cfg.shards}: the train split is empty (a folder of unlabelled images cannot train)")
    resume_from, aside = runfolder.open_run(cfg, held)
    if aside is not None:
        log.info(f"--overwrite: moved the previous run of {cfg.run_dir} to {aside}")
    if resume_from is not None:  # verified against its sha256 manifest; `latest` falls back to the newest intact one
        resume_from, skipped = checkpoint.resumable(cfg.run_dir, cfg.resume)
        for reason in skipped:
            log.warning(reason)
    return resume_from


def train(cfg: TrainConfig, accelerator: Accelerator, resume_from: Path | None) -> int:
    """The run itself, once check_inputs has passed; config.yaml is written only after a resume has succeeded."""
    run_dir = Path(cfg.run_dir)
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

    validator = validation.Validator(cfg, accelerator, run_dir) if cfg.eval_every else None
    step, run_id, data_seeds = 0, tracking.new_run_id() if cfg.wandb else "", stream_seeds(cfg.seed, 0)
    if resume_from is not None:
        restored = restore(resume_from, accelerator, net, optimizer, scheduler)
        step, run_id = restored.step, restored.wandb_run_id or (tracking.new_run_id() if cfg.wandb else "")
        data_seeds = restored.stream_seeds or stream_seeds(cfg.seed, step)
        if validator is not None:
            validator.best = restored.best_validation
    if accelerator.is_main_process:
        runfolder.write_config(cfg, run_dir)
        runfolder.restart_metrics_log(run_dir, step)
    if cfg.wandb:
        mode = tracking.resolve_mode(cfg.wandb_mode) if accelerator.is_main_process else None
        tracking.init_trainer(accelerator, cfg, logged_config(cfg, accelerator), run_dir, run_id, mode)

    def save_checkpoint(best: bool) -> Path:
        state = TrainState(step=step, model=net.state_dict(), optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(),
                           scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                           wandb_run_id=run_id, stream_seeds=stream_seeds(cfg.seed, step),
                           best_validation=validator.best if validator is not None else None)
        return checkpoint.save(run_dir, state, cfg.keep_checkpoints, best=best)

    batches = train_batches(cfg, data_seeds, pin_memory=accelerator.device.type == "cuda")
    on_device = DeviceAugment(cfg, data_seeds, accelerator.process_index, accelerator.device)
    progress = Progress(log, cfg.steps, step, shown=accelerator.is_main_process, bar=cfg.progress)
    meter = Meter(accelerator.device)
    stop: Stop | None = None
    saved = runfolder.checkpoints_dir(run_dir)
    models.set_train_mode(model, cfg.freeze_bn_stats)
    with distributed.StopRequest() as signals:
        policy = StopPolicy(cfg, signals, accelerator.device)
        fetch = BatchWatchdog(batches, cfg.batch_timeout_s, signals)
        while True:
            lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
            lr = optimizer.param_groups[0]["lr"]
            diverged = torch.zeros((), dtype=torch.bool, device=accelerator.device)
            for _ in range(cfg.grad_accum):
                waiting = time.perf_counter()
                try:
                    raw = next(fetch)
                except BatchStall as stall:
                    return stalled(cfg, step, stall, signals, progress)
                meter.waited(time.perf_counter() - waiting)
                batch = on_device(raw)
                with accelerator.accumulate(model):
                    out = objective(model(batch.images), batch.labels, batch.triplets)
                    accelerator.backward(out.objective)
                    diverged |= ~torch.isfinite(out.loss.detach())
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        if accelerator.scaler is None:  # fp16: an inf norm is an overflow the scaler skips
                            diverged |= ~torch.isfinite(torch.as_tensor(norm, device=accelerator.device))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                meter.add(out, triplets_in(batch) * accelerator.num_processes,
                          len(batch.ids) * accelerator.num_processes, weight=1 / cfg.grad_accum)
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
                scheduler.step()
            step += 1
            progress.update(step)

            stop = policy.reason(step, diverged)  # before anything is logged or saved
            if stop is Stop.DIVERGED:
                progress.close()
                raise RankingError(f"{run_dir}: the loss or gradient norm is not finite at step {step} (diverged: "
                                   "lower --lr, check --margin and the data); no checkpoint written, the last is "
                                   f"{latest_checkpoint(run_dir)}").everywhere()  # every rank saw the same flag
            if step % cfg.log_every == 0 or step == cfg.steps:
                measured = meter.read(accelerator)
                record = {"step": step, **measured, "lr": lr, **(lrs if len(lrs) > 1 else {})}
                if accelerator.is_main_process:
                    runfolder.append_metrics(run_dir, record)
                progress.log(step, measured["loss"], measured["active_fraction"], lr, measured["images_per_s"])
                log_to_trackers(accelerator, {k: v for k, v in record.items() if k != "step"}, step)

            best = False
            if validator is not None and validator.due(step):
                validated = validator.run(net, step)  # a collective, in eval mode
                models.set_train_mode(model, cfg.freeze_bn_stats)
                meter.exclude(validated.seconds)
                policy.exclude(validated.seconds)
                best = validator.improved(validated)
                if accelerator.is_main_process:
                    runfolder.append_metrics(run_dir, {"step": step, **validated.record()})
                log_to_trackers(accelerator, validated.record(), step)

            if stop is not None or step % cfg.checkpoint_every == 0 or best:
                saved = save_checkpoint(best)
            if stop is not None:
                break
    progress.close()
    assert stop is not None
    if stop is not Stop.DONE:
        accelerator.print(policy.explain(stop, step, saved), file=sys.stderr)
    finish(accelerator, run_dir, artifacts=cfg.wandb and cfg.wandb_artifacts)
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


def logged_config(cfg: TrainConfig, accelerator: Accelerator) -> dict:
    """The run's config as W&B shows it: the TrainConfig and what it does not say (world size, global batch,
    the code's commit, the shards' manifest digest), so runs can be compared and filtered by them."""
    per_rank = sampling.images_per_batch(cfg)
    return {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes,
            "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
            "images_per_step_per_rank": per_rank * cfg.grad_accum,
            "global_batch": per_rank * cfg.grad_accum * accelerator.num_processes,
            "git_commit": tracking.code_version(), "shards_manifest_sha256": manifest_digest(cfg.shards)}


def log_to_trackers(accelerator: Accelerator, values: dict, step: int) -> None:
    """W&B's service process gets a job's stop signal too (Slurm signals every process): its death must not crash
    the rank before it checkpoints. Warn once and go on without it; metrics.jsonl has every record."""
    try:
        accelerator.log(values, step=step)
    except Exception as e:  # noqa: BLE001 - whatever the tracker raised, training goes on
        accelerator.trackers.clear()
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        accelerator.print(f"ranking train: warning: W&B logging stopped at step {step} ({reason}); metrics.jsonl "
                          "goes on", file=sys.stderr)


def latest_checkpoint(run_dir: Path) -> str:
    latest = runfolder.checkpoints_dir(run_dir) / runfolder.LATEST
    return str(latest.resolve()) if latest.exists() else "none"


def stalled(cfg: TrainConfig, step: int, stall: BatchStall, signals: distributed.StopRequest,
            progress: Progress) -> int:
    """No batch came: after a stop signal, exit 75 at once (no collective: the other ranks may be mid-step, and a
    checkpoint would need them); otherwise a one-line error naming the shards and the likely causes."""
    progress.close()
    where = f"at step {step}/{cfg.steps} after waiting {stall.waited_s:.0f} s for a batch"
    if signals.requested:
        assert signals.signal is not None
        print(f"ranking train: stopped {where} ({signals.signal.name}); no new checkpoint, the last is "
              f"{latest_checkpoint(Path(cfg.run_dir))}; exit {EXIT_REQUEUE} to be requeued", file=sys.stderr)
        return EXIT_REQUEUE
    raise RankingError(f"{cfg.shards}: no batch for {cfg.batch_timeout_s:g} s (--batch-timeout-s) at step {step}: "
                       f"the train stream stalled (a hung file system?) or the {cfg.sampler} sampler cannot form a "
                       "batch from these shards")




def restore(resume_from: Path, accelerator: Accelerator, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
    """Load a checkpoint into the prepared objects and this rank's RNGs; returns what it held."""
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
    if accelerator.is_main_process:
        log.info(f"resumed from {resume_from} at step {state.step}")
    return state


def finish(accelerator: Accelerator, run_dir: Path, artifacts: bool = False) -> None:
    """Loss plot and W&B files first, then a barrier: when a rank exits early (exit 75), the launcher SIGTERMs the
    others, which must not cut rank 0 while it still writes. ``artifacts``: the latest and best checkpoints go to
    the W&B run as artifacts."""
    if accelerator.is_main_process and (run_dir / runfolder.METRICS).exists():
        from ranking.reporting import plots  # matplotlib: only where a plot is drawn

        plots.plot_loss(runfolder.read_metrics_log(run_dir), run_dir / runfolder.LOSS_PLOT, run_dir.name)
    if artifacts and accelerator.is_main_process:
        tracking.log_checkpoints(accelerator.get_tracker("wandb", unwrap=True), run_dir)
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.train")
