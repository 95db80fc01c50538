"""The run folder's contract (DESIGN.md "Run folder"): where a run keeps its config, metrics log, checkpoints and
evaluations, and how to find them from a run folder or from a checkpoint folder.

    RUN/config.yaml                    schema: 2, the resolved TrainConfig's keys, and the derived `model:` block
    RUN/metrics.jsonl                  one JSON object per logged step
    RUN/loss.png
    RUN/checkpoints/step-0000100/      state.pt, rng-rank{r}.pt (ranking.folders.checkpoint writes them)
    RUN/checkpoints/latest -> step-0000100
    RUN/checkpoints/best -> step-0000050     the best validation so far (when the trainer validates)
    RUN/eval-0000100/                  an evaluation folder (ranking.retrieval.evalfolder places and reads them)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.core.files import LOCK, append_line, check_writable_folder, folder_lock, write_text_atomically

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"  # checkpoints/best -> the step with the best validation metric (ranking.retrieval.validation)
STATE = "state.pt"  # the file that makes a folder a checkpoint
# What a resumed run cannot change: the shapes of the weights, or what the evaluation feeds the model (it rebuilds
# the model and its input from config.yaml). Dropout, the loss, the optimiser and the data may change.
MODEL_KEYS = ("backbone", "embed_dim", "normalize", "image_size")


# ---------------------------------------------------------------------------------------------------------- config


def config_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CONFIG


# config.yaml's layout. 1 (no `schema` key): the TrainConfig's fields alone. 2: `schema`, the fields, and `model`:
# the run's ranking.learning.models.ModelSpec, derived from the fields when the run started, so that whatever rebuilds
# the model reads its identity as it was, whatever the TrainConfig of the reading version looks like.
SCHEMA = 2
SCHEMA_KEY = "schema"
# RUN/stop-request: a file that asks the trainer to checkpoint and exit 75 (slurm/common.sh writes it on USR1, so a
# stop reaches the trainers on a Slurm whose signals do not); the trainer removes a stale one when it starts
STOP_REQUEST = "stop-request"
LAUNCH_KEY = "launch"  # the job's scale (ranking.training.scale.Scale), written by the trainer
MODEL_KEY = "model"  # TrainConfig.saved_alongside names both: `ranking train --config RUN/config.yaml` skips them
# a TrainConfig field's former name -> its name now: a run's config.yaml is read under the new name, without a warning
RENAMED: dict[str, str] = {}
_warned: set[Path] = set()  # config.yaml files whose version warning this process has printed


def write_config(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    model: Mapping[str, Any] | None = None,
    launch: Mapping[str, Any] | None = None,
) -> None:
    """``RUN/config.yaml``, atomically: the schema, the config's fields, the run's model identity
    (``ModelSpec.to_dict()``; without it, readers derive it from the fields as for a schema 1 file) and the job's
    scale (``launch``: world size, global batch, the scaled lr..., ``ranking.training.scale``; readers of the
    fields skip it)."""
    saved: dict[str, Any] = {SCHEMA_KEY: SCHEMA, **dataclasses.asdict(cfg)}
    if model is not None:
        saved[MODEL_KEY] = dict(model)
    if launch is not None:
        saved[LAUNCH_KEY] = dict(launch)
    write_text_atomically(config_path(run_dir), yaml.safe_dump(saved, sort_keys=False))


@dataclass
class SavedConfig:
    """A run's config.yaml as this version reads it (``upgrade``)."""

    values: dict[str, Any]  # TrainConfig's fields the file holds, under their current names
    model: Any = None  # the `model` block (schema 2); None in a file written before it existed
    launch: Any = None  # the `launch` block (the job's scale); None in a file written before it existed
    schema: int = 1
    unknown: list[str] = field(default_factory=list)  # keys with no field now (removed, or from a newer version)
    missing: list[str] = field(default_factory=list)  # fields the file lacks (added since): they take their defaults

    def warning(self, path: Path) -> str | None:
        """The one line that names what this version reads differently from the file, or None when nothing."""
        parts = []
        if self.unknown:
            parts.append(f"ignoring {', '.join(self.unknown)} (no such setting in this version)")
        if self.missing:
            parts.append(f"{', '.join(self.missing)} not in the file (taking today's defaults)")
        if not parts:
            return None
        newer = f", schema {self.schema} is newer than this version's {SCHEMA}" if self.schema > SCHEMA else ""
        return f"warning: {path}: written by another version of deep-ranking{newer}: {'; '.join(parts)}"


