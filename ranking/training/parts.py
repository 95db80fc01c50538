"""What a run trains: the network, its prepared wrapper, the optimizer, the schedule and the objective, built in the
order that fixes the initial weights and the RNG streams after them (a refactor must not change a loss)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import cast

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.folders.shardformat import load_manifest
from ranking.learning import losses, models, optim


@dataclass
class TrainParts:
    net: models.EmbeddingNet  # the plain module: checkpoints save its weights, validation embeds with it
    model: nn.Module  # what a step calls: ``net`` prepared by Accelerate (DDP), compiled with --compile
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper, which knows about gradient accumulation and fp16
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step, not prepared
    objective: losses.DistributedLoss  # the loss's own parameters (proxy_anchor's proxies) are in the optimizer


def build_parts(cfg: TrainConfig, accelerator: Accelerator) -> TrainParts:
    """The same initial weights on every rank, then a dropout stream of its own on each (crops: ``DeviceAugment``'s
    generator)."""
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # pretrained weights are downloaded once, then read from the cache
        net = models.build_model(cfg)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    objective = losses.build_objective(cfg, len(load_manifest(cfg.shards)["classes"])).to(accelerator.device)
    optimizer = optim.build_optimizer(cfg, net, objective)
    scheduler = optim.build_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(net, optimizer)
    if cfg.compile:
        model = compiled(model, accelerator.device)
    set_seed(cfg.seed, device_specific=True)
    return TrainParts(net, model, optimizer, scheduler, objective)


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` of the prepared model (TorchInductor; the first steps pay for compiling), refused in one line
    where it cannot run: Inductor builds its kernels with a C compiler (C++ on the CPU, Triton's launchers on CUDA).
    Checkpoints keep saving the plain module's weights."""
    import shutil

    import torch._dynamo

    compilers = ("g++", "c++", "clang++") if device.type == "cpu" else ("cc", "gcc", "clang")
    if not torch._dynamo.is_dynamo_supported():
        raise RankingError(
            f"--compile: torch.compile is not supported with Python {sys.version.split()[0]} and "
            f"torch {torch.__version__}; run without --compile"
        )
    if not any(shutil.which(name) for name in compilers):
        raise RankingError(
            f"--compile: no C compiler found ({', '.join(compilers)}) for TorchInductor's "
            f"{device.type} kernels; install one or run without --compile"
        )
    return cast(nn.Module, torch.compile(model))
