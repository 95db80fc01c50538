"""The typed configs: defaults, shipped YAML files, precedence, and one-line errors for bad files and flags."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from typing import Literal

import pytest

import ranking
from harness import REPO, SMOKE, cli_refusal
from ranking import cli
from ranking.cli import SUBCOMMANDS
from ranking.core import flags
from ranking.core.config import EvalConfig, TrainConfig
from ranking.core.errors import ConfigError

CONFIGS = REPO / "configs"


def test_the_best_recipe_is_the_default_and_default_yaml_restates_it():
    assert flags.build(TrainConfig, str(CONFIGS / "default.yaml")) == TrainConfig()
    best = TrainConfig()
    assert (
        best.backbone,
        best.pretrained,
        best.image_size,
        best.crop_scale,
        best.embed_dim,
        best.sampler,
        best.miner,
        best.loss,
        best.normalize,
        best.optimizer,
        best.schedule,
    ) == ("efficientnet_lite0", True, 176, 1.0, 1024, "batch", "semihard", "multi_similarity", True, "adamw", "cosine")
    assert 0 < best.trunk_lr_scale < 1 and best.freeze_bn_stats and best.frozen_stages > 0


def test_named_configs_set_every_key_the_defaults_would_get_wrong_for_them():
    seed = flags.build(TrainConfig, str(CONFIGS / "seed.yaml"))
    assert (
        seed.sampler,
        seed.pos_per_query,
        seed.neg_per_query,
        seed.loss,
        seed.margin,
        seed.embed_dim,
        seed.normalize,
    ) == ("paper", 1, 1, "triplet_margin", 1.0, 4096, False)
    assert (
        seed.optimizer,
        seed.lr,
        seed.momentum,
        seed.nesterov,
        seed.weight_decay,
        seed.schedule,
        seed.warmup_steps,
        seed.grad_clip,
    ) == ("sgd", 1e-3, 0.9, True, 1e-5, "constant", 0, 0.0)
    # the seeds fine-tuned the whole trunk at one rate with BatchNorm statistics following the batches
    assert (seed.trunk_lr_scale, seed.freeze_bn_stats, seed.frozen_stages) == (1.0, False, 0)
    paper = flags.build(TrainConfig, str(CONFIGS / "paper.yaml"))
    assert (paper.backbone, paper.sampler, paper.loss, paper.frozen_stages) == ("multiscale", "paper", "hinge", 0)
    smoke = flags.build(TrainConfig, str(SMOKE))
    assert (smoke.backbone, smoke.pretrained, smoke.freeze_bn_stats, smoke.frozen_stages) == (
        "resnet18",
        False,
        False,
        0,
    )


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-2\nembed-dim: 64\nwandb_tags: one\n")  # 1e-2 is a string to YAML; dashes allowed
    cfg = flags.build(TrainConfig, str(path), {"embed_dim": 32, "steps": None})
    assert (cfg.lr, cfg.embed_dim, cfg.steps, cfg.wandb_tags) == (0.01, 32, TrainConfig().steps, ["one"])
    cfg = flags.parse(TrainConfig, ["--config", str(path), "--no-normalize", "--wandb-tags", "a", "b"], "t", "")
    assert (cfg.lr, cfg.embed_dim, cfg.normalize, cfg.wandb_tags) == (0.01, 64, False, ["a", "b"])


def test_saved_config_reloads_equal(tmp_path):
    cfg = flags.build(TrainConfig, str(SMOKE), {"lr": 3e-4, "wandb_tags": ["x"]})
    flags.save(cfg, tmp_path / "config.yaml")
    assert flags.build(TrainConfig, str(tmp_path / "config.yaml")) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: [1, 2]\n", "lr must be float"),
        ("learning_rate: 0.1\n", "unknown key 'learning_rate' for TrainConfig"),
        ("normalize: yes please\n", "normalize must be true or false"),
        ("- lr\n", "expected a mapping of config keys, got list"),
        ("lr: [\n", "not valid YAML"),
        ("sampler: random\n", "sampler must be one of batch, paper; got 'random'"),
        ("frozen_stages: -1\n", "frozen_stages must be at least 0; got -1"),
        ("samples_per_class: 1\n", "samples_per_class must be at least 2"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        flags.build(TrainConfig, str(path))
    assert "\n" not in str(error.value)


def test_no_pretrained_alone_turns_off_what_only_a_pretrained_trunk_keeps(tmp_path):
    cfg = flags.parse(TrainConfig, ["--no-pretrained"], "ranking train", "")
    assert (cfg.pretrained, cfg.freeze_bn_stats, cfg.frozen_stages) == (False, False, 0)
    path = tmp_path / "random.yaml"
    path.write_text("pretrained: false\n")
    assert flags.build(TrainConfig, path).frozen_stages == 0  # the same from a config file
    # given explicitly, they are refused rather than silently changed
    with pytest.raises(ConfigError, match=r"pretrained is false, but .* given explicitly, .* add --frozen-stages 0$"):
        flags.parse(TrainConfig, ["--no-pretrained", "--frozen-stages", "2"], "ranking train", "")
    with pytest.raises(ConfigError, match=r"add --no-freeze-bn-stats$"):
        flags.build(TrainConfig, overrides={"pretrained": False, "freeze_bn_stats": True})


def test_eval_config_rejects_k_below_one():
    with pytest.raises(ConfigError, match="k must be at least 1; got 0"):
        flags.build(EvalConfig, overrides={"k": 0})


def test_the_cli_reports_a_bad_config_in_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    line = cli_refusal(capsys, "train", "--config", str(missing))
    assert line == f"ranking train: error: {missing}: config file not found"


# ------------------------------------------------------------------------------------------- flags and help


def help_text(cls: type, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        flags.parse(cls, ["--help"], "ranking x", "")
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_flag_with_its_comment_default_choices_and_section(capsys):
    text = help_text(TrainConfig, capsys)
    for section in ("data:", "triplet sampling:", "model:", "loss:", "optimisation:", "run:", "Weights & Biases:"):
        assert f"\n{section}\n" in text, section
    flat = " ".join(text.split())
    assert "--lr FLOAT the learning rate of the head" in flat and "(default: 0.001)" in flat
    assert '--sampler {batch,paper} "batch": P x K batches with online mining' in flat
    assert "--pretrained, --no-pretrained ImageNet weights" in flat and "(default: true)" in flat
    assert "--mixed-precision {no,bf16,fp16} unset: Accelerate decides" in flat and "(default: unset)" in flat
    docs, sections = flags.field_docs(TrainConfig)
    for cls in (TrainConfig, EvalConfig):
        docs, _ = flags.field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__}: add a comment beside {undocumented}"
    assert sections["embed_dim"] == "model" and sections["wandb_tags"] == "Weights & Biases"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--step", "40"], "unknown flag --step; did you mean --steps?"),  # no abbreviations
        (["--stesp", "40"], "unknown flag --stesp; did you mean --steps?"),
        (["--embed-dimm", "8"], "unknown flag --embed-dimm; did you mean --embed-dim?"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--run-dir", ""], "run_dir must not be empty"),
        (["--shards", " "], "shards must not be empty"),
        (["--resume", "latest", "--overwrite"], "give one"),
        (["--crop-scale", "0"], "crop_scale must be greater than 0; got 0.0"),
        (["--crop-scale", "1.5"], "crop_scale must be at most 1; got 1.5"),
    ],
)
def test_bad_flags_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        flags.parse(TrainConfig, argv, "ranking train", "")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flag", ["--query-split", "--gallery-split"])
def test_evaluation_refuses_the_unlabelled_split(flag):
    with pytest.raises(ConfigError, match=f"{flag} test: the test split is unlabelled"):
        flags.parse(EvalConfig, [flag, "test"], "ranking evaluate", "")


def test_version_and_an_unknown_flag_on_the_command_line():
    """The real command: the one process test of a refusal's line and exit status 2 (the others run in-process)."""
    done = subprocess.run([sys.executable, "-m", "ranking", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"ranking (deep-ranking) {ranking.__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "ranking", "train", "--step", "40"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ranking train: error: unknown flag --step; did you mean --steps? (see ranking train --help)"
    ]


# ------------------------------------------------------------------------------ every stage's command line


def stage_help(name: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Each option's help entry (its first long flag -> the entry's text on one line), from argparse's layout."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = next((word.rstrip(",") for word in line.split() if word.startswith("--")), line.split()[0])
            entries[current] = line
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def stage_error(name: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([name, *argv])
    assert done.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_stage_has_help_by_section_with_each_flags_default(name, capsys, monkeypatch):
    text = stage_help(name, capsys, monkeypatch)
    headings = {line[:-1] for line in text.splitlines() if re.fullmatch(r"[A-Za-z&][^:]*:", line)}
    assert headings - {"options", "positional arguments"}, f"ranking {name} --help has no sections: {headings}"
    entries = help_entries(text)
    assert len(entries) > 1
    for flag, entry in entries.items():
        if flag not in ("-h", "--help", "--config"):
            assert "(default: " in entry or "(required)" in entry, f"ranking {name}: {entry}"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_stage_refuses_abbreviations_and_names_the_nearest_flag(name, capsys, monkeypatch):
    entries = help_entries(stage_help(name, capsys, monkeypatch))
    flag = max((f for f in entries if f.startswith("--") and f not in ("--help", "--config")), key=len)
    short = flag[:-1]  # what argparse's default allow_abbrev would take for the flag
    assert short not in entries
    assert stage_error(name, [short, "1"], capsys) == (
        f"ranking {name}: error: unknown flag {short}; did you mean {flag}? (see ranking {name} --help)"
    )
    misspelt = "--" + flag[3] + flag[2] + flag[4:]  # its first two letters swapped
    assert misspelt not in entries
    assert f"unknown flag {misspelt}; did you mean {flag}?" in stage_error(name, [f"{misspelt}=1"], capsys)


def stage_configs() -> dict[str, type]:
    from ranking import compare, dedup, demo, export, index, report, search, serve, shards, synth

    return {
        "train": TrainConfig,
        "evaluate": EvalConfig,
        "compare": compare.CompareConfig,
        "dedup": dedup.DedupConfig,
        "demo": demo.DemoConfig,
        "export": export.ExportConfig,
        "index": index.IndexConfig,
        "report": report.ReportConfig,
        "search": search.SearchConfig,
        "serve": serve.ServeConfig,
        "shards": shards.ShardsConfig,
        "synth": synth.SynthConfig,
    }


def test_stage_configs_cover_every_subcommand():
    assert set(stage_configs()) == set(SUBCOMMANDS)


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every `ranking STAGE ...` and `-m ranking.STAGE ...` line of README.md's code blocks: (stage, its arguments)."""
    found, in_code = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.search(r"(?:^|\s|/)(?:ranking |-m ranking\.)(\w+)(.*)", line) if in_code else None
        if match and match[1] in SUBCOMMANDS:
            found.append((match[1], shlex.split(match[2], comments=True)))
    return found


@pytest.mark.parametrize("stage,argv", readme_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_the_readme_command_lines_parse(stage, argv):
    assert flags.parse(stage_configs()[stage], argv, f"ranking {stage}", "")


def test_readme_shows_the_main_stages():
    assert {"shards", "train", "evaluate", "report", "search", "index", "export"} <= {s for s, _ in readme_commands()}


# ------------------------------------------------------------------------------ the engine: positional fields


@dataclasses.dataclass
class Toy:
    # inputs
    sources: list[str] = dataclasses.field(metadata={"positional": True, "metavar": "SOURCE"})  # what to read
    format: Literal["a", "b"]  # the format
    label: str = dataclasses.field(default="", metadata={"positional": True})  # an optional name

    # knobs
    max_size: int = 3  # how many
    fast: bool = False  # go fast


def test_positional_fields_required_fields_and_the_usage(capsys):
    toy = flags.parse(Toy, ["x", "y", "--format", "b", "--max-size", "4"], "toy", "", config_file=False)
    assert toy == Toy(sources=["x", "y"], format="b", max_size=4)
    # as a W&B sweep agent writes flags
    toy = flags.parse(Toy, ["--format=a", "x", "--max_size=5", "--fast=True"], "toy", "", config_file=False)
    assert (toy.sources, toy.max_size, toy.fast) == (["x"], 5, True)
    with pytest.raises(ConfigError, match=re.escape("the following arguments are required: --format (see toy")):
        flags.parse(Toy, ["x"], "toy", "", config_file=False)
    with pytest.raises(ConfigError, match="the following arguments are required: SOURCE"):
        flags.parse(Toy, ["--format", "a"], "toy", "", config_file=False)
    # a misspelt flag is named before the missing positional argument
    with pytest.raises(ConfigError, match=re.escape("unknown flag --max-sise; did you mean --max-size?")):
        flags.parse(Toy, ["--max-sise", "4"], "toy", "", config_file=False)
    with pytest.raises(SystemExit):
        flags.parse(Toy, ["--help"], "toy", "", config_file=False)
    text = capsys.readouterr().out
    assert text.startswith("usage: toy SOURCE [SOURCE ...] [LABEL] --format FORMAT [--FLAG VALUE ...]\n")
    assert "\ninputs:\n" in text and "\nknobs:\n" in text and "--config" not in text
    assert "(required)" in help_entries(text)["--format"]


def test_a_config_file_may_give_what_is_required(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("format: b\nmax_size: 7\n")
    toy = flags.parse(Toy, ["--config", str(path), "x", "--max-size", "8"], "toy", "")
    assert (toy.sources, toy.format, toy.max_size) == (["x"], "b", 8)
    path.write_text("max_size: 7\n")
    with pytest.raises(ConfigError, match="Toy: missing --format"):
        flags.parse(Toy, ["--config", str(path), "x"], "toy", "")
