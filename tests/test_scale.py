"""A recipe that scales with the job (issue 19, finding 6): --images as the budget, the lr scaled with the global
batch against the config's reference batch, warm-up in images; config.yaml, the first log line, the W&B config and
`ranking compare` show the world size, processes per node, global batch, precision and scaled lr."""

from __future__ import annotations

import math

import pytest
import yaml

from harness import REPO, launch, metrics, train_flags, wandb_history_and_config
from ranking.compare import main as compare_main
from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.errors import ConfigError
from ranking.train import main as train_main
from ranking.training.scale import Scale

CONFIGS_DIR = REPO / "configs"


def recipe(*argv: str, config: str = "default") -> TrainConfig:
    return flags.parse(
        TrainConfig,
        ["--config", str(CONFIGS_DIR / f"{config}.yaml"), "--shards", "s", "--run-dir", "r", *argv],
        "ranking train",
        "",
    )


def test_an_image_budget_gives_steps_by_the_global_batch() -> None:
    cfg = recipe("--images", "64000")
    assert (Scale.of(cfg, 1).steps, Scale.of(cfg, 1).global_batch) == (1000, 64)
    assert (Scale.of(cfg, 2).steps, Scale.of(cfg, 2).global_batch) == (500, 128)
    assert Scale.of(cfg, 1).applied(cfg).steps == 1000


def test_a_flag_wins_over_the_other_way_of_saying_it_in_the_file() -> None:
    gpu = recipe(config="gpu")
    assert gpu.images == 32000 and Scale.of(gpu, 1).steps == 125
    stepped = recipe("--steps", "40", config="gpu")  # bench/quality.py's way: --steps over the file's images
    assert stepped.images == 0 and Scale.of(stepped, 1).steps == 40
    assert recipe("--images", "6400").steps == TrainConfig().steps  # the file's steps are set aside, and unused
    with pytest.raises(ConfigError, match="--images and --steps say the same thing two ways: give one"):
        recipe("--images", "6400", "--steps", "3")


def test_the_lr_follows_the_global_batch_by_the_named_rule() -> None:
    default = recipe()
    one, sixteen = Scale.of(default, 1), Scale.of(default, 16)
    assert one.lr == default.lr and one.warmup_steps == default.warmup_steps  # one process: the maths never moves
    assert sixteen.lr == pytest.approx(default.lr * 4)  # sqrt(16 x 64 / 64)
    assert Scale.of(recipe("--lr-scaling", "linear"), 16).lr == pytest.approx(default.lr * 16)
    assert Scale.of(recipe("--lr-scaling", "none"), 16).lr == default.lr
    gpu = recipe(config="gpu")  # stated at the default's batch of 64: sqrt(256 / 64) = 2 at one GPU, as before
    assert gpu.reference_batch == 64 and Scale.of(gpu, 1).lr == 2 * gpu.lr == 2e-3
    assert Scale.of(gpu, 16).lr == pytest.approx(1e-3 * math.sqrt(4096 / 64))
    # warm-up in images: the default's 30 x 64 images, at any size
    assert Scale.of(gpu, 1).warmup_steps == 8 and Scale.of(gpu, 16).warmup_steps == 1
    with pytest.raises(ConfigError, match="--images 100 is less than one step of the global batch 128"):
        Scale.of(recipe("--images", "100"), 2)


def launch_block(run_dir) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["launch"]


@pytest.mark.system
def test_images_train_by_the_world_size_and_every_record_agrees(synth_shards, tmp_path, capsys) -> None:
    """36 images of 6 a step: 6 steps at one process, 3 at 2 gloo ranks; config.yaml, the first log line, the W&B
    config and `ranking compare` agree on the global batch and the scaled lr."""
    small = {
        "classes-per-batch": 3,
        "samples-per-class": 2,
        "images": 36,
        "reference-batch": 6,
        "checkpoint-every": 100,
    }
    one = tmp_path / "one"
    assert train_main(train_flags(synth_shards, one, **small, **{"no-wandb": None})) == 0
    two = tmp_path / "two"
    done = launch(train_flags(synth_shards, two, **small))
    assert done.returncode == 0, done.stderr[-3000:]

    assert [r["step"] for r in metrics(one)] == list(range(1, 7))
    assert [r["step"] for r in metrics(two)] == list(range(1, 4))
    lr = flags.build(TrainConfig, str(CONFIGS_DIR / "smoke.yaml")).lr
    assert launch_block(one) == {
        "world_size": 1,
        "processes_per_node": 1,
        "global_batch": 6,
        "reference_batch": 6,
        "lr": lr,
        "steps": 6,
        "warmup_steps": 3,
        "precision": "no",
    }
    block = launch_block(two)
    assert block == {
        "world_size": 2,
        "processes_per_node": 2,
        "global_batch": 12,
        "reference_batch": 6,
        "lr": pytest.approx(lr * math.sqrt(2)),
        "steps": 3,
        "warmup_steps": 3,
        "precision": "no",
    }
    saved = yaml.safe_load((two / "config.yaml").read_text())
    assert saved["lr"] == lr and saved["images"] == 36  # the recipe as given: it reads back the same at any size

    first = next(line for line in done.stdout.splitlines() + done.stderr.splitlines() if "ranking.train:" in line)
    assert f"world size 2 (2 per node), global batch 12, 3 steps (36 images), lr {lr * math.sqrt(2):.6g}" in first
    assert first.endswith("precision no")

    _, wandb_config = wandb_history_and_config(next((two / "wandb").glob("offline-run-*")))
    assert wandb_config["launch"] == block and wandb_config["global_batch"] == 12
    assert wandb_config["world_size"] == 2 and wandb_config["processes_per_node"] == 2

    capsys.readouterr()
    assert compare_main([str(one), str(two), "--out", str(tmp_path / "compare.png")]) == 0
    table = capsys.readouterr().out
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")
    ]
    shown = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert {key: shown["one"][key] for key in ("world_size", "processes_per_node", "global_batch", "lr_scaled")} == {
        "world_size": "1",
        "processes_per_node": "1",
        "global_batch": "6",
        "lr_scaled": str(lr),
    }, table
    assert (shown["two"]["world_size"], shown["two"]["global_batch"]) == ("2", "12")
    assert float(shown["two"]["lr_scaled"]) == pytest.approx(lr * math.sqrt(2))