def upgrade(data: Mapping[str, Any], renamed: Mapping[str, str] = RENAMED) -> SavedConfig:
    """A config.yaml's mapping read as this version's TrainConfig fields: renamed keys take their new names; keys
    with no field and fields the file lacks are listed, to be named in one warning, never refused."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    values: dict[str, Any] = {}
    saved = SavedConfig(values)
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == SCHEMA_KEY:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{SCHEMA_KEY} must be a positive integer, got {value!r}")
            saved.schema = value
        elif key == MODEL_KEY:
            saved.model = value
        elif key == LAUNCH_KEY:
            saved.launch = value
        elif renamed.get(key, key) in fields:
            values[renamed.get(key, key)] = value
        else:
            saved.unknown.append(key)
    saved.missing = [name for name in fields if name not in values]
    return saved


def read_saved(run_dir: str | os.PathLike) -> tuple[TrainConfig, Any]:
    """(the run's TrainConfig, its config.yaml's `model` block or None) from a config.yaml of any version: what this
    version does not know or the file lacks is named in one warning line (once per process), never refused; a value
    this version cannot take is a RankingError naming the file."""
    path = config_path(run_dir)
    if not path.is_file():
        raise RankingError(f"{path}: missing: the run's config is needed to rebuild its model")
    try:
        saved = upgrade(flags.load_yaml(path))
        cfg = flags.build(TrainConfig, None, saved.values)
    except ConfigError as e:
        raise RankingError(f"{path}: cannot rebuild the run's config ({str(e).removeprefix(f'{path}: ')})") from None
    warning = saved.warning(path)
    if warning and path.resolve() not in _warned:
        _warned.add(path.resolve())
        print(warning, file=sys.stderr, flush=True)
    return cfg, saved.model


def read_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The run's TrainConfig, from a config.yaml of any version (``read_saved``)."""
    return read_saved(run_dir)[0]


# ---------------------------------------------------------------------------------------------------------- metrics


def current_names(record: dict) -> dict:
    """A metrics.jsonl record with today's names: runs before the ``train/`` prefix logged ``loss``, ``lr``,
    ``lr/<group>``, ``images_per_s``, ... unprefixed (every training reading; ``val/...`` kept its name)."""
    return {
        key if key == "step" or "/" in key and not key.startswith("lr/") else f"train/{key}": value
        for key, value in record.items()
    }


