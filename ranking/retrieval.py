"""Exact nearest-neighbour retrieval and its metrics, in chunks of queries, split over ranks.

Distances are squared Euclidean, ``||q||^2 + ||g||^2 - 2 q.g`` (``2 - 2 q.g`` for unit-norm features), computed for
``chunk_size`` queries against the whole gallery at a time, so memory is bounded by ``chunk_size x gallery`` and the
``queries x gallery`` matrix never exists. The top-k search holds one float32 block (4 bytes x chunk x gallery); the
evaluation sorts each block in full (mAP needs the whole ranking) and peaks near 20 bytes x chunk x gallery.

Distributed evaluation: every rank holds the full query and gallery sets (after the embedding gather), takes a
contiguous block of the queries, and computes per-query quantities for its block. One ``all_reduce`` of their
float64 sums (and of the triplet counts) gives every rank the same metrics; nothing runs on rank 0 alone.

Conventions, shared by every rank so that they agree:
- Ties: the gallery is ordered by id and the ranking is a stable sort of the distances, so equal distances are
  ranked by gallery id.
- Train against train: the query itself (same id) is removed from its own ranking.
- A query with no relevant gallery item has average precision 0 (it still counts as a query).
- ``k`` larger than the ranking is clipped to the ranking's length.
- The precision-recall curve is macro-averaged: at each recall level ``r`` a query's interpolated precision is the
  highest precision at any rank where its recall is at least ``r``; the curve is the mean over queries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ranking.errors import RankingError


@dataclass(frozen=True)
class EmbeddingSet:
    """Embeddings of one split with their sample ids and labels, rows sorted by id."""

    embeddings: torch.Tensor  # [N, D]
    ids: torch.Tensor  # [N] long
    labels: torch.Tensor  # [N] long


@dataclass
class RetrievalMetrics:
    precision_at_k: float
    knn1_accuracy: float
    hit_at_k: float
    map: float
    map_at_r: float
    triplet_accuracy: float
    queries: int
    recall_levels: list[float]
    pr_precision: list[float]

    def summary(self) -> dict:
        """The per-split entry of metrics.json (the PR curve is stored separately)."""
        values = asdict(self)
        del values["recall_levels"], values["pr_precision"]
        return values


# ---------------------------------------------------------------------------------------------------------------
# distances and top-k


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms squared, in float32, without materialising ``x ** 2`` (the gallery can be gigabytes)."""
    return torch.linalg.vector_norm(x.float(), dim=1).square()


def squared_distances(queries: torch.Tensor, gallery: torch.Tensor, gallery_sq_norms: torch.Tensor) -> torch.Tensor:
    """[Q, G] squared Euclidean distances through one matrix product, in float32, clamped at 0."""
    queries = queries.float()
    distances = queries @ gallery.float().T
    distances.mul_(-2).add_(gallery_sq_norms).add_(squared_norms(queries)[:, None])
    return distances.clamp_min_(0)


