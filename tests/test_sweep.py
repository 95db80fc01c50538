"""W&B sweeps: what an agent passes reaches the trainer, and configs/sweep.yaml names real knobs with valid values."""

from __future__ import annotations

import os

import pytest
import yaml

from harness import REPO
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError, RankingError
from ranking.train import expand_run_dir


def test_agent_style_flags_parse():
    cfg = flags.parse(
        TrainConfig,
        [
            "--trunk_lr_scale=0.3",
            "--pretrained=True",
            "--frozen_stages=2",
            "--miner=hard",
            "--wandb=false",
            "--margin",
            "0.3",
            "--lr=2e-3",
        ],
        "t",
        "",
    )
    assert (cfg.trunk_lr_scale, cfg.pretrained, cfg.frozen_stages, cfg.miner, cfg.wandb, cfg.margin, cfg.lr) == (
        0.3,
        True,
        2,
        "hard",
        False,
        0.3,
        2e-3,
    )
    assert flags.parse(TrainConfig, ["--normalize=FALSE", "--channels-last=1"], "t", "").normalize is False
    with pytest.raises(ConfigError, match="--pretrained takes true or false, got 'maybe'"):
        flags.parse(TrainConfig, ["--pretrained=maybe"], "t", "")
    with pytest.raises(ConfigError, match="unknown flag --trunk-lr-scal; did you mean --trunk-lr-scale"):
        flags.parse(TrainConfig, ["--trunk_lr_scal=0.1"], "t", "")


def test_the_sweep_file_names_real_knobs_with_valid_values():
    sweep = yaml.safe_load((REPO / "configs" / "sweep.yaml").read_text())
    assert sweep["metric"] == {"name": "val/precision@30", "goal": "maximize"}
    for name, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec["min"], spec["max"]]
        for value in values:  # each as the agent passes it
            cfg = flags.parse(TrainConfig, [f"--{name}={value}"], "t", "")
            assert getattr(cfg, name) == (pytest.approx(value) if isinstance(value, float) else value), (name, value)
    command = sweep["command"]
    assert command[:5] == ["${env}", "accelerate", "launch", "-m", "ranking.train"] and command[-1] == "${args}"
    assert "--eval-every" in command and "$WANDB_RUN_ID" in command[command.index("--run-dir") + 1]
    # every run trains alike on any node: the precision is named, the budget is in images (steps follow the job)
    assert command[command.index("--mixed-precision") + 1] in ("no", "bf16", "fp16")
    assert int(command[command.index("--images") + 1]) > 0 and "--steps" not in command


def test_run_dir_names_the_agents_run(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert expand_run_dir("runs/sweep/$WANDB_RUN_ID") == os.path.join("runs", "sweep", "abc123")
    monkeypatch.delenv("WANDB_RUN_ID")
    with pytest.raises(RankingError, match="names an environment variable that is not set"):
        expand_run_dir("runs/sweep/$WANDB_RUN_ID")
