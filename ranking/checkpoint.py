"""Checkpoints of a run (DESIGN.md "Checkpoints"), written atomically by all ranks, and the model they hold.

    RUN/checkpoints/step-0000100/state.pt        model (unwrapped state_dict), optimizer, scheduler, scaler, step,
                                                 wandb run id, stream state: written by rank 0
    RUN/checkpoints/step-0000100/rng-rank{r}.pt  rank r's step and torch / python / numpy (/ cuda) RNG states
    RUN/checkpoints/latest -> step-0000100

A checkpoint is assembled in ``.tmp-step-0000100/`` and renamed once every rank has written its part, so a folder
named ``step-*`` is always complete. Everything is stored as tensors and plain containers: loads use
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ranking import distributed
from ranking.config import ConfigError, TrainConfig, build
from ranking.errors import RankingError

STATE = "state.pt"
LATEST = "latest"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def save(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step``; a collective: every rank calls it, only rank 0's ``state`` is written.

    Keeps the newest ``keep`` checkpoints and points ``latest`` at this one. Returns the checkpoint folder.
    """
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    rank = distributed.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    distributed.barrier()
    _write({"step": step, "rng": rng_state()}, tmp / f"rng-rank{rank}.pt")  # each rank records its own step
    if rank == 0:
        _write(state, tmp / STATE)
    distributed.barrier()
    if rank == 0:
        _publish(tmp, final)
        _prune(root, keep)
    distributed.barrier()
    return final


def _write(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place and repoint ``latest`` (both atomic renames)."""
    if final.exists():  # the same step saved again (stopped right on a checkpoint step): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    link = final.parent / f".{LATEST}.tmp"
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    os.replace(link, final.parent / LATEST)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"), key=lambda path: path.name)
    latest = (root / LATEST).resolve()
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
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


def resume_path(run_dir: str | os.PathLike, resume: str) -> Path:
    """The checkpoint folder of ``--resume latest`` (in ``run_dir``) or ``--resume PATH``."""
    if resume == LATEST:
        latest = checkpoints_dir(run_dir) / LATEST
        if not latest.exists():
            raise RankingError(f"{latest}: no checkpoint to resume from (drop --resume to start the run)")
        return resolve(latest)
    return resolve(resume)


def _load(path: Path, mmap: bool = False) -> dict:
    if not path.is_file():
        raise RankingError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankingError(f"{path}: corrupt checkpoint ({first_line})") from None


def load_state(checkpoint: Path) -> dict:
    state = _load(checkpoint / STATE)
    missing = {"model", "optimizer", "scheduler", "step"} - state.keys()
    if missing:
        raise RankingError(f"{checkpoint / STATE}: not a training checkpoint (missing {', '.join(sorted(missing))})")
    return state


def load_rng(checkpoint: Path, rank: int) -> dict | None:
    """This rank's RNG states, or None when the run had fewer ranks than now."""
    path = checkpoint / f"rng-rank{rank}.pt"
    return _load(path)["rng"] if path.is_file() else None


def rng_state() -> dict:
    """The RNG states of this process as tensors and lists (``weights_only`` loads them)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached_gaussian},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.array(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RankingError(f"{path}: missing: the run's config is needed to rebuild its model")
    try:
        return build(TrainConfig, str(path))
    except ConfigError as e:
        raise RankingError(f"{path}: cannot rebuild the run's config ({e})") from None


def load_model(path: str | os.PathLike) -> tuple[nn.Module, TrainConfig, int]:
    """(model on the CPU in eval mode, the run's TrainConfig, step) from a run folder or a checkpoint folder.

    The model is rebuilt from ``RUN/config.yaml`` with ``pretrained=False`` and loaded with the checkpoint's weights.
    """
    from ranking.models import build_model  # the trainer imports this module before it needs any model

    checkpoint = resolve(path)
    config = dataclasses.replace(run_config(checkpoint.parent.parent), pretrained=False)
    state = _load(checkpoint / STATE, mmap=True)  # mmap: the optimizer state is never read in
    if "model" not in state:
        raise RankingError(f"{checkpoint / STATE}: no model weights in this checkpoint")
    model = build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RankingError(f"{checkpoint / STATE}: weights do not fit the model of "
                           f"{checkpoint.parent.parent / 'config.yaml'} ({str(e).splitlines()[0]})") from None
    return model.eval(), config, int(state["step"])
