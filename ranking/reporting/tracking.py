"""Weights & Biases: the mode, the names, the training run, the runs that evaluation and report add to its group,
and the model artifact.

Mode: ``--wandb-mode`` wins; else W&B's own rules decide (``WANDB_MODE``, ``wandb offline|online|disabled``,
``wandb login`` or ``WANDB_API_KEY``); only when none of those is configured and no credentials exist does a run
go offline, with one line saying so (its files go to ``RUN/wandb``; ``wandb sync`` uploads them later).

One training run is one W&B run: a requeued run resumes its id and its steps continue. Evaluation and report do
not reopen it from another process (an offline run resumed by several processes syncs as lossy segments, and
each segment restarts at ``_step`` 0): each logs a run of its own, ``job_type`` "eval" or "report", in the
training run's group (``--wandb-group``, else the run's name, which the training run takes as its group too),
named after it, with the training step it measured in ``trainer/step``.

Names: ``train/...`` for the training loop's readings, ``val/...`` for retrieval on the val queries (the trainer's
validation and the evaluation's val split alike), ``eval/...`` for what only an evaluation measures; every one of
them has ``trainer/step`` as its x-axis, so one panel shows a run's validation curve and its final evaluation. The
summary of each ``val/<metric>`` is its best value (``BestSummary``), which a sweep maximises.

Files W&B stages (artifact copies, manifests) go to ``RUN/wandb`` (``WANDB_DATA_DIR``, unless the user set it), not
the home folder. ``wandb`` is imported only where something is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ranking.core.config import TrainConfig
from ranking.core.files import write_atomically
from ranking.folders import checkpoint, runfolder
from ranking.retrieval import validation

ID_FILE = "wandb_run_id"  # RUN/wandb_run_id, if present, names the run's W&B id (else the latest checkpoint does)
TRAINER_STEP = "trainer/step"  # the x-axis of every logged name, in every run of a training
TRAIN_PREFIX = "train/"  # the training loop's readings (metrics.jsonl and W&B alike)
DATA_DIR = "WANDB_DATA_DIR"  # where W&B stages artifact copies (``staging_in``)
EVAL_PREFIX = "eval/"  # what only `ranking evaluate` measures (the gallery split against itself, tables, PR curves)


def resolve_mode(requested: str = "") -> str | None:
    """The mode to start W&B in, or None to let W&B's own settings decide (see the module's docstring)."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    if _wandb_configured():
        return None
    print(
        "W&B: no mode configured and no credentials (wandb login, WANDB_API_KEY, WANDB_MODE, --wandb-mode): "
        "logging offline; `wandb sync RUN/wandb/offline-run-*` uploads it later",
        file=sys.stderr,
    )
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
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def run_id_of(run_dir: Path) -> str | None:
    """The W&B run id the trainer logged to: RUN/wandb_run_id, else the latest checkpoint's."""
    id_file = run_dir / ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip() or None
    return checkpoint.wandb_run_id(run_dir)


def run_name(cfg: TrainConfig, run_dir: Path) -> str:
    return cfg.run_name or run_dir.resolve().name


def group(cfg: TrainConfig, run_dir: Path) -> str:
    """The W&B group of every run of one training (train, eval, report): ``--wandb-group``, else the run's name."""
    return cfg.wandb_group or run_name(cfg, run_dir)


@contextlib.contextmanager
def staging_in(run_dir: Path) -> Iterator[None]:
    """W&B stages artifact copies and manifests under ``WANDB_DATA_DIR`` (default: the home folder, where cluster
    quotas are small), reading it whenever it stages (``add_file``, ``log_artifact``): inside this block, in the run
    folder unless the user chose a place. The environment is restored after it, so a process that logs for several
    run folders stages each in its own, and no child process takes this run's folder for the user's choice."""
    users_choice = os.environ.get(DATA_DIR)
    os.environ[DATA_DIR] = users_choice or str(Path(run_dir).resolve() / "wandb")
    try:
        yield
    finally:
        if users_choice is None:
            os.environ.pop(DATA_DIR, None)
        else:
            os.environ[DATA_DIR] = users_choice


def define_metrics(run: Any, best_keys: list[str]) -> None:
    """Every name on ``trainer/step``; ``best_keys`` get no automatic summary (``BestSummary`` writes theirs)."""
    run.define_metric(TRAINER_STEP)
    for prefix in (TRAIN_PREFIX, validation.VAL_PREFIX, EVAL_PREFIX):
        run.define_metric(f"{prefix}*", step_metric=TRAINER_STEP)
    for key in best_keys:
        run.define_metric(key, step_metric=TRAINER_STEP, summary="none")


