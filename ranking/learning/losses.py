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
from ranking.core.errors import RankingError
from ranking.learning.distances import paired_squared_distances
from ranking.learning.memory import CrossBatchMemory
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


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarities, with its pair mining.

    For each anchor i (a row of the batch) against the candidates (the batch's other rows, and the cross-batch
    memory when one is given): a negative n is kept when ``S_in > min_p S_ip - epsilon`` (harder than the anchor's
    easiest positive), a positive p when ``S_ip < max_n S_in + epsilon``; then
    ``1/alpha log(1 + sum_p exp(-alpha (S_ip - base))) + 1/beta log(1 + sum_n exp(beta (S_in - base)))``, averaged
    over the anchors with at least one positive and one negative. Triplets are ignored: the loss weights every pair.
    ``active_fraction`` is the share of the valid pairs the mining kept.
    """

    uses_triplets = False

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        triplets: Tensor | None = None,
        memory: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        features = F.normalize(embeddings.float(), dim=1)
        labels = labels.to(features.device)
        n = len(labels)
        candidates, candidate_labels = features, labels
        if memory is not None and len(memory[1]) > 0:  # constants: the gradient reaches the batch's rows only
            candidates = torch.cat([features, F.normalize(memory[0].detach().float(), dim=1).to(features.device)])
            candidate_labels = torch.cat([labels, memory[1].to(features.device)])
        similarity = features @ candidates.T  # [n, n + memory]
        same = labels[:, None] == candidate_labels[None, :]
        not_self = torch.ones_like(same)
        not_self[:, :n] &= ~torch.eye(n, dtype=torch.bool, device=features.device)
        positive, negative = same & not_self, ~same
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not valid.any():
            return features.sum() * 0.0, features.new_zeros(())

        with torch.no_grad():
            hardest_positive = similarity.masked_fill(~positive, float("inf")).amin(dim=1, keepdim=True)
            hardest_negative = similarity.masked_fill(~negative, -float("inf")).amax(dim=1, keepdim=True)
            kept_negative = negative & (similarity > hardest_positive - self.epsilon)
            kept_positive = positive & (similarity < hardest_negative + self.epsilon)
        positive_loss = log1p_sum_exp(-self.alpha * (similarity - self.base), kept_positive) / self.alpha
        negative_loss = log1p_sum_exp(self.beta * (similarity - self.base), kept_negative) / self.beta
        loss = (positive_loss + negative_loss)[valid].mean()
        kept = (kept_positive | kept_negative)[valid].sum()
        return loss, (kept / (positive | negative)[valid].sum().clamp(min=1)).detach()


class ProxyAnchorLoss(nn.Module):
    """Proxy-anchor loss (Kim et al., CVPR 2020): one learned proxy per class, each an anchor against the batch.

    With s(x, p) the cosine similarity of an embedding and a proxy,
    ``1/|P+| sum_{p in P+} log(1 + sum_{x of p's class} exp(-alpha (s(x, p) - delta)))
    + 1/|P| sum_{p in P} log(1 + sum_{x of other classes} exp(alpha (s(x, p) + delta)))``, P+ the proxies of the
    classes in the batch. Every image is compared with every class, not only with the batch's 16 classes. The
    proxies are this module's parameters (checkpointed with the objective, in the optimizer at
    ``lr * proxy_lr_scale``). ``active_fraction`` is the share of rows whose own class's proxy is not their most
    similar one.
    """

    uses_triplets = False

    def __init__(self, num_classes: int, embed_dim: int, alpha: float = 32.0, delta: float = 0.1, seed: int = 0):
        super().__init__()
        if num_classes < 2:
            raise RankingError(f"loss proxy_anchor needs at least 2 classes in the shards, not {num_classes}")
        self.alpha, self.delta = alpha, delta
        self.proxies = nn.Parameter(torch.empty(num_classes, embed_dim))
        # the paper's initialisation, from a generator of its own: building the loss draws nothing from the run's RNG
        nn.init.kaiming_normal_(self.proxies, mode="fan_out", generator=torch.Generator().manual_seed(seed))

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = F.normalize(embeddings.float(), dim=1)
        proxies = F.normalize(self.proxies.float(), dim=1).to(features.device)
        labels = labels.to(features.device)
        similarity = (features @ proxies.T).T  # [classes, n]: a row per proxy
        own = torch.zeros_like(similarity, dtype=torch.bool)
        own[labels, torch.arange(len(labels), device=labels.device)] = True
        in_batch = own.any(dim=1)
        positive = log1p_sum_exp(-self.alpha * (similarity - self.delta), own)[in_batch].sum() / in_batch.sum()
        negative = log1p_sum_exp(self.alpha * (similarity + self.delta), ~own).sum() / len(proxies)
        misplaced = (similarity.argmax(dim=0) != labels).float().mean()
        return positive + negative, misplaced.detach()


def log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum exp(x))`` over each row's masked entries, stably (0 for a row with none)."""
    x = x.masked_fill(~mask, -float("inf"))
    return torch.logsumexp(torch.cat([x, x.new_zeros(len(x), 1)], dim=1), dim=1)


LOSSES: dict[LossName, Callable[[TrainConfig, int], nn.Module]] = {
    "hinge": lambda config, classes: HingeTripletLoss(config.margin),
    "triplet_margin": lambda config, classes: TripletMarginLoss(config.margin),
    "smooth_ap": lambda config, classes: SmoothAPLoss(config.smooth_ap_tau),
    "multi_similarity": lambda config, classes: MultiSimilarityLoss(
        config.ms_alpha, config.ms_beta, config.ms_base, config.ms_epsilon
    ),
    "proxy_anchor": lambda config, classes: ProxyAnchorLoss(
        classes, config.embed_dim, config.proxy_alpha, config.proxy_delta, config.seed
    ),
}


def build_loss(config: TrainConfig, num_classes: int = 0) -> nn.Module:
    """The loss ``config.loss`` names; ``num_classes`` (the shards' classes) sizes a proxy loss's proxies."""
    return LOSSES[config.loss](config, num_classes)


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
    the world size to make DDP's average equal the concatenated batch's gradient. With a cross-batch ``memory``
    (a pair loss only), the gathered batch is compared with the memory too, then enqueued in it: the memory is the
    same on every rank, and its rows are constants. A loss with parameters of its own (proxy_anchor's proxies)
    computes their gradient from the whole gathered batch on every rank, the same on each: the world-size scaling is
    undone for them by a gradient hook, so they need no all-reduce (they are not part of the DDP model).
    """

    def __init__(self, loss: nn.Module, miner: MinerName, margin: float, memory: CrossBatchMemory | None = None):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.margin = margin
        self.memory = memory
        for parameter in loss.parameters():
            parameter.register_hook(lambda grad: grad / distributed.world_size())

    def forward(self, embeddings: Tensor, labels: Tensor, triplets: Tensor | None = None) -> StepLoss:
        if triplets is not None:
            loss, active_fraction = self.loss(embeddings, labels, triplets)
            return StepLoss(loss, loss.detach(), active_fraction)
        all_embeddings = distributed.all_gather_with_grad(embeddings)
        all_labels = distributed.all_gather(labels)
        mined = mine_triplets(all_embeddings, all_labels, self.miner, self.margin) if self.loss.uses_triplets else None
        if self.memory is None:
            loss, active_fraction = self.loss(all_embeddings, all_labels, mined)
        else:
            loss, active_fraction = self.loss(all_embeddings, all_labels, mined, memory=self.memory.contents())
            self.memory.enqueue(all_embeddings, all_labels)
        return StepLoss(loss * distributed.world_size(), loss.detach(), active_fraction)


def build_objective(config: TrainConfig, num_classes: int = 0) -> DistributedLoss:
    memory = CrossBatchMemory(config.memory_size, config.memory_start_images) if config.memory_size else None
    return DistributedLoss(build_loss(config, num_classes), config.miner, config.margin, memory)
