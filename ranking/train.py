"""Train the deep-ranking embedding: ``ranking train ...`` (one process) or ``accelerate launch -m ranking.train ...``.

Every rank streams its own infinite, resampled view of the train shards, so every rank takes exactly
``--steps`` optimizer steps whatever the number of shards. DataLoader workers ship uint8 batches at the stored size;
each step augments its batch on the training device (``augment.TrainAugment``: a random resized crop and flip of its
own for each image, resize, normalise) and embeds its images in one forward pass;
the paper sampler's triplets index into them, the batch sampler mines triplets on the batch gathered from all ranks
(``losses.DistributedLoss``). This module puts the run together; its parts are in ``ranking/training/`` (the
network and optimizer, one step, the stop policy, the metrics sink, the checkpoint rule) and its input in
``ranking/data/loader.py`` (the DataLoader, the wait for a batch, the device-side augmentation).

Run folder: config.yaml, metrics.jsonl, loss.png, checkpoints/ (``--resume latest`` continues the run), wandb/.
SIGUSR1, SIGTERM or SIGINT (or the launcher's death), or a file RUN/stop-request: finish the step, checkpoint,
exit 75 (EX_TEMPFAIL) so that a launcher requeues the job; a second SIGINT exits at once (130, no checkpoint). A
loss that is not finite ends the run with exit 2 and no checkpoint; so does a stream that gives no batch for
``--batch-timeout-s`` (a stop signal during such a wait exits 75 after a short grace, without one). The DataLoader
workers end with the loop, within seconds even when one is stuck (``loader.stop_workers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from ranking import cli
from ranking.core import distributed, flags
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.core.logs import setup_logging
from ranking.core.precision import resolve as resolve_precision
from ranking.data.loader import BatchStall, BatchWatchdog, DeviceAugment, train_batches
from ranking.folders import checkpoint, runfolder
from ranking.folders.shardformat import check_labels, split_counts
from ranking.learning import models
from ranking.retrieval import validation
from ranking.training.checkpointing import Checkpointer
from ranking.training.metrics import MetricsSink, start_records
from ranking.training.parts import build_parts
from ranking.training.policies import Stop, StopPolicy
from ranking.training.scale import Scale
from ranking.training.step import train_step

log = logging.getLogger("ranking.train")


def main(argv: list[str] | None = None) -> int:
    cfg = flags.parse(TrainConfig, argv, "ranking train", "train the deep-ranking embedding")
    chosen = resolve_precision(cfg.mixed_precision)
    # config.yaml and W&B record the precision that ran; $WANDB_RUN_ID in --run-dir gives each sweep run its own
    cfg = dataclasses.replace(cfg, mixed_precision=chosen.value, run_dir=expand_run_dir(cfg.run_dir))
    accelerator = Accelerator(
        mixed_precision=chosen.value,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="wandb" if cfg.wandb else None,
        kwargs_handlers=[distributed.process_group_kwargs(cfg.collective_timeout_s)],
    )
    setup_logging(accelerator.process_index)
    try:
        scale = Scale.of(cfg, accelerator.num_processes)  # the same on every rank: a bad --images stops them all
        with contextlib.ExitStack() as held:  # rank 0 holds the run folder's lock until the run ends
            resume_from = distributed.decided_by_main(lambda: check_inputs(cfg, held))
            if accelerator.is_main_process:
                log.info(scale.describe(cfg))
                log.info(chosen.describe())
            return train(cfg, accelerator, resume_from, scale)
    except RuntimeError as e:
        raise distributed.timed_out(e, cfg.collective_timeout_s) from None
    finally:
        distributed.shutdown()


def expand_run_dir(run_dir: str) -> str:
    """Environment variables in --run-dir (a W&B sweep agent's $WANDB_RUN_ID, Slurm's $SLURM_JOB_ID) and a leading
    ``~`` expanded, then checked as the config checks a literal path: a variable set to nothing used to write the run
    into the current folder, one set to ``/`` into the root of the file system, and ``~`` made a folder named ``~``."""
    expanded = os.path.expanduser(os.path.expandvars(run_dir))
    if "$" in expanded:
        raise RankingError(f"--run-dir {run_dir}: names an environment variable that is not set")
    if not expanded.strip():
        raise RankingError(f"--run-dir {run_dir}: empty once its environment variables are expanded")
    if expanded.startswith("~"):
        raise RankingError(f"--run-dir {run_dir}: {expanded.split('/')[0]} is not a user this machine knows")
    if Path(expanded).resolve() == Path(Path(expanded).resolve().anchor):
        raise RankingError(
            f"--run-dir {run_dir}: is the root of the file system ({expanded}); name a folder for the run"
        )
    return expanded


def check_inputs(cfg: TrainConfig, held: contextlib.ExitStack) -> Path | None:
    """Rank 0, before anything is written, downloaded or started: the shards, the run folder (then locked for the
    run; --overwrite moves an old run aside) and the checkpoint to resume and its config. Returns that checkpoint."""
    if split_counts(cfg.shards, ["train"])["train"] == 0:
        raise RankingError(f"{cfg.shards}: the train split is empty (a folder of unlabelled images cannot train)")
    check_labels(cfg.shards, ["train", "val"] if cfg.eval_every else ["train"])
    resume_from, aside = runfolder.open_run(cfg, held)
    stale = Path(cfg.run_dir) / runfolder.STOP_REQUEST
    if stale.exists():  # left by the job that stopped: this one was started to go on
        stale.unlink()
        log.info(f"removed the stop request {stale} of the run's previous job")
    if aside is not None:
        log.info(f"--overwrite: moved the previous run of {cfg.run_dir} to {aside}")
    if resume_from is not None:  # verified against its sha256 manifest; `latest` falls back to the newest intact one
        resume_from, skipped = checkpoint.resumable(cfg.run_dir, cfg.resume)
        for reason in skipped:
            log.warning(reason)
    elif cfg.resume:
        log.warning(runfolder.fresh_start_warning(cfg.run_dir))
    return resume_from


def train(recipe: TrainConfig, accelerator: Accelerator, resume_from: Path | None, scale: Scale) -> int:
    """The run itself, once check_inputs has passed: set-up, then per step: step, log, validate, checkpoint.
    config.yaml is written only after a resume has succeeded; it and the W&B config hold the recipe as given and
    the job's scale beside it; the run trains with the recipe at that scale (steps, warm-up, lr)."""
    cfg = scale.applied(recipe)
    parts = build_parts(cfg, accelerator)
    validator = validation.Validator(cfg, accelerator, Path(cfg.run_dir)) if cfg.eval_every else None
    checkpoints = Checkpointer(cfg, accelerator, parts, validator)
    step = checkpoints.resume(resume_from)  # and the W&B run id and stream seeds it continues with
    if accelerator.is_main_process:
        runfolder.write_config(recipe, cfg.run_dir, models.ModelSpec.of(cfg).to_dict(), launch=scale.to_dict())
    start_records(recipe, accelerator, step, checkpoints.run_id, scale)
    batches = train_batches(cfg, checkpoints.data_seeds, pin_memory=accelerator.device.type == "cuda")
    on_device = DeviceAugment(cfg, checkpoints.data_seeds, accelerator.process_index, accelerator.device)
    sink = MetricsSink(cfg, accelerator, step)
    stop: Stop | None = None
    models.set_train_mode(parts.model, cfg.freeze_bn_stats)
    # the workers end with the loop whichever way it ends: a worker stuck in a hung file system held the node
    with (
        distributed.StopRequest() as signals,
        contextlib.closing(BatchWatchdog(batches, cfg.batch_timeout_s, signals)) as fetch,
    ):
        policy = StopPolicy(cfg, signals, accelerator.device)
        while stop is None:
            try:
                done = train_step(cfg, accelerator, parts, fetch, on_device, sink.meter)
            except BatchStall as stall:
                sink.close()
                return policy.stalled(step, stall)
            step += 1
            sink.advance(step)

            stop = policy.reason(step, done.diverged)  # before anything is logged or saved
            if stop is Stop.DIVERGED:
                sink.close()
                raise policy.diverged(step)
            if sink.due(step):
                sink.log_step(step, done.lr, done.lrs)

            best = False
            if validator is not None and validator.due(step):
                validated = validator.run(parts.net, step)  # a collective, in eval mode
                models.set_train_mode(parts.model, cfg.freeze_bn_stats)
                policy.exclude(validated.seconds)
                sink.log_validation(step, validated)
                best = validator.improved(validated)

            if checkpoints.due(step, stop, best):
                checkpoints.save(step, best)
                if best and stop is not Stop.SIGNAL:  # --wandb-artifacts: each new best's weights as the model artifact
                    sink.log_model(step, parts.net, best=True)
    sink.close()
    if stop is not Stop.DONE:
        accelerator.print(policy.explain(stop, step, checkpoints.last), file=sys.stderr)
    # the last checkpoint's weights too, unless a stop signal asks for a quick exit (the requeued run logs them)
    sink.finish(last=(step, parts.net) if stop is not Stop.SIGNAL else None)  # ends with a barrier
    accelerator.end_training()  # destroys the process group
    return stop.exit_code


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.train")
