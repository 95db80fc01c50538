"""Optimizers and learning-rate schedules by name (OPTIMIZERS, SCHEDULES), built from a TrainConfig."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ranking.core.config import OptimizerName, ScheduleName, TrainConfig
from ranking.learning.models import EmbeddingNet

OPTIMIZERS: dict[OptimizerName, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    ),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES: dict[ScheduleName, Callable[[float], float]] = {
    "cosine": cosine,
    "constant": lambda progress: 1.0,
}


def build_optimizer(cfg: TrainConfig, model: EmbeddingNet, objective: nn.Module | None = None) -> torch.optim.Optimizer:
    """The model's groups (head, trunk) and, for a loss with parameters (proxy_anchor), a "proxies" group at
    ``lr * proxy_lr_scale``."""
    groups = model.parameter_groups(cfg.lr, cfg.trunk_lr_scale, cfg.frozen_stages)
    own = [p for p in objective.parameters() if p.requires_grad] if objective is not None else []
    if own:
        groups.append({"params": own, "lr": cfg.lr * cfg.proxy_lr_scale, "name": "proxies"})
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then the schedule's decay from 1 (``cosine``: to zero at ``steps``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return SCHEDULES[cfg.schedule]((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Stepped once per optimizer step by the trainer; not given to ``accelerate.prepare``, whose scheduler wrapper
    steps once per process per optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