class BestSummary:
    """The run summary of each retrieval metric is its best value so far (all of them: higher is better), not the
    last: what a sweep on ``val/precision@30`` should maximise, and what ``checkpoints/best`` holds."""

    def __init__(self, keys: list[str], earlier: list[dict] | None = None) -> None:
        """``earlier``: records logged before (a resumed run's metrics.jsonl), whose best values still count."""
        self.keys, self.best = keys, dict[str, float]()
        for record in earlier or []:
            self.improved(record)

    def improved(self, values: dict[str, Any]) -> dict[str, float]:
        """The keys of ``values`` that beat their best so far, with their values (now the best)."""
        better = {
            key: float(values[key])
            for key in self.keys
            if isinstance(values.get(key), (int, float)) and values[key] > self.best.get(key, -math.inf)
        }
        self.best |= better
        return better

    def update(self, run: Any, values: dict[str, Any]) -> None:
        for key, value in self.improved(values).items():
            run.summary[key] = value


def best_keys() -> list[str]:
    """The keys the trainer's validation logs whose summary is their best value."""
    return list(validation.metric_keys(validation.K).values())


def init_trainer(
    accelerator: Any, cfg: TrainConfig, config: dict, run_dir: Path, run_id: str, mode: str | None
) -> None:
    """Start (or resume, by id) the training run's W&B run through Accelerate's tracker (main process only), its
    names on ``trainer/step``."""
    init: dict[str, Any] = {
        "name": run_name(cfg, run_dir),
        "group": group(cfg, run_dir),
        "tags": cfg.wandb_tags,
        "id": run_id,
        "resume": "allow",
        "dir": str(run_dir),
        "job_type": "train",
        "entity": cfg.wandb_entity or None,
        "notes": cfg.wandb_notes or None,
    }
    if mode is not None:
        init["mode"] = mode
    accelerator.init_trackers(cfg.wandb_project, config=config, init_kwargs={"wandb": init})
    if accelerator.is_main_process:
        define_metrics(accelerator.get_tracker("wandb", unwrap=True), best_keys())


def log_model(
    run: Any, run_dir: Path, net: Any, step: int, spec: dict, metrics: dict[str, Any], aliases: list[str]
) -> Path:
    """The weights of ``net`` at ``step`` as a version of the run's one model artifact, ``model-<run id>``:
    ``model.safetensors`` (the state_dict, nothing of the optimizer), ``model.json`` (the ``ModelSpec``, the step,
    the checkpoint's metrics). ``aliases`` (``latest``, ``best``) move to this version. The files are written to
    ``RUN/wandb/artifacts/model-step-<step>`` and added without a copy; they must stay until W&B has uploaded them
    (offline: until ``wandb sync``). Returns that folder."""
    import wandb
    from safetensors.torch import save

    folder = Path(run_dir) / "wandb" / "artifacts" / f"model-{runfolder.step_dir_name(step)}"
    # copies on the CPU: safetensors refuses tensors that share memory, and the file must not hold device tensors
    weights = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in net.state_dict().items()}
    write_atomically(folder / "model.safetensors", lambda f: f.write(save(weights)))
    identity = {"step": step, "model": spec, "metrics": metrics}
    write_atomically(folder / "model.json", lambda f: f.write(json.dumps(identity, indent=1).encode()))
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=identity)
    with staging_in(run_dir):
        for file in (folder / "model.safetensors", folder / "model.json"):
            artifact.add_file(str(file), policy="immutable", skip_cache=True)
        run.log_artifact(artifact, aliases=aliases)
    return folder


def logged_line(where: str | None) -> str:
    """What a stage prints after ``log_job``: where the run went, or that W&B is disabled and nothing was logged."""
    return f"logged to W&B: {where}" if where else "W&B is disabled: nothing logged to W&B"


def log_job(
    run_dir: Path,
    cfg: TrainConfig,
    job_type: str,
    step: int,
    values: Callable[[Any], dict[str, Any]],
    config: dict | None = None,
    artifacts: dict[str, tuple[str, Path]] | None = None,
) -> str | None:
    """Log ``values(wandb)`` at training step ``step`` in a new run of ``job_type`` in the training run's group.

    ``artifacts``: name -> (type, file), logged with the run; W&B copies each into its staging folder, in the run
    folder (``staging_in``), since a later stage may rewrite the file before an offline run is synced. Returns
    the run's URL, or its folder, or None when W&B is disabled (nothing was logged anywhere).
    """
    import wandb

    name = run_name(cfg, run_dir)
    init_config = {
        "train_run_id": run_id_of(run_dir),
        TRAINER_STEP: step,
        "train": dataclasses.asdict(cfg),
        **(config or {}),
    }
    run = wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity or None,
        group=group(cfg, run_dir),
        name=f"{name} {job_type} step {step}",
        job_type=job_type,
        tags=cfg.wandb_tags,
        dir=str(run_dir),
        config=init_config,
        mode=resolve_mode(cfg.wandb_mode),  # type: ignore[arg-type]
    )
    try:
        logged = {TRAINER_STEP: step, **values(wandb)}
        define_metrics(run, [])
        run.log(logged)
        for artifact_name, (kind, path) in (artifacts or {}).items():
            artifact = wandb.Artifact(artifact_name, type=kind)
            with staging_in(run_dir):
                artifact.add_file(str(path), skip_cache=True)
                run.log_artifact(artifact)
        return None if run.disabled else (run.url or run.dir)
    finally:
        run.finish()
