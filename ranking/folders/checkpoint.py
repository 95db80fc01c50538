"""Checkpoints of a run (DESIGN.md "Checkpoints"), written atomically by all ranks, and the training state they hold.

    RUN/checkpoints/step-0000100/state.pt        a TrainState: model (unwrapped state_dict), optimizer, scheduler,
                                                 scaler, step, wandb run id, stream seeds: written by rank 0
    RUN/checkpoints/step-0000100/rng-rank{r}.pt  rank r's step and torch / python / numpy (/ cuda) RNG states
    RUN/checkpoints/step-0000100/checkpoint.json the sha256 of each file above, written last
    RUN/checkpoints/latest -> step-0000100

A checkpoint is assembled in ``.tmp-step-0000100/`` and published (``files.publish_folder``) once every rank has
written its part, then ``latest`` is repointed (``files.replace_link``), so a folder named ``step-*`` is always
complete; ``verify`` checks its files against ``checkpoint.json`` (flipped bytes, a
truncated file), and ``resumable`` falls back from a damaged ``latest`` to the newest intact checkpoint.
Everything is stored as tensors and plain containers: loads use
``torch.load(weights_only=True)``. ``TrainState`` alone knows the keys of ``state.pt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranking.core import distributed
from ranking.core.errors import RankingError
from ranking.core.files import (
    file_sha256,
    publish_folder,
    read_json,
    replace_link,
    write_atomically,
    write_text_atomically,
)
from ranking.folders.runfolder import (
    BEST,
    LATEST,
    STATE,
    checkpoint_dir,
    checkpoints_dir,
    resolve_checkpoint,
    resume_checkpoint,
)

MANIFEST = "checkpoint.json"  # {"format", "step", "files": {name: sha256}}, the last file of a checkpoint
FORMAT = "deep-ranking-checkpoint/1"
LOW_SPACE_BYTES = 64 * 2**20  # a failed write with less than this left is reported as a full disk


@dataclass
class TrainState:
    """Everything a resumed run needs besides the RNG states; ``to_dict`` / ``from_dict`` define ``state.pt``."""

    step: int
    model: dict[str, torch.Tensor]  # the unwrapped model's state_dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)  # empty unless fp16
    objective: dict[str, torch.Tensor] = field(default_factory=dict)  # the loss's parameters (proxies), if any
    wandb_run_id: str = ""
    # the seeds of the stream a resumed run restarts with: new data after a resume, reproducible
    stream_seeds: tuple[int, int] | None = None
    best_validation: float | None = None  # the value checkpoints/best holds, so a resumed run keeps comparing

    REQUIRED = ("model", "optimizer", "scheduler", "step")

    def to_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "step": self.step,
            "wandb_run_id": self.wandb_run_id,
        }
        if self.objective:
            state["objective"] = self.objective
        if self.stream_seeds is not None:
            state["stream"] = dict(zip(("samples_seed", "batches_seed"), self.stream_seeds))
        if self.best_validation is not None:
            state["best_validation"] = self.best_validation
        return state

    @classmethod
    def from_dict(cls, state: Any, path: Path) -> TrainState:
        missing = set(cls.REQUIRED) - (state.keys() if isinstance(state, dict) else set())
        if missing:
            raise RankingError(f"{path}: not a training checkpoint (missing {', '.join(sorted(missing))})")
        stream = state.get("stream")
        return cls(
            step=int(state["step"]),
            model=state["model"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            scaler=state.get("scaler") or {},
            objective=state.get("objective") or {},
            wandb_run_id=state.get("wandb_run_id") or "",
            stream_seeds=(int(stream["samples_seed"]), int(stream["batches_seed"])) if stream else None,
            best_validation=state.get("best_validation"),
        )


def save(run_dir: str | os.PathLike, state: TrainState, keep: int, best: bool = False) -> Path:
    """Write the checkpoint of ``state.step``; a collective: every rank calls it, only rank 0's ``state`` is written.

    Keeps the newest ``keep`` checkpoints (and the one ``best`` points at) and points ``latest`` at this one, and
    ``best`` too when ``best``. Returns the checkpoint folder.
    """
    final = checkpoint_dir(run_dir, state.step)
    root = final.parent
    tmp = root / f".tmp-{final.name}"
    rank = distributed.rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    problem = _attempt(lambda: tmp.mkdir(parents=True) if rank == 0 else None, root)
    if not distributed.first_error(problem):  # every rank is past the mkdir (or knows it failed)
        problem = _attempt(lambda: _write({"step": state.step, "rng": rng_state()}, tmp / f"rng-rank{rank}.pt"), root)
        if rank == 0 and not problem:
            problem = _attempt(lambda: _write(state.to_dict(), tmp / STATE), root)
    problem = distributed.first_error(problem)  # every rank's files are written, or one rank could not write them
    if rank == 0 and not problem:
        problem = _attempt(lambda: _publish(tmp, final, state.step, best, keep), root)
    problem = distributed.first_error(problem)
    if problem:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = root / LATEST
        raise RankingError(
            f"{final}: could not write the checkpoint ({problem}); its partial files are removed, the "
            f"last checkpoint is {latest.resolve() if latest.exists() else 'none'}"
        ).everywhere()
    return final


def _attempt(write: Callable[[], object], folder: Path) -> str:
    """ "" when ``write`` into ``folder`` succeeded, else why not in a few words (a full disk, a read-only file
    system). torch.save reports a short write as a RuntimeError of its own ("unexpected pos ..."): a nearly full
    disk is named as such."""
    try:
        write()
    except OSError as e:
        return f"{e.strerror or str(e) or type(e).__name__}{f': {e.filename}' if e.filename else ''}"
    except RuntimeError as e:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < LOW_SPACE_BYTES:
                return f"no space left on the device: {free / 2**20:.1f} MiB free"
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ""


def _publish(tmp: Path, final: Path, step: int, best: bool, keep: int) -> None:
    """Rank 0, once every rank wrote its files: the manifest, the folder under its final name, the links, pruning."""
    root = final.parent
    _write_manifest(tmp, step)
    publish_folder(tmp, final)  # a step saved again (stopped right on a checkpoint step) replaces the old one
    replace_link(root / LATEST, final.name)
    if best:
        replace_link(root / BEST, final.name)
    _prune(root, keep)


def _write(obj: object, path: Path) -> None:
    write_atomically(path, lambda f: torch.save(obj, f))


def _write_manifest(folder: Path, step: int) -> None:
    files = {
        path.name: file_sha256(path)
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.name != MANIFEST
    }
    write_text_atomically(folder / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))


_WARNED_UNVERIFIED: set[Path] = set()


def verify(checkpoint: Path) -> None:
    """Every file listed in ``checkpoint.json`` is there with its sha256; a RankingError names the first that is not.

    A checkpoint without ``checkpoint.json`` (written before manifests existed, or its manifest removed) has nothing
    to check: it passes with a warning on stderr, once per checkpoint, that its files are unverified.
    """
    path = checkpoint / MANIFEST
    if not path.exists():
        if not (checkpoint / STATE).is_file():
            raise RankingError(f"{checkpoint / STATE}: checkpoint file missing")
        if checkpoint.resolve() not in _WARNED_UNVERIFIED:
            _WARNED_UNVERIFIED.add(checkpoint.resolve())
            print(
                f"warning: {checkpoint}: no {MANIFEST}, so its files are loaded unverified (no sha256 to check; "
                "written before manifests, or the manifest was removed)",
                file=sys.stderr,
                flush=True,
            )
        return
    manifest = read_json(path, "missing")
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    if not isinstance(files, dict) or STATE not in files:
        raise RankingError(f"{path}: not a {FORMAT} manifest listing {STATE}")
    for name, digest in files.items():
        file = checkpoint / str(name)
        if "/" in str(name) or not file.is_file():
            raise RankingError(f"{file}: listed in {MANIFEST} but missing")
        if file_sha256(file) != digest:
            raise RankingError(f"{file}: sha256 differs from {MANIFEST} (damaged since it was written)")


def state_sha256(checkpoint: Path) -> str:
    """What identifies a checkpoint's model: its ``state.pt``'s sha256 (from ``checkpoint.json`` once verified,
    else hashed here)."""
    verify(checkpoint)
    manifest = checkpoint / MANIFEST
    return str(read_json(manifest, "missing")["files"][STATE]) if manifest.exists() else file_sha256(checkpoint / STATE)


def resumable(run_dir: str | os.PathLike, resume: str) -> tuple[Path, list[str]]:
    """The checkpoint ``--resume`` names, verified, and why others were skipped.

    ``--resume PATH`` must be intact. ``--resume latest`` tries ``latest``, then every ``step-*`` from the newest
    down, and takes the first intact one: a damaged latest checkpoint costs the steps since the one before it,
    not the run.
    """
    if resume != LATEST:
        path = resolve_checkpoint(resume)
        verify(path)
        return path, []
    root = checkpoints_dir(run_dir)
    latest = root / LATEST
    candidates = [latest.resolve()] if latest.exists() else []
    skipped = (
        [f"skipping {latest}: it points at {os.readlink(latest)}, which is missing"]
        if latest.is_symlink() and not latest.exists()
        else []
    )
    candidates += [path for path in sorted(root.glob("step-*"), reverse=True) if path.resolve() not in candidates]
    if not candidates:
        return resume_checkpoint(run_dir, resume), []  # its error: nothing to resume from
    for path in candidates:
        try:
            verify(path)
        except RankingError as e:
            skipped.append(f"skipping checkpoint {path.name}: {e}")
            continue
        return path.resolve(), skipped
    raise RankingError(f"{root}: no intact checkpoint to resume from ({'; '.join(skipped)})")


def _prune(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"), key=lambda path: path.name)
    kept = {(root / LATEST).resolve(), (root / BEST).resolve()}
    for old in steps[:-keep] if keep > 0 else []:
        if old.resolve() not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _load(path: Path, mmap: bool = False) -> Any:
    if not path.is_file():
        raise RankingError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            # torch's message goes on to suggest turning the protection off: refuse in our own words instead
            raise RankingError(
                f"{path}: holds pickled Python objects besides tensors and plain containers, which "
                "deep-ranking never writes; refused, since loading them could run code"
            ) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankingError(f"{path}: corrupt checkpoint ({first_line})") from None


def load_state(checkpoint: Path) -> TrainState:
    return TrainState.from_dict(_load(checkpoint / STATE), checkpoint / STATE)


def load_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(model state_dict, step) only: mmap, so the optimizer state is never read in; the files verified first."""
    verify(checkpoint)
    state = _load(checkpoint / STATE, mmap=True)
    if not isinstance(state, dict) or "model" not in state:
        raise RankingError(f"{checkpoint / STATE}: no model weights in this checkpoint")
    return state["model"], int(state["step"])


def wandb_run_id(run_dir: str | os.PathLike) -> str | None:
    """The W&B run id of a run's latest checkpoint (mmap: only the small entry is read, not the weights)."""
    state = checkpoints_dir(run_dir) / LATEST / STATE
    if not state.is_file():
        return None
    loaded = _load(state, mmap=True)
    return (loaded.get("wandb_run_id") if isinstance(loaded, dict) else None) or None


def load_rng(checkpoint: Path, rank: int) -> dict | None:
    """This rank's RNG states, or None when the run had fewer ranks than now."""
    path = checkpoint / f"rng-rank{rank}.pt"
    return _load(path)["rng"] if path.is_file() else None


def rng_state() -> dict:
    """The RNG states of this process as tensors and lists (``weights_only`` loads them)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": np.asarray(keys).tolist(),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
