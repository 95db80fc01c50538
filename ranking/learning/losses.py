"""Ranking losses, and the distributed wrapper that turns a batch's embeddings into the training objective.

A loss is called as ``loss(embeddings, labels, triplets) -> (loss, active_fraction)``; ``triplets`` is a ``[T, 3]``
LongTensor of (query, positive, negative) row indices into ``embeddings`` (Smooth-AP ranks every pair the labels
define and ignores them). ``active_fraction`` is a detached 0-dim tensor (no host sync): the share of triplets with
non-zero loss, or for Smooth-AP the share of (query, positive, negative) triples ranked wrongly. Distances and
similarities are computed in float32 whatever the autocast dtype of the embeddings.

``DistributedLoss`` owns what DDP needs around a loss (as pytorch-metric-learning's ``DistributedLossWrapper`` and
open_clip's ``ClipLoss``): the gather with gradient, the mining on the batch of all ranks, and the world-size
scaling, so the training step is "embed, loss, backward".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranking.core import distributed
from ranking.core.config import LossName, MinerName, TrainConfig
from ranking.learning.distances import paired_squared_distances
from ranking.learning.miners import mine_triplets


class TripletLoss(nn.Module):
    """Shared plumbing of the triplet losses: index the triplets, reduce the per-triplet losses."""

    uses_triplets = True

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def per_triplet(self, query: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor) -> tuple[Tensor, Tensor]:
        embeddings = embeddings.float()
        triplets = triplets.to(embeddings.device)
        if len(triplets) == 0:  # keep the graph connected so every DDP rank reduces the same gradients
            return embeddings.sum() * 0.0, embeddings.new_zeros(())
        query, positive, negative = embeddings[triplets].unbind(dim=1)
        losses = self.per_triplet(query, positive, negative)
        return losses.mean(), (losses > 0).float().mean().detach()


class HingeTripletLoss(TripletLoss):
    """The paper's loss: ``max(0, g + D(q, p) - D(q, n))`` with D the squared Euclidean distance and g the margin."""

    def per_triplet(self, query: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return F.relu(
            self.margin + paired_squared_distances(query, positive) - paired_squared_distances(query, negative)
        )


class TripletMarginLoss(TripletLoss):
    """``torch.nn.TripletMarginLoss`` (Euclidean distance, not squared), as the seeds trained."""

    def __init__(self, margin: float):
        super().__init__(margin)
        self.loss = nn.TripletMarginLoss(margin=margin, reduction="none")

    def per_triplet(self, query: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return self.loss(query, positive, negative)


class SmoothAPLoss(nn.Module):
    """Smooth-AP (Brown et al., ECCV 2020): ``1 - mean AP`` with the rank's step function replaced by a sigmoid.

    Every row with at least one positive in the batch is a query over all other rows (cosine similarity, as in the
    paper); its AP sums, over its positives p, rank of p among the positives / rank of p among all, and is
    normalised by the size of its positive set. Triplets are ignored: the loss uses every pair the labels define.
    Only (query, positive) pairs need a rank, so memory and time are O(pairs x N), not O(N^3).
    """

    uses_triplets = False

    def __init__(self, tau: float = 0.01):
        super().__init__()
        self.tau = tau

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = F.normalize(embeddings.float(), dim=1)
        labels = labels.to(features.device)
        n = len(labels)
        rows = torch.arange(n, device=features.device)
        positive = (labels[:, None] == labels[None, :]) & (rows[:, None] != rows[None, :])
        queries, positives = positive.nonzero().unbind(dim=1)
        if len(queries) == 0:
            return features.sum() * 0.0, features.new_zeros(())

        similarity = features @ features.T
        # diff[m, k] = s(q, k) - s(q, p) for the m-th (query q, positive p) pair: k ranks above p when positive
        diff = similarity[queries] - similarity[queries, positives][:, None]
        others = (rows[None, :] != queries[:, None]) & (rows[None, :] != positives[:, None])
        above = torch.sigmoid(diff / self.tau) * others
        rank_among_all = 1.0 + above.sum(dim=1)
        rank_among_positives = 1.0 + (above * positive[queries]).sum(dim=1)
        precision = rank_among_positives / rank_among_all

        positive_count = positive.sum(dim=1)
        average_precision = torch.zeros(n, device=features.device).index_add(0, queries, precision)
        has_positive = positive_count > 0
        loss = 1.0 - (average_precision[has_positive] / positive_count[has_positive]).mean()

        negative = ~(labels[:, None] == labels[None, :])
        misranked = ((diff > 0) & negative[queries]).sum()  # (query, positive, negative) in the wrong order
        return loss, (misranked / negative[queries].sum().clamp(min=1)).detach()


LOSSES: dict[LossName, Callable[[TrainConfig], nn.Module]] = {
    "hinge": lambda config: HingeTripletLoss(config.margin),
    "triplet_margin": lambda config: TripletMarginLoss(config.margin),
    "smooth_ap": lambda config: SmoothAPLoss(config.smooth_ap_tau),
}


def build_loss(config: TrainConfig) -> nn.Module:
    return LOSSES[config.loss](config)


class StepLoss(NamedTuple):
    objective: Tensor  # what to back-propagate
    loss: Tensor  # the loss value, detached, for logging
    active_fraction: Tensor  # share of triplets with non-zero loss, detached


class DistributedLoss(nn.Module):
    """The objective of one step from this rank's embeddings.

    Triplets given (paper sampler): each rank's own triplets and mean loss; with equal-sized batches DDP's gradient
    average is the gradient of the concatenated batch. Triplets not given (batch sampler): the embeddings and labels
    of all ranks are gathered (this rank's rows keep their gradient), triplets are mined on the whole batch, and the
    loss is identical on every rank; each rank's gradient reaches only its own rows, so the objective is scaled by
    the world size to make DDP's average equal the concatenated batch's gradient.
    """

    def __init__(self, loss: nn.Module, miner: MinerName, margin: float):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor | None = None) -> StepLoss:
        if triplets is not None:
            loss, active_fraction = self.loss(embeddings, labels, triplets)
            return StepLoss(loss, loss.detach(), active_fraction)
        all_embeddings = distributed.all_gather_with_grad(embeddings)
        all_labels = distributed.all_gather(labels)
        mined = mine_triplets(all_embeddings, all_labels, self.miner, self.margin) if self.loss.uses_triplets else None
        loss, active_fraction = self.loss(all_embeddings, all_labels, mined)
        return StepLoss(loss * distributed.world_size(), loss.detach(), active_fraction)


def build_objective(config: TrainConfig) -> DistributedLoss:
    return DistributedLoss(build_loss(config), config.miner, config.margin)
