"""W&B (ranking.reporting.tracking): its own mode rules decide, each case in a fresh HOME and working folder, with
the real wandb settings files, netrc and environment, in a process of its own; the training run's names, best
summaries and model artifact, read back from W&B's offline files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from harness import REPO, SMOKE, wandb_history_and_config, wandb_records, wandb_run, wandb_summary

WANDB = Path(sys.executable).parent / "wandb"


def resolve(home: Path, env: dict[str, str] | None = None, requested: str = "") -> tuple[str, str]:
    """(mode printed by resolve_mode, its stderr) with HOME and the working folder in ``home``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    code = f"from ranking.reporting import tracking; print(tracking.resolve_mode({requested!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})},
        check=True,
    )
    return result.stdout.strip(), result.stderr


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_nothing_configured_goes_offline_and_says_so(home):
    mode, said = resolve(home)
    assert mode == "offline"
    assert said.count("\n") == 1 and "no mode configured and no credentials" in said and "wandb sync" in said


@pytest.mark.parametrize(
    "env",
    [{"WANDB_MODE": "online"}, {"WANDB_MODE": "disabled"}, {"WANDB_API_KEY": "a" * 40}],
    ids=["WANDB_MODE online", "disabled", "API key"],
)
def test_the_environment_lets_wandb_decide(home, env):
    assert resolve(home, env) == ("None", "")


def test_wandb_offline_in_the_folder_lets_wandb_decide(home):
    subprocess.run(
        [str(WANDB), "offline"],
        cwd=home,
        env={**os.environ, "HOME": str(home)},
        check=True,
        capture_output=True,
        timeout=120,
    )
    mode, said = resolve(home)
    assert mode == "None" and "no mode configured" not in said  # (wandb itself names the settings file it read)


