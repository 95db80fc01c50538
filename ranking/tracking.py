"""Weights & Biases: the mode policy, run ids, and logging into a training run's W&B run.

Offline without an API key: the files go to ``RUN/wandb`` and ``wandb sync`` uploads them later. ``wandb`` is
imported only where something is logged, so a stage that does not log never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranking import checkpoint

ID_FILE = "wandb_run_id"  # RUN/wandb_run_id, if present, names the run's W&B id (else the latest checkpoint does)


def default_mode() -> str:
    """``WANDB_MODE`` if set; else online with an API key, offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def apply_default_mode() -> None:
    """Make ``default_mode()`` the mode of every W&B run this process starts (Accelerate's tracker included)."""
    os.environ["WANDB_MODE"] = default_mode()


def new_run_id() -> str:
    from wandb.sdk.lib.runid import generate_id  # what wandb.init uses (wandb 0.31 dropped wandb.util.generate_id)

    return generate_id()


def run_id_of(run_dir: Path) -> str | None:
    """The W&B run id the trainer logged to: RUN/wandb_run_id, else the latest checkpoint's."""
    id_file = run_dir / ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip() or None
    return checkpoint.wandb_run_id(run_dir)


def init_trainer(accelerator: Any, project: str, config: dict, run_dir: Path, run_id: str, name: str,
                 group: str, tags: list[str]) -> None:
    """Start (or resume, by id) the training run's W&B run through Accelerate's tracker."""
    init = {"name": name, "group": group or None, "tags": tags, "id": run_id, "resume": "allow", "dir": str(run_dir)}
    accelerator.init_trackers(project, config=config, init_kwargs={"wandb": init})


def log_into_run(run_dir: Path, project: str, name: str, values: Callable[[Any], dict[str, Any]]) -> str:
    """Log ``values(wandb)`` into the run's W&B run (resumed by its id; a new run named ``name`` if it has none).

    Returns the run's URL, or its folder when offline.
    """
    import wandb

    run_id = run_id_of(run_dir)
    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), project=project, name=None if run_id else name,
                     mode=default_mode())  # type: ignore[arg-type]
    try:
        run.log(values(wandb))
        return run.url or run.dir
    finally:
        run.finish()