def nearest_neighbors(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest gallery rows of every query: (squared distances [Q, k], gallery indices [Q, k]), nearest first.

    ``topk`` does not promise an order among equal distances; the evaluation uses a stable full sort instead.
    """
    k = min(k, gallery.shape[0])
    gallery_sq_norms = squared_norms(gallery)
    values, indices = [], []
    for chunk in queries.split(chunk_size):
        distances = squared_distances(chunk, gallery, gallery_sq_norms)
        top = distances.topk(k, dim=1, largest=False, sorted=True)
        del distances  # free this block before the next one is allocated: one block alive at a time
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        return queries.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(values), torch.cat(indices)


# ---------------------------------------------------------------------------------------------------------------
# per-query metrics of one chunk


def ranked_relevance(query_chunk: EmbeddingSet, gallery: EmbeddingSet, gallery_sq_norms: torch.Tensor,
                     exclude_self: bool) -> torch.Tensor:
    """[C, L] bool: whether each gallery item, in ranked order, shares the query's label.

    L is the gallery size, minus one when the query itself is excluded (it is pushed to the end, then cut off).
    """
    distances = squared_distances(query_chunk.embeddings, gallery.embeddings, gallery_sq_norms)
    if exclude_self:
        self_column = torch.searchsorted(gallery.ids, query_chunk.ids).clamp_max(len(gallery.ids) - 1)
        if not bool((gallery.ids[self_column] == query_chunk.ids).all()):
            raise ValueError("exclude_self needs every query id in the gallery")
        distances.scatter_(1, self_column[:, None], float("inf"))
    order = distances.sort(dim=1, stable=True).indices
    del distances
    if exclude_self:
        order = order[:, :-1]
    return gallery.labels[order] == query_chunk.labels[:, None]


def per_query_metrics(relevant: torch.Tensor, k: int, recall_levels: torch.Tensor) -> torch.Tensor:
    """[C, 5 + P] float64 rows: precision@k, kNN-1, hit@k, AP, AP@R, interpolated precision at each recall level."""
    length = relevant.shape[1]
    k = min(k, length)
    hits = relevant.cumsum(1, dtype=torch.int32)  # relevant items among the first i + 1
    n_relevant = hits[:, -1]  # R
    safe_r = n_relevant.clamp_min(1)
    ranks = torch.arange(1, length + 1, device=relevant.device)
    relevant_precision = (hits / ranks).mul_(relevant)  # precision at each relevant item, zero elsewhere

    precision_at_k = hits[:, k - 1] / k
    knn1 = relevant[:, 0].double()
    hit_at_k = (hits[:, k - 1] > 0).double()
    average_precision = relevant_precision.sum(1, dtype=torch.float64) / safe_r

    # Interpolated precision at recall r: the best precision from the m-th relevant item on, m = ceil(r * R).
    best_from = relevant_precision.flip(1).cummax(1).values.flip(1)
    needed = (recall_levels.double()[None, :] * n_relevant[:, None] - 1e-9).ceil().clamp_min(1).int()
    position = torch.searchsorted(hits, needed.contiguous()).clamp_max(length - 1)
    interpolated = best_from.gather(1, position).double() * (n_relevant > 0)[:, None]
    del best_from

    within_r = ranks[None, :] <= n_relevant[:, None]
    ap_at_r = relevant_precision.mul_(within_r).sum(1, dtype=torch.float64) / safe_r

    columns = [precision_at_k.double(), knn1, hit_at_k, average_precision, ap_at_r]
    return torch.cat([torch.stack(columns, 1), interpolated], 1)


# ---------------------------------------------------------------------------------------------------------------
# triplets


def sample_triplets(query_labels: torch.Tensor, gallery_labels: torch.Tensor, count: int, seed: int,
                    exclude_self: bool) -> torch.Tensor:
    """[T, 3] (query index, positive gallery index, negative gallery index), the same on every rank for a seed.

    Queries are drawn uniformly among those with at least one positive and one negative in the gallery; the
    positive uniformly among the gallery items of the query's label (not the query itself when ``exclude_self``:
    query i is then gallery item i), the negative uniformly among the others.
    """
    query_labels, gallery_labels = query_labels.cpu(), gallery_labels.cpu()
    if count < 1 or len(query_labels) == 0 or len(gallery_labels) == 0:
        return torch.zeros(0, 3, dtype=torch.long)
    n_classes = max(int(max(query_labels.max(), gallery_labels.max())) + 1, 1)
    by_label = gallery_labels.argsort(stable=True)  # unlabelled (-1) first, then one block per class
    class_count = torch.bincount(gallery_labels[gallery_labels >= 0], minlength=n_classes)
    class_start = class_count.cumsum(0) - class_count + int((gallery_labels < 0).sum())

    label = query_labels.clamp_min(0)
    n_positives = class_count[label] - int(exclude_self)
    n_negatives = len(gallery_labels) - class_count[label]
    usable = ((query_labels >= 0) & (n_positives > 0) & (n_negatives > 0)).nonzero().squeeze(1)
    if len(usable) == 0:
        return torch.zeros(0, 3, dtype=torch.long)

    generator = torch.Generator().manual_seed(seed)
    queries = usable[torch.randint(len(usable), (count,), generator=generator)]
    u_positive = torch.rand(count, generator=generator, dtype=torch.float64)
    u_negative = torch.rand(count, generator=generator, dtype=torch.float64)
    start, size = class_start[query_labels[queries]], class_count[query_labels[queries]]

    positive_slot = (u_positive * n_positives[queries]).long()
    if exclude_self:  # skip the query's own slot in its class block
        own_slot = by_label.argsort()[queries] - start
        positive_slot += (positive_slot >= own_slot).long()
    positive = by_label[start + positive_slot]

    negative_slot = (u_negative * n_negatives[queries]).long()
    negative_slot += (negative_slot >= start).long() * size  # skip the query's class block
    negative = by_label[negative_slot]
    return torch.stack([queries, positive, negative], 1)


def correct_triplets(queries: torch.Tensor, gallery: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
    """Number of triplets with D(q, p) < D(q, n), as a 0-d float64 tensor."""
    q = queries[triplets[:, 0]].float()
    d_pos = (q - gallery[triplets[:, 1]].float()).pow(2).sum(1)
    d_neg = (q - gallery[triplets[:, 2]].float()).pow(2).sum(1)
    return (d_pos < d_neg).double().sum()


# ---------------------------------------------------------------------------------------------------------------
# the whole evaluation of one split


def distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_retrieval(query: EmbeddingSet, gallery: EmbeddingSet, *, k: int = 30, chunk_size: int = 1024,
                       pr_points: int = 50, triplets: int = 10000, seed: int = 0,
                       exclude_self: bool = False) -> RetrievalMetrics:
    """Retrieval metrics of ``query`` against ``gallery``; a collective call when torch.distributed is initialised.

    Every rank must pass the same full sets (rows sorted by id); each computes its block of the queries and its
    share of the triplets, and one all_reduce sums them.
    """
    if len(gallery.ids) - int(exclude_self) < 1:
        raise RankingError("the gallery has no item to rank (empty split?)")
    rank, world_size = distributed_world()
    device = gallery.embeddings.device
    recall_levels = torch.linspace(0, 1, pr_points, dtype=torch.float64, device=device)
    gallery_sq_norms = squared_norms(gallery.embeddings)

    my_queries = torch.tensor_split(torch.arange(len(query.ids), device=device), world_size)[rank]
    sums = torch.zeros(5 + pr_points, dtype=torch.float64, device=device)
    for block in my_queries.split(chunk_size):
        chunk = EmbeddingSet(query.embeddings[block], query.ids[block], query.labels[block])
        relevant = ranked_relevance(chunk, gallery, gallery_sq_norms, exclude_self)
        sums += per_query_metrics(relevant, k, recall_levels).sum(0)
        del relevant  # one block alive at a time

    sampled = sample_triplets(query.labels, gallery.labels, triplets, seed, exclude_self)
    my_triplets = torch.tensor_split(sampled, world_size)[rank].to(device)
    triplet_counts = torch.stack([correct_triplets(query.embeddings, gallery.embeddings, my_triplets),
                                  torch.tensor(float(len(my_triplets)), dtype=torch.float64, device=device)])

    totals = torch.cat([sums, triplet_counts])
    if world_size > 1:
        dist.all_reduce(totals)
    n_queries = len(query.ids)
    means = (totals[: 5 + pr_points] / max(n_queries, 1)).tolist()
    correct, sampled_count = totals[-2:].tolist()
    return RetrievalMetrics(
        precision_at_k=means[0], knn1_accuracy=means[1], hit_at_k=means[2], map=means[3], map_at_r=means[4],
        triplet_accuracy=correct / sampled_count if sampled_count else float("nan"), queries=n_queries,
        recall_levels=recall_levels.tolist(), pr_precision=means[5:],
    )
