"""Precision the Accelerate way: the stage's flag wins, else Accelerate's resolution (launch flag, `accelerate config`
file, ACCELERATE_MIXED_PRECISION), else the device's best; read back from the run's config.yaml and its log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import launch, train_flags, write_smoke_run
from ranking.core import flags, precision
from ranking.core.config import TrainConfig

FROM_ACCELERATE = "(Accelerate: accelerate launch's flag or config file, or ACCELERATE_MIXED_PRECISION)"


def cpu_has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.fixture
def clean_env(monkeypatch):
    """This process's real environment without any precision setting (restored after the test)."""
    for name in (precision.ENV, precision.LAUNCH_DEFAULTED):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    return monkeypatch


def test_the_flag_wins_then_accelerate_then_the_device(clean_env):
    device = precision.device_default()
    assert device.value == ("bf16" if cpu_has_bf16() else "no") and device.source.startswith("device default")
    assert precision.resolve(None) == device
    clean_env.setenv(precision.ENV, "no")
    assert precision.resolve(None) == precision.Precision("no", FROM_ACCELERATE[1:-1])
    assert precision.resolve("bf16") == precision.Precision("bf16", "--mixed-precision")
    # slurm/common.sh launched without a flag or a config file: accelerate launch's "no" was nobody's choice
    clean_env.setenv(precision.LAUNCH_DEFAULTED, "1")
    assert precision.resolve(None) == device
    clean_env.setenv(precision.ENV, "fp16")
    assert precision.resolve(None).value == "fp16"  # only the launcher's default "no" gives way
    # evaluation: fp16 autocast needs a GPU
    assert precision.for_inference(precision.resolve(None)).value == "bf16"


def test_the_default_is_unset_in_the_config_and_a_file_can_set_it(tmp_path):
    assert TrainConfig().mixed_precision is None
    path = tmp_path / "fp16.yaml"
    path.write_text("mixed_precision: fp16\n")
    assert flags.build(TrainConfig, path).mixed_precision == "fp16"
    path.write_text("mixed_precision: null\n")
    assert flags.build(TrainConfig, path).mixed_precision is None


def precision_flags(shards: Path, run_dir: Path) -> list[str]:
    """A 2-step run without the trainer's own --mixed-precision flag."""
    flags = train_flags(
        shards,
        run_dir,
        steps=2,
        **{"classes-per-batch": 3, "samples-per-class": 2, "checkpoint-every": 100, "no-wandb": None},
    )
    at = flags.index("--mixed-precision")
    return flags[:at] + flags[at + 2 :]


def logged_precision(run_dir: Path) -> str:
    return flags.build(TrainConfig, run_dir / "config.yaml").mixed_precision or ""


def test_accelerate_launch_flag_reaches_the_trainer_and_plain_log_lines_replace_the_bar(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    done = launch(precision_flags(synth_shards, run_dir), launcher_precision="bf16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert logged_precision(run_dir) == "bf16"
    lines = done.stderr.splitlines()
    assert any(line.endswith(f"ranking.train: mixed precision bf16 {FROM_ACCELERATE}") for line in lines), lines
    # not a terminal: one plain line per logged step from rank 0 (no carriage returns), with the rank in the prefix
    steps = [line for line in lines if "ranking.train: step " in line]
    assert len(steps) == 2 and "\r" not in done.stderr, done.stderr
    assert all(line.startswith("[") and " rank 0] ranking.train: step " in line for line in steps)
    for field in ("loss ", "active ", "lr ", "images/s ", "ETA "):
        assert field in steps[-1], steps[-1]
    assert " step 2/2 " in steps[-1]


def test_an_accelerate_config_file_reaches_the_trainer(synth_shards, tmp_path):
    accelerate_config = tmp_path / "accelerate.yaml"  # as `accelerate config` writes it
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
        "mixed_precision: bf16\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n"
    )
    run_dir = tmp_path / "run"
    done = launch(
        precision_flags(synth_shards, run_dir),
        launcher_precision=None,
        launcher_flags=["--config_file", str(accelerate_config)],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert logged_precision(run_dir) == "bf16"  # without the file accelerate launch would have set "no"
    assert f"mixed precision bf16 {FROM_ACCELERATE}" in done.stderr


def test_the_environment_reaches_a_single_process_trainer(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", precision.ENV: "no", "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "-m", "ranking", "train", *precision_flags(synth_shards, run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert logged_precision(run_dir) == "no" and f"mixed precision no {FROM_ACCELERATE}" in done.stderr


def test_the_index_follows_the_same_rule(synth_shards, tmp_path, clean_env, capsys):
    """`ranking index` has no rule of its own: its flag, else Accelerate's setting, else the device's best; fp16
    becomes bf16 on the CPU, as for evaluation. Its last line says which precision ran and why."""
    from accelerate.state import AcceleratorState

    from ranking import index

    run = write_smoke_run(tmp_path / "run", str(synth_shards), image_size=32, embed_dim=8)

    def indexed(*argv: str) -> str:
        out = tmp_path / f"index-{len(list(tmp_path.iterdir()))}"
        assert (
            index.main(
                ["--checkpoint", str(run), "--images", str(synth_shards), "--split", "val", "--out", str(out), *argv]
            )
            == 0
        )
        AcceleratorState._reset_state(reset_partial_state=True)  # each index is a process of its own
        return capsys.readouterr().out.strip().splitlines()[-1]

    device = precision.device_default()
    assert f"mixed precision {device.value} ({device.source})" in indexed()
    assert "mixed precision no (--mixed-precision)" in indexed("--mixed-precision", "no")
    clean_env.setenv(precision.ENV, "fp16")
    assert f"mixed precision bf16 {FROM_ACCELERATE[:-1]}; fp16 needs a GPU, bf16 on the CPU instead)" in indexed()
