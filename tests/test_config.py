"""The typed configs: defaults, shipped YAML files, precedence, and one-line errors for bad files and flags."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

import ranking
from harness import REPO, SMOKE, cli_refusal
from ranking.core import config
from ranking.core.config import ConfigError, EvalConfig, TrainConfig

CONFIGS = REPO / "configs"


def test_the_best_recipe_is_the_default_and_default_yaml_restates_it():
    assert config.build(TrainConfig, str(CONFIGS / "default.yaml")) == TrainConfig()
    best = TrainConfig()
    assert (best.backbone, best.pretrained, best.image_size, best.sampler, best.miner, best.loss, best.normalize,
            best.optimizer, best.schedule) == ("efficientnet_lite0", True, 160, "batch", "semihard", "hinge", True,
                                               "adamw", "cosine")
    assert 0 < best.trunk_lr_scale < 1 and best.freeze_bn_stats and best.frozen_stages > 0


def test_named_configs_set_every_key_the_defaults_would_get_wrong_for_them():
    seed = config.build(TrainConfig, str(CONFIGS / "seed.yaml"))
    assert (seed.sampler, seed.pos_per_query, seed.neg_per_query, seed.loss, seed.margin, seed.embed_dim,
            seed.normalize) == ("paper", 1, 1, "triplet_margin", 1.0, 4096, False)
    assert (seed.optimizer, seed.lr, seed.momentum, seed.nesterov, seed.weight_decay, seed.schedule,
            seed.warmup_steps, seed.grad_clip) == ("sgd", 1e-3, 0.9, True, 1e-5, "constant", 0, 0.0)
    # the seeds fine-tuned the whole trunk at one rate with BatchNorm statistics following the batches
    assert (seed.trunk_lr_scale, seed.freeze_bn_stats, seed.frozen_stages) == (1.0, False, 0)
    paper = config.build(TrainConfig, str(CONFIGS / "paper.yaml"))
    assert (paper.backbone, paper.sampler, paper.loss, paper.frozen_stages) == ("multiscale", "paper", "hinge", 0)
    smoke = config.build(TrainConfig, str(SMOKE))
    assert (smoke.backbone, smoke.pretrained, smoke.freeze_bn_stats, smoke.frozen_stages) == ("resnet18", False,
                                                                                            False, 0)


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-2\nembed-dim: 64\nwandb_tags: one\n")  # 1e-2 is a string to YAML; dashes allowed
    cfg = config.build(TrainConfig, str(path), {"embed_dim": 32, "steps": None})
    assert (cfg.lr, cfg.embed_dim, cfg.steps, cfg.wandb_tags) == (0.01, 32, TrainConfig().steps, ["one"])
    cfg = config.parse(TrainConfig, ["--config", str(path), "--no-normalize", "--wandb-tags", "a", "b"], "t", "")
    assert (cfg.lr, cfg.embed_dim, cfg.normalize, cfg.wandb_tags) == (0.01, 64, False, ["a", "b"])


def test_saved_config_reloads_equal(tmp_path):
    cfg = config.build(TrainConfig, str(SMOKE), {"lr": 3e-4, "wandb_tags": ["x"]})
    config.save(cfg, tmp_path / "config.yaml")
    assert config.build(TrainConfig, str(tmp_path / "config.yaml")) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


@pytest.mark.parametrize("text,message", [
    ("lr: [1, 2]\n", "lr must be float"),
    ("learning_rate: 0.1\n", "unknown key 'learning_rate' for TrainConfig"),
    ("normalize: yes please\n", "normalize must be true or false"),
    ("- lr\n", "expected a mapping of config keys, got list"),
    ("lr: [\n", "not valid YAML"),
    ("sampler: random\n", "sampler must be one of batch, paper; got 'random'"),
    ("frozen_stages: -1\n", "frozen_stages must be at least 0; got -1"),
    ("samples_per_class: 1\n", "samples_per_class must be at least 2"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        config.build(TrainConfig, str(path))
    assert "\n" not in str(error.value)


def test_no_pretrained_alone_turns_off_what_only_a_pretrained_trunk_keeps(tmp_path):
    cfg = config.parse(TrainConfig, ["--no-pretrained"], "ranking train", "")
    assert (cfg.pretrained, cfg.freeze_bn_stats, cfg.frozen_stages) == (False, False, 0)
    path = tmp_path / "random.yaml"
    path.write_text("pretrained: false\n")
    assert config.build(TrainConfig, path).frozen_stages == 0  # the same from a config file
    # given explicitly, they are refused rather than silently changed
    with pytest.raises(ConfigError, match=r"pretrained is false, but .* given explicitly, .* add --frozen-stages 0$"):
        config.parse(TrainConfig, ["--no-pretrained", "--frozen-stages", "2"], "ranking train", "")
    with pytest.raises(ConfigError, match=r"add --no-freeze-bn-stats$"):
        config.build(TrainConfig, overrides={"pretrained": False, "freeze_bn_stats": True})


def test_eval_config_rejects_k_below_one():
    with pytest.raises(ConfigError, match="k must be at least 1; got 0"):
        config.build(EvalConfig, overrides={"k": 0})


def test_the_cli_reports_a_bad_config_in_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    line = cli_refusal(capsys, "train", "--config", str(missing))
    assert line == f"ranking train: error: {missing}: config file not found"


# ------------------------------------------------------------------------------------------- flags and help


def help_text(cls: type, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        config.parse(cls, ["--help"], "ranking x", "")
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_flag_with_its_comment_default_choices_and_section(capsys):
    text = help_text(TrainConfig, capsys)
    for section in ("data:", "triplet sampling:", "model:", "loss:", "optimisation:", "run:", "Weights & Biases:"):
        assert f"\n{section}\n" in text, section
    flat = " ".join(text.split())
    assert "--lr FLOAT the learning rate of the head" in flat and "(default: 0.001)" in flat
    assert "--sampler {batch,paper} \"batch\": P x K batches with online mining" in flat
    assert "--pretrained, --no-pretrained ImageNet weights" in flat and "(default: true)" in flat
    assert "--mixed-precision {no,bf16,fp16} unset: Accelerate decides" in flat and "(default: unset)" in flat
    docs, sections = config.field_docs(TrainConfig)
    for cls in (TrainConfig, EvalConfig):
        docs, _ = config.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__}: add a comment beside {undocumented}"
    assert sections["embed_dim"] == "model" and sections["wandb_tags"] == "Weights & Biases"


@pytest.mark.parametrize("argv,message", [
    (["--step", "40"], "unknown flag --step; did you mean --steps?"),  # no abbreviations
    (["--stesp", "40"], "unknown flag --stesp; did you mean --steps?"),
    (["--embed-dimm", "8"], "unknown flag --embed-dimm; did you mean --embed-dim?"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--run-dir", ""], "run_dir must not be empty"),
    (["--shards", " "], "shards must not be empty"),
    (["--resume", "latest", "--overwrite"], "give one"),
])
def test_bad_flags_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        config.parse(TrainConfig, argv, "ranking train", "")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flag", ["--query-split", "--gallery-split"])
def test_evaluation_refuses_the_unlabelled_split(flag):
    with pytest.raises(ConfigError, match=f"{flag} test: the test split is unlabelled"):
        config.parse(EvalConfig, [flag, "test"], "ranking evaluate", "")


def test_version_and_an_unknown_flag_on_the_command_line():
    """The real command: the one process test of a refusal's line and exit status 2 (the others run in-process)."""
    done = subprocess.run([sys.executable, "-m", "ranking", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"ranking (deep-ranking) {ranking.__version__}"
    done = subprocess.run([sys.executable, "-m", "ranking", "train", "--step", "40"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ranking train: error: unknown flag --step; did you mean --steps? (see ranking train --help)"]
