"""Ranking losses, all called as ``loss(embeddings, labels, triplets) -> (loss, active_fraction)``.

``triplets`` is a ``[T, 3]`` LongTensor of (query, positive, negative) row indices into ``embeddings``, or None:
then the triplet losses mine their own triplets from the batch with the configured miner (batch sampler).
``active_fraction`` is a detached 0-dim tensor (no host sync; the trainer calls ``.item()`` when it logs): the share
of triplets with non-zero loss, or for Smooth-AP the share of (query, positive, negative) triples ranked wrongly.
Distances and similarities are computed in float32 whatever the autocast dtype of the embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranking.config import TrainConfig
from ranking.sampling import mine_triplets


def build_loss(config: TrainConfig) -> nn.Module:
    if config.loss == "hinge":
        return HingeTripletLoss(config.margin, config.miner)
    if config.loss == "triplet_margin":
        return TripletMarginLoss(config.margin, config.miner)
    if config.loss == "smooth_ap":
        return SmoothAPLoss(config.smooth_ap_tau)
    raise ValueError(f"unknown loss {config.loss!r}")  # config.validate() rejects it first


class _TripletLoss(nn.Module):
    """Shared plumbing: mine when no triplets are given, then reduce the per-triplet losses."""

    def __init__(self, margin: float, miner: str):
        super().__init__()
        self.margin = margin
        self.miner = miner

    def per_triplet(self, query: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        embeddings = embeddings.float()
        if triplets is None:
            triplets = mine_triplets(embeddings, labels, self.miner, self.margin)
        triplets = triplets.to(embeddings.device)
        if len(triplets) == 0:  # keep the graph connected so every DDP rank reduces the same gradients
            return embeddings.sum() * 0.0, embeddings.new_zeros(())
        query, positive, negative = embeddings[triplets].unbind(dim=1)
        losses = self.per_triplet(query, positive, negative)
        return losses.mean(), (losses > 0).float().mean().detach()


class HingeTripletLoss(_TripletLoss):
    """The paper's loss: ``max(0, g + D(q, p) - D(q, n))`` with D the squared Euclidean distance and g the margin."""

    def per_triplet(self, query: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        d_pos = (query - positive).pow(2).sum(dim=1)
        d_neg = (query - negative).pow(2).sum(dim=1)
        return F.relu(self.margin + d_pos - d_neg)


class TripletMarginLoss(_TripletLoss):
    """``torch.nn.TripletMarginLoss`` (Euclidean distance, not squared), as the seeds trained."""

    def __init__(self, margin: float, miner: str):
        super().__init__(margin, miner)
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
