"""Triplet miners: (anchor, positive, negative) row indices ``[T, 3]`` chosen from a batch's embeddings.

Each miner is called as ``miner(distances, positive, negative, margin)`` on the batch's squared distances and its
masks of valid positive and negative pairs; ``mine_triplets`` builds those and picks the miner by name (MINERS).
Anchors without a positive or without a negative in the batch yield no triplet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ranking.core.config import MinerName
from ranking.learning.distances import squared_distances


def batch_hard(distances: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """One triplet per anchor: its farthest positive and its closest negative."""
    anchors = (positive.any(dim=1) & negative.any(dim=1)).nonzero().squeeze(1)
    hardest_positive = distances.masked_fill(~positive, -float("inf")).argmax(dim=1)
    hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)
    return torch.stack([anchors, hardest_positive[anchors], hardest_negative[anchors]], dim=1)


def semihard(distances: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """FaceNet's: one triplet per (anchor, positive) pair, the closest negative farther than the positive but within
    the margin (``d_ap < d_an < d_ap + margin``); the closest negative when there is none such."""
    anchors, positives = (positive & negative.any(dim=1, keepdim=True)).nonzero().unbind(dim=1)
    d_ap = distances[anchors, positives][:, None]  # [pairs, 1]
    d_an = distances[anchors]  # [pairs, N]
    negatives = negative[anchors]
    in_margin = negatives & (d_an > d_ap) & (d_an < d_ap + margin)
    closest_semihard = d_an.masked_fill(~in_margin, float("inf")).argmin(dim=1)
    closest = d_an.masked_fill(~negatives, float("inf")).argmin(dim=1)
    chosen = torch.where(in_margin.any(dim=1), closest_semihard, closest)
    return torch.stack([anchors, positives, chosen], dim=1)


def all_triplets(distances: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Every valid triplet."""
    return (positive[:, :, None] & negative[:, None, :]).nonzero()


MINERS: dict[MinerName, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "semihard": semihard,
    "hard": batch_hard,
    "all": all_triplets,
}


@torch.no_grad()
def mine_triplets(embeddings: Tensor, labels: Tensor, strategy: MinerName, margin: float) -> Tensor:
    """``[T, 3]`` triplets of the batch by squared Euclidean distance, with the miner ``strategy``."""
    distances = squared_distances(embeddings, embeddings)
    labels = labels.to(embeddings.device)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    return MINERS[strategy](distances, positive, ~same, margin)
