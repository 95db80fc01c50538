"""Weights & Biases: the mode, the training run, and the runs that evaluation and report add to its group.

Mode: ``--wandb-mode`` wins; else W&B's own rules decide (``WANDB_MODE``, ``wandb offline|online|disabled``,
``wandb login`` or ``WANDB_API_KEY``); only when none of those is configured and no credentials exist does a run
go offline, with one line saying so (its files go to ``RUN/wandb``; ``wandb sync`` uploads them later).

One training run is one W&B run: a requeued run resumes its id and its steps continue. Evaluation and report do
not reopen it from another process (an offline run resumed by several processes syncs as lossy segments, and
each segment restarts at ``_step`` 0): each logs a run of its own, ``job_type`` "eval" or "report", in the
training run's group (the run's name when it has none), named after it, with the training step it measured in
``trainer/step``. ``wandb`` is imported only where something is logged.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranking.core.config import TrainConfig
from ranking.folders import checkpoint, runfolder

ID_FILE = "wandb_run_id"  # RUN/wandb_run_id, if present, names the run's W&B id (else the latest checkpoint does)
TRAINER_STEP = "trainer/step"


def resolve_mode(requested: str = "") -> str | None:
    """The mode to start W&B in, or None to let W&B's own settings decide (see the module's docstring)."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    if _wandb_configured():
        return None
    print("W&B: no mode configured and no credentials (wandb login, WANDB_API_KEY, WANDB_MODE, --wandb-mode): "
          "logging offline; `wandb sync RUN/wandb/offline-run-*` uploads it later", file=sys.stderr)
    return "offline"


def _wandb_configured() -> bool:
    """`wandb offline|disabled` in a settings file, or an API key from `wandb login` (netrc) or the settings."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # another wandb layout: its own rules only know the environment we checked
        return False
    settings = wandb_setup.singleton().settings
    if settings.mode != "online" or settings.api_key:
        return True
    try:
        return read_netrc_auth(host=settings.base_url) is not None
    except Exception:  # a malformed netrc: W&B will say so itself when it logs in
        return True


def new_run_id() -> str:
    """A new run's id: the one a W&B sweep agent assigned (WANDB_RUN_ID), so the run counts in its sweep, else a
    fresh one."""
    from wandb.sdk.lib.runid import generate_id  # what wandb.init uses (wandb 0.31 dropped wandb.util.generate_id)

    return os.environ.get("WANDB_RUN_ID") or generate_id()


def code_version() -> str:
    """The git commit of the code that runs (with "+dirty" when it has uncommitted changes), or "" outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def log_checkpoints(run: Any, run_dir: Path) -> None:
    """The latest and best checkpoint folders of the run as W&B model artifacts (offline: kept for `wandb sync`)."""
    import wandb

    for alias in (runfolder.LATEST, runfolder.BEST):
        folder = runfolder.checkpoints_dir(run_dir) / alias
        if folder.is_dir():
            artifact = wandb.Artifact(f"{run.id}-{alias}", type="model",
                                      metadata={"step": int(folder.resolve().name.removeprefix("step-"))})
            artifact.add_dir(str(folder.resolve()))
            run.log_artifact(artifact, aliases=[alias])


def run_id_of(run_dir: Path) -> str | None:
    """The W&B run id the trainer logged to: RUN/wandb_run_id, else the latest checkpoint's."""
    id_file = run_dir / ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip() or None
    return checkpoint.wandb_run_id(run_dir)


def run_name(cfg: TrainConfig, run_dir: Path) -> str:
    return cfg.run_name or run_dir.resolve().name


def init_trainer(accelerator: Any, cfg: TrainConfig, config: dict, run_dir: Path, run_id: str,
                 mode: str | None) -> None:
    """Start (or resume, by id) the training run's W&B run through Accelerate's tracker (main process only)."""
    init: dict[str, Any] = {"name": run_name(cfg, run_dir), "group": cfg.wandb_group or None, "tags": cfg.wandb_tags,
                            "id": run_id, "resume": "allow", "dir": str(run_dir), "job_type": "train",
                            "entity": cfg.wandb_entity or None, "notes": cfg.wandb_notes or None}
    if mode is not None:
        init["mode"] = mode
    accelerator.init_trackers(cfg.wandb_project, config=config, init_kwargs={"wandb": init})


def log_job(run_dir: Path, cfg: TrainConfig, job_type: str, step: int, values: Callable[[Any], dict[str, Any]],
            config: dict | None = None, artifacts: dict[str, tuple[str, Path]] | None = None) -> str:
    """Log ``values(wandb)`` at training step ``step`` in a new run of ``job_type`` beside the training run.

    ``artifacts``: name -> (type, file or folder), logged with the run. Returns the run's URL, or its folder.
    """
    import wandb

    name = run_name(cfg, run_dir)
    init_config = {"train_run_id": run_id_of(run_dir), TRAINER_STEP: step, "train": dataclasses.asdict(cfg),
                   **(config or {})}
    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, group=cfg.wandb_group or name,
                     name=f"{name} {job_type} step {step}", job_type=job_type, tags=cfg.wandb_tags,
                     dir=str(run_dir), config=init_config, mode=resolve_mode(cfg.wandb_mode))  # type: ignore[arg-type]
    try:
        run.define_metric(TRAINER_STEP)
        run.define_metric(f"{job_type}/*", step_metric=TRAINER_STEP)
        run.log({TRAINER_STEP: step, **values(wandb)})
        for artifact_name, (kind, path) in (artifacts or {}).items():
            artifact = wandb.Artifact(artifact_name, type=kind)
            (artifact.add_dir if Path(path).is_dir() else artifact.add_file)(str(path))
            run.log_artifact(artifact)
        return run.url or run.dir
    finally:
        run.finish()