def read_metrics_log(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``, one per logged step, with today's names (``current_names``)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise RankingError(f"{path}: not found (is {run_dir} a run folder written by `ranking train`?)")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if _torn_last_line(path, lines, number):
                continue
            raise RankingError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RankingError(f"{path}: line {number} has no step")
        records.append(current_names(record))
    return records


def restart_metrics_log(run_dir: str | os.PathLike, resumed_step: int) -> None:
    """Keep the logged steps up to the resumed one, so the resumed curve continues without duplicates."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if _torn_last_line(path, lines, number):
                continue
            raise RankingError(f"{path}: line {number} is not a metrics record ({getattr(e, 'msg', e)})") from None
        if step <= resumed_step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _torn_last_line(path: Path, lines: list[str], number: int) -> bool:
    """A crash during ``append_line`` leaves at most the last line torn: skipped with a warning, never an error."""
    if any(line.strip() for line in lines[number:]):
        return False
    print(f"warning: {path}: skipping the torn last line {number} (a crash while it was written)", file=sys.stderr)
    return True


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


# ---------------------------------------------------------------------------------------------------------- opening


def holds_run(run_dir: str | os.PathLike) -> list[str]:
    """What in ``run_dir`` a fresh start would overwrite: its checkpoints and its metrics log."""
    run_dir = Path(run_dir)
    found = []
    if checkpoints_dir(run_dir).is_dir() and any(checkpoints_dir(run_dir).iterdir()):
        found.append(f"{CHECKPOINTS}/")
    if (run_dir / METRICS).exists():
        found.append(METRICS)
    return found


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether ``--resume latest`` has anything to try in ``run_dir``: the checkpoint ``latest`` points at or a
    published ``step-*`` folder. A ``.tmp-step-*`` left by a crash and a dangling ``latest`` do not count."""
    root = checkpoints_dir(run_dir)
    return (root / LATEST).exists() or any(root.glob("step-*"))


def fresh_start_warning(run_dir: str | os.PathLike) -> str:
    """The one line of a ``--resume latest`` that finds no checkpoint: the run stopped before its first (a hard kill,
    a node failure, a full disk) or never started; a requeued job must be able to start it, not be refused."""
    return (
        f"{checkpoints_dir(run_dir)}: no checkpoint to resume from (the run stopped before its first); "
        "--resume latest starts the run from step 0"
    )


def check_same_model(cfg: TrainConfig, resume_from: Path) -> None:
    """A resumed run keeps the model of its checkpoint: refuse a flag that changes it (MODEL_KEYS)."""
    saved_path = config_path(run_of(resume_from))
    if not saved_path.is_file():
        return  # a checkpoint copied without its config: the weights' check in restore() still applies
    saved = read_config(run_of(resume_from))
    changed = [
        f"--{key.replace('_', '-')} {getattr(cfg, key)} (was {getattr(saved, key)})"
        for key in MODEL_KEYS
        if getattr(cfg, key) != getattr(saved, key)
    ]
    if changed:
        raise ConfigError(
            f"{saved_path}: a resumed run keeps its model and input; {', '.join(changed)} would change "
            "them: drop the flag, or start a new run (another --run-dir)"
        )


def check_run(cfg: TrainConfig) -> Path | None:
    """Read-only checks of the run folder before a run starts; returns the checkpoint to resume from, if any.

    ``--resume latest`` in a folder with no checkpoint yet returns None: the run starts from step 0 (the caller says
    so in one warning line), so that a launcher can always pass it. ``latest`` stands for the run's checkpoints here
    (``checkpoint.resumable`` picks the intact one); ``--resume PATH`` must name a checkpoint."""
    run_dir = Path(cfg.run_dir)
    check_writable_folder(run_dir, "--run-dir")
    if cfg.resume == LATEST:
        if not has_checkpoint(run_dir):
            return None
        check_same_model(cfg, checkpoints_dir(run_dir) / LATEST)
        return checkpoints_dir(run_dir) / LATEST
    if cfg.resume:
        resume_from = resume_checkpoint(run_dir, cfg.resume)
        check_same_model(cfg, resume_from)
        return resume_from
    existing = holds_run(run_dir)
    if existing and not cfg.overwrite:
        raise RankingError(
            f"{run_dir}: holds a run ({', '.join(existing)}); give --resume latest to continue it, "
            "--overwrite to move it aside and start afresh, or another --run-dir"
        )
    return None


def move_aside(run_dir: Path) -> Path | None:
    """Move everything in ``run_dir`` but its lock into a new sibling folder ``RUN.replaced-YYYYmmdd-HHMMSS``."""
    entries = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not entries:
        return None
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside


def open_run(cfg: TrainConfig, held: contextlib.ExitStack) -> tuple[Path | None, Path | None]:
    """Check the run folder, then lock it for the rest of ``held`` (``RUN/.lock``; a second training into it fails
    at once), then check again under the lock and, with --overwrite, move the old run aside.

    Returns (the checkpoint to resume from, the folder the old run was moved to). Nothing is written when a check
    fails; the folder is created only once every check has passed.
    """
    check_run(cfg)
    held.enter_context(folder_lock(cfg.run_dir, "ranking train"))
    resume_from = check_run(cfg)  # again: another process may have written the folder before the lock was ours
    aside = move_aside(Path(cfg.run_dir)) if cfg.overwrite else None
    return resume_from, aside