def test_wandb_login_credentials_let_wandb_decide(home):
    """`wandb login` writes the key into ~/.netrc for the W&B host; wandb online then needs no fallback."""
    code = "from wandb.sdk import wandb_setup; print(wandb_setup.singleton().settings.base_url)"
    base_url = subprocess.run(
        [sys.executable, "-c", code],
        cwd=home,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HOME": str(home)},
        timeout=120,
    ).stdout.strip()
    netrc = home / ".netrc"
    netrc.write_text(f"machine {urlsplit(base_url).hostname}\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    assert resolve(home) == ("None", "")


def test_the_flag_wins(home):
    assert resolve(home, {"WANDB_MODE": "online"}, requested="disabled") == ("disabled", "")


# ---------------------------------------------------------------------------------------------------------------
# the training run's names, best summaries and model artifact, through the trainer's own MetricsSink, read back
# from W&B's offline files


def trainer_sink(run_dir: Path, shards: Path, **overrides):
    """The trainer's records (its Accelerator, its W&B run through Accelerate's tracker, its MetricsSink) for a
    run folder of the smoke model, without a training loop, and the network whose weights it logs."""
    from accelerate import Accelerator

    from ranking.core import flags
    from ranking.core.config import TrainConfig
    from ranking.learning import models
    from ranking.training.metrics import MetricsSink, start_records

    cfg = flags.build(
        TrainConfig,
        str(SMOKE),
        {
            "run_dir": str(run_dir),
            "shards": str(shards),
            "image_size": 32,
            "embed_dim": 16,
            "wandb_mode": "offline",
            "progress": False,
            **overrides,
        },
    )
    run_dir.mkdir(parents=True)
    accelerator = Accelerator(cpu=True, log_with="wandb")
    torch.manual_seed(0)
    net = models.build_model(cfg)
    start_records(cfg, accelerator, 0, "sinkrun1")
    return MetricsSink(cfg, accelerator, 0), net


def validation_at(step: int, precision: float):
    from ranking.retrieval.validation import Validation

    return Validation(
        step,
        {
            "precision_at_k": precision,
            "knn1_accuracy": precision / 2,
            "hit_at_k": 1.0,
            "map": precision / 3,
            "map_at_r": precision / 4,
        },
        seconds=0.5,
    )


@pytest.mark.system  # wandb.init starts W&B's service process
def test_the_training_run_logs_sections_on_trainer_step_keeps_the_best_and_one_model_artifact(
    synth_shards, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from ranking.learning.losses import StepLoss

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nothing may be staged in the home folder
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    run_dir = tmp_path / "run"
    sink, net = trainer_sink(run_dir, synth_shards, wandb_artifacts=True)
    best = -1.0
    for step, precision in ((2, 0.2), (4, 0.5), (6, 0.3)):  # the last validation is worse than the one before
        loss = torch.tensor(1.0 / step)
        sink.meter.add(StepLoss(loss, loss, torch.tensor(0.5)), triplets=12, images=12, weight=1.0)
        sink.log_step(step, lr=1e-3, lrs={})
        sink.log_validation(step, validation_at(step, precision))
        if precision > best:  # the trainer's rule: a new best is saved, and logged as the model
            best = precision
            sink.log_model(step, net, best=True)
    sink.close()
    sink.finish(last=(6, net))

    (run_folder,) = (run_dir / "wandb").glob("offline-run-*")
    run = wandb_run(run_folder)
    assert (run.run_group, run.job_type) == ("run", "train")  # grouped by its name without --wandb-group
    history, _ = wandb_history_and_config(run_folder)
    keys = {key for row in history for key in row if not key.startswith("_")}
    assert {"train/loss", "train/lr", "train/images_per_s", "val/precision@30", "val/mAP", "trainer/step"} <= keys
    assert all("/" in key for key in keys), keys  # no name outside a section
    assert wandb_summary(run_folder)["val/precision@30"] == pytest.approx(0.5)  # the best, not the last (0.3)
    assert wandb_summary(run_folder)["val/knn1"] == pytest.approx(0.25)

    artifacts = [r.artifact for r in wandb_records(run_folder) if r.WhichOneof("record_type") == "artifact"]
    assert {a.name for a in artifacts} == {"model-sinkrun1"} and {a.type for a in artifacts} == {"model"}
    steps = [json.loads(a.metadata)["step"] for a in artifacts]
    assert steps == [2, 4, 6]  # each new best, then the end
    aliases = {step: set(a.aliases) for step, a in zip(steps, artifacts)}
    assert aliases == {2: {"latest", "best"}, 4: {"latest", "best"}, 6: {"latest"}}  # `best` last moved to step 4
    at_best = json.loads(artifacts[1].metadata)
    assert at_best["metrics"]["val/precision@30"] == pytest.approx(0.5) and at_best["model"]["embed_dim"] == 16
    for artifact in artifacts:
        assert sorted(entry.path for entry in artifact.manifest.contents) == ["model.json", "model.safetensors"]
    weights = load_file(run_dir / "wandb" / "artifacts" / "model-step-0000006" / "model.safetensors")
    assert weights.keys() == net.state_dict().keys()  # the weights, nothing of an optimizer
    assert all(torch.equal(weights[name], tensor) for name, tensor in net.state_dict().items())
    # W&B's service keeps its debug logs in ~/.cache/wandb/logs; nothing of an artifact may land in the home folder
    staged = [p for p in (tmp_path / "home").rglob("*") if "artifacts" in p.parts or p.suffix == ".safetensors"]
    assert not staged, staged
    # the run folder is W&B's staging place only while it stages: a child process of this one (an evaluation, the
    # next test's) must not take this run's folder for the user's WANDB_DATA_DIR
    assert "WANDB_DATA_DIR" not in os.environ


def test_a_resumed_runs_best_summary_counts_the_validations_before_the_requeue():
    from ranking.reporting.tracking import BestSummary, best_keys

    assert "val/precision@30" in best_keys() and "val/seconds" not in best_keys()
    best = BestSummary(
        best_keys(), earlier=[{"step": 2, "val/precision@30": 0.6, "val/knn1": 0.2}, {"step": 3, "train/loss": 0.1}]
    )
    assert best.improved({"step": 4, "val/precision@30": 0.5, "val/knn1": 0.3}) == {"val/knn1": 0.3}
    assert best.improved({"step": 6, "val/precision@30": 0.7}) == {"val/precision@30": 0.7}
    assert best.best == {"val/precision@30": 0.7, "val/knn1": 0.3}
