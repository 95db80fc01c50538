"""The run's checkpoints as the loop sees them: what a resume restores, when a step is saved and what is saved.

``ranking.folders.checkpoint`` owns the files (``TrainState``, atomic folders, ``latest``/``best``, pruning); this
module decides from the live objects: a checkpoint every ``checkpoint_every`` steps, on a new best validation and at
every stop the loop reaches (a diverged run raises before it gets here, so its good checkpoints stay).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.data.loader import stream_seeds
from ranking.folders import checkpoint, runfolder
from ranking.folders.checkpoint import TrainState
from ranking.reporting import tracking
from ranking.retrieval.validation import Validator
from ranking.training.parts import TrainParts

if TYPE_CHECKING:
    from ranking.training.policies import Stop

log = logging.getLogger("ranking.train")  # the stage's name on every line: users and tests grep `ranking.train:`


def latest_checkpoint(run_dir: Path) -> str:
    """The checkpoint ``latest`` points at, for a line that says what a stopped run left; "none" before the first."""
    latest = runfolder.checkpoints_dir(run_dir) / runfolder.LATEST
    return str(latest.resolve()) if latest.exists() else "none"


class Checkpointer:
    """Resumes a run and saves its steps; holds what a checkpoint carries besides the parts: the W&B run id and the
    seeds of the stream this segment reads (those of the step it started or resumed at)."""

    def __init__(
        self, cfg: TrainConfig, accelerator: Accelerator, parts: TrainParts, validator: Validator | None
    ) -> None:
        self.cfg, self.accelerator, self.parts, self.validator = cfg, accelerator, parts, validator
        self.run_dir = Path(cfg.run_dir)
        self.run_id = tracking.new_run_id() if cfg.wandb else ""
        self.data_seeds = stream_seeds(cfg.seed, 0)
        self.last = runfolder.checkpoints_dir(self.run_dir)  # the newest checkpoint this segment saved

    def resume(self, resume_from: Path | None) -> int:
        """The step the run starts at: 0, or that of ``resume_from``, loaded into the parts, this rank's RNGs, the
        validator's best value, the W&B run id and the stream seeds."""
        if resume_from is None:
            return 0
        restored = restore(resume_from, self.accelerator, self.parts)
        self.run_id = restored.wandb_run_id or (tracking.new_run_id() if self.cfg.wandb else "")
        self.data_seeds = restored.stream_seeds or stream_seeds(self.cfg.seed, restored.step)
        if self.validator is not None:
            self.validator.best = restored.best_validation
        return restored.step

    def due(self, step: int, stop: Stop | None, best: bool) -> bool:
        return stop is not None or step % self.cfg.checkpoint_every == 0 or best

    def save(self, step: int, best: bool) -> Path:
        """The checkpoint of ``step`` (``best``: also ``checkpoints/best``); a collective."""
        parts, scaler = self.parts, self.accelerator.scaler
        state = TrainState(
            step=step,
            model=parts.net.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else {},
            objective=parts.objective.state_dict(),
            wandb_run_id=self.run_id,
            stream_seeds=stream_seeds(self.cfg.seed, step),
            best_validation=self.validator.best if self.validator is not None else None,
        )
        self.last = checkpoint.save(self.run_dir, state, self.cfg.keep_checkpoints, best=best)
        return self.last


def restore(resume_from: Path, accelerator: Accelerator, parts: TrainParts) -> TrainState:
    """Load a checkpoint into the prepared objects and this rank's RNGs; returns what it held."""
    state = checkpoint.load_state(resume_from)
    for module, weights, what in (
        (parts.net, state.model, "weights do not fit the configured model"),
        (parts.objective, state.objective, "the loss's parameters do not fit the configured loss"),
    ):
        try:
            module.load_state_dict(weights)
        except RuntimeError as e:
            raise RankingError(f"{resume_from}: {what} ({str(e).splitlines()[0]})") from None
    parts.optimizer.load_state_dict(state.optimizer)
    parts.scheduler.load_state_dict(state.scheduler)
    if accelerator.scaler is not None and state.scaler:
        accelerator.scaler.load_state_dict(state.scaler)
    rng = checkpoint.load_rng(resume_from, accelerator.process_index)
    if rng is not None:
        checkpoint.set_rng_state(rng)
    if accelerator.is_main_process:
        log.info(f"resumed from {resume_from} at step {state.step}")
    return state
