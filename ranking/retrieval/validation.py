"""Validation during training: the sharded retrieval evaluation of ``ranking evaluate`` run inside the trainer,
on all ranks with the same collectives, every ``eval_every`` steps.

The val split is the query set; the gallery is the train split, or a fixed subset of ``eval_gallery_per_class``
images of each class (chosen once by seed, the same on every rank and at every evaluation) so that it stays cheap.
The result is logged as ``val/<metric>`` at the training step; the trainer keeps ``checkpoints/best`` by
``eval_metric``.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ranking.core import distributed
from ranking.core.config import TrainConfig
from ranking.folders.shardformat import split_index
from ranking.learning import models
from ranking.retrieval import embed
from ranking.retrieval.metrics import METRICS, evaluate_retrieval

K = 30  # precision@k and hit@k, as `ranking evaluate` defaults to
VAL_PREFIX = "val/"  # retrieval of the val queries, in metrics.jsonl and W&B; `ranking evaluate` logs its val split so


def metric_keys(k: int, prefix: str = VAL_PREFIX) -> dict[str, str]:
    """Metric name (``retrieval.metrics.METRICS``) -> its logged key: ``val/precision@30``, ``val/knn1``, ..."""
    return {metric.name: prefix + metric.key.format(k=k) for metric in METRICS}


def gallery_subset(shards: str, per_class: int, seed: int, cache_dir: Path | None = None) -> frozenset[int] | None:
    """Ids of ``per_class`` train images of each class, chosen by ``seed``; None (the whole split) when 0."""
    if per_class <= 0:
        return None
    by_class: dict[int, list[int]] = defaultdict(list)
    for info in split_index(Path(shards), "train", cache_dir).values():
        by_class[info.label].append(info.id)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        chosen.update(rng.sample(ids, min(per_class, len(ids))))
    return frozenset(chosen)


@dataclass
class Validation:
    step: int
    values: dict[str, float]  # metric name (retrieval.metrics.METRICS) -> value
    seconds: float

    def record(self) -> dict[str, float]:
        """The metrics.jsonl / W&B entries: ``val/precision@30``, ``val/knn1``, ..., ``val/seconds``."""
        keys = metric_keys(K)
        return {**{keys[name]: value for name, value in self.values.items()}, f"{VAL_PREFIX}seconds": self.seconds}


class Validator:
    """Evaluates the model every ``cfg.eval_every`` steps; a collective: every rank calls ``run``."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, cache_dir: Path | None) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        with accelerator.main_process_first():  # rank 0 scans the train split's labels once, the others read its cache
            self.gallery_ids = gallery_subset(cfg.shards, cfg.eval_gallery_per_class, cfg.seed, cache_dir)
        self.spec = models.ModelSpec.of(cfg)  # the model is fed as `ranking evaluate` will feed it
        self.best: float | None = None  # the trainer restores it on resume

    def due(self, step: int) -> bool:
        return self.cfg.eval_every > 0 and step % self.cfg.eval_every == 0

    def run(self, net: nn.Module, step: int) -> Validation:
        """Embed val and the gallery with ``net`` (the unwrapped model) in eval mode; the caller restores train mode."""
        started = time.perf_counter()
        distributed.broadcast_buffers(net)  # every rank embeds with the model the checkpoint saves (rank 0's)
        with torch.no_grad():
            gallery, query = (
                embed.embed_split(
                    net,
                    self.accelerator,
                    self.cfg.shards,
                    split,
                    spec=self.spec,
                    batch_size=256,
                    workers=self.cfg.workers,
                    only_ids=only_ids,
                )
                for split, only_ids in (("train", self.gallery_ids), ("val", None))
            )
        metrics = evaluate_retrieval(query, gallery, k=K, triplets=0)
        values = {metric.name: getattr(metrics, metric.name) for metric in METRICS if metric.per_query}
        return Validation(step, values, time.perf_counter() - started)

    def improved(self, validation: Validation) -> bool:
        """Whether this is the best ``eval_metric`` so far (higher is better for every retrieval metric)."""
        value = validation.values[self.cfg.eval_metric]
        if self.best is None or value > self.best:
            self.best = value
            return True
        return False
