"""The run folder's contract (DESIGN.md "Run folder"): where a run keeps its config, metrics log, checkpoints and
evaluations, and how to find them from a run folder or from a checkpoint folder.

    RUN/config.yaml                    the resolved TrainConfig
    RUN/metrics.jsonl                  one JSON object per logged step
    RUN/loss.png
    RUN/checkpoints/step-0000100/      state.pt, rng-rank{r}.pt (ranking.checkpoint writes them)
    RUN/checkpoints/latest -> step-0000100
    RUN/eval-0000100/                  an evaluation folder (ranking.evalfolder places and reads them)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ranking import config
from ranking.config import TrainConfig
from ranking.errors import ConfigError, RankingError
from ranking.files import append_line, write_text_atomically

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"  # the file that makes a folder a checkpoint


# ---------------------------------------------------------------------------------------------------------- config


def config_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CONFIG


def write_config(cfg: TrainConfig, run_dir: str | os.PathLike) -> None:
    config.save(cfg, config_path(run_dir))


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = config_path(run_dir)
    if not path.is_file():
        raise RankingError(f"{path}: missing: the run's config is needed to rebuild its model")
    try:
        return config.build(TrainConfig, path)
    except ConfigError as e:
        raise RankingError(f"{path}: cannot rebuild the run's config ({e})") from None


# ---------------------------------------------------------------------------------------------------------- metrics


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``, one per logged step."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise RankingError(f"{path}: not found (is {run_dir} a run folder written by `ranking train`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RankingError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RankingError(f"{path}: line {number} has no step")
        records.append(record)
    return records


def restart_metrics_log(run_dir: str | os.PathLike, resumed_step: int) -> None:
    """Keep the logged steps up to the resumed one, so the resumed curve continues without duplicates."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resumed_step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    append_line(Path(run_dir) / METRICS, json.dumps(record))


# ---------------------------------------------------------------------------------------------------------- checkpoints


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / step_dir_name(step)


def run_of(checkpoint: str | os.PathLike) -> Path:
    """The run folder a checkpoint folder belongs to."""
    return Path(checkpoint).parent.parent


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself or from a run folder (its ``checkpoints/latest``); symlinks resolved."""
    path = Path(path)
    if (path / STATE).is_file():
        return path.resolve()
    latest = checkpoints_dir(path) / LATEST
    if (latest / STATE).is_file():
        return latest.resolve()
    if path.is_dir() and (path.name.startswith("step-") or path.name == LATEST):
        raise RankingError(f"{path}: checkpoint folder without {STATE} (incomplete or deleted)")
    raise RankingError(f"{path}: neither a checkpoint folder with {STATE} nor a run folder with checkpoints/latest")


def resume_checkpoint(run_dir: str | os.PathLike, resume: str) -> Path:
    """The checkpoint folder of ``--resume latest`` (in ``run_dir``) or ``--resume PATH``."""
    if resume == LATEST:
        latest = checkpoints_dir(run_dir) / LATEST
        if not latest.exists():
            raise RankingError(f"{latest}: no checkpoint to resume from (drop --resume to start the run)")
        return resolve_checkpoint(latest)
    return resolve_checkpoint(resume)
