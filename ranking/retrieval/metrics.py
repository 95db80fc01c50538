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

from dataclasses import asdict, dataclass, fields

import torch

from ranking.core import distributed
from ranking.core.errors import RankingError
from ranking.learning.distances import paired_squared_distances, squared_distances, squared_norms


@dataclass(frozen=True)
class EmbeddingSet:
    """Embeddings of one split with their sample ids and labels, rows sorted by id."""

    embeddings: torch.Tensor  # [N, D]
    ids: torch.Tensor  # [N] long
    labels: torch.Tensor  # [N] long


@dataclass(frozen=True)
class Metric:
    name: str  # the key in metrics.json and RetrievalMetrics' field
    title: str  # the column of tables and benchmarks; ``{k}`` is replaced by k
    key: str  # the short name logged during training (``val/<key>`` in metrics.jsonl and W&B)
    per_query: bool  # a mean over queries (else computed from sampled triplets)


# The one list of the retrieval metrics, in the order every table shows them.
METRICS = (
    Metric("precision_at_k", "precision@{k}", "precision@{k}", per_query=True),
    Metric("knn1_accuracy", "kNN-1", "knn1", per_query=True),
    Metric("hit_at_k", "hit@{k}", "hit@{k}", per_query=True),
    Metric("map", "mAP", "mAP", per_query=True),
    Metric("map_at_r", "MAP@R", "MAP@R", per_query=True),
    Metric("triplet_accuracy", "triplet accuracy", "triplet_accuracy", per_query=False),
)
PER_QUERY = tuple(metric.name for metric in METRICS if metric.per_query)


def titles(k: int, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """name -> display title of the registry's metrics (all, or ``names`` in registry order)."""
    return {m.name: m.title.format(k=k) for m in METRICS if names is None or m.name in names}


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


assert [f.name for f in fields(RetrievalMetrics)][: len(METRICS)] == [m.name for m in METRICS]


# ---------------------------------------------------------------------------------------------------------------
# top-k


def ties_in_row_order(distances: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k's (distances [Q, k], rows [Q, k]) reordered so that equal distances come in row order, the metrics'
    tie rule. ``topk`` promises no order among them, and its order differs across CPUs and backends, so a byte copy
    of a photo and the photo itself would otherwise swap places from one machine to the next. Which of the rows
    tied at the k-th distance make the cut is still topk's choice."""
    by_row = rows.sort(dim=1, stable=True)
    distances = distances.gather(1, by_row.indices)
    by_distance = distances.sort(dim=1, stable=True)
    return by_distance.values, by_row.values.gather(1, by_distance.indices)


def nearest_neighbors(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    gallery_sq_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest gallery rows of every query: (squared distances [Q, k], gallery indices [Q, k]), nearest first
    and equal distances in row order, as in the metrics (``ties_in_row_order``).
    ``gallery_sq_norms``: the gallery's squared norms, when a caller searching it again keeps them.
    """
    k = min(k, gallery.shape[0])
    if gallery_sq_norms is None:
        gallery_sq_norms = squared_norms(gallery)
    values, indices = [], []
    for chunk in queries.split(chunk_size):
        distances = squared_distances(chunk, gallery, gallery_sq_norms)
        top = distances.topk(k, dim=1, largest=False, sorted=True)
        del distances  # free this block before the next one is allocated: one block alive at a time
        top_values, top_indices = ties_in_row_order(top.values, top.indices)
        values.append(top_values)
        indices.append(top_indices)
    if not values:
        return queries.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long, device=queries.device)
    return torch.cat(values), torch.cat(indices)


# ---------------------------------------------------------------------------------------------------------------
# per-query metrics of one chunk


def ranked_relevance(
    query_chunk: EmbeddingSet, gallery: EmbeddingSet, gallery_sq_norms: torch.Tensor, exclude_self: bool
) -> torch.Tensor:
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


def per_query_metrics(relevant: torch.Tensor, k: int, recall_levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each per-query metric of the registry by name, [C] float64, and "pr_precision": [C, P] float64, the
    interpolated precision at each recall level."""
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

    return {
        "precision_at_k": precision_at_k.double(),
        "knn1_accuracy": knn1,
        "hit_at_k": hit_at_k,
        "map": average_precision,
        "map_at_r": ap_at_r,
        "pr_precision": interpolated,
    }


# ---------------------------------------------------------------------------------------------------------------
# triplets


def sample_triplets(
    query_labels: torch.Tensor, gallery_labels: torch.Tensor, count: int, seed: int, exclude_self: bool
) -> torch.Tensor:
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
    q = queries[triplets[:, 0]]
    d_pos = paired_squared_distances(q, gallery[triplets[:, 1]])
    d_neg = paired_squared_distances(q, gallery[triplets[:, 2]])
    return (d_pos < d_neg).double().sum()


# ---------------------------------------------------------------------------------------------------------------
# the whole evaluation of one split


def evaluate_retrieval(
    query: EmbeddingSet,
    gallery: EmbeddingSet,
    *,
    k: int = 30,
    chunk_size: int = 1024,
    pr_points: int = 50,
    triplets: int = 10000,
    seed: int = 0,
    exclude_self: bool = False,
) -> RetrievalMetrics:
    """Retrieval metrics of ``query`` against ``gallery``; a collective call when torch.distributed is initialised.

    Every rank must pass the same full sets (rows sorted by id); each computes its block of the queries and its
    share of the triplets, and one all_reduce sums them.
    """
    if len(gallery.ids) - int(exclude_self) < 1:
        raise RankingError("the gallery has no item to rank (empty split?)")
    rank, world_size = distributed.rank(), distributed.world_size()
    device = gallery.embeddings.device
    recall_levels = torch.linspace(0, 1, pr_points, dtype=torch.float64, device=device)
    gallery_sq_norms = squared_norms(gallery.embeddings)

    my_queries = torch.tensor_split(torch.arange(len(query.ids), device=device), world_size)[rank]
    sums = {name: torch.zeros(1, dtype=torch.float64, device=device) for name in PER_QUERY}
    sums["pr_precision"] = torch.zeros(pr_points, dtype=torch.float64, device=device)
    for block in my_queries.split(chunk_size):
        chunk = EmbeddingSet(query.embeddings[block], query.ids[block], query.labels[block])
        relevant = ranked_relevance(chunk, gallery, gallery_sq_norms, exclude_self)
        for name, values in per_query_metrics(relevant, k, recall_levels).items():
            sums[name] += values.sum(0)
        del relevant  # one block alive at a time

    sampled = sample_triplets(query.labels, gallery.labels, triplets, seed, exclude_self)
    my_triplets = torch.tensor_split(sampled, world_size)[rank].to(device)
    sums["correct_triplets"] = correct_triplets(query.embeddings, gallery.embeddings, my_triplets).reshape(1)
    sums["sampled_triplets"] = torch.tensor([float(len(my_triplets))], dtype=torch.float64, device=device)

    # one all_reduce of every sum, unpacked by name
    names = list(sums)
    totals = distributed.all_reduce_sum(torch.cat([sums[name] for name in names]))
    summed = dict(zip(names, totals.split([len(sums[name]) for name in names])))
    n_queries = len(query.ids)
    means = {name: (summed[name] / max(n_queries, 1)).tolist() for name in (*PER_QUERY, "pr_precision")}
    correct, sampled_count = float(summed["correct_triplets"]), float(summed["sampled_triplets"])
    return RetrievalMetrics(
        **{name: means[name][0] for name in PER_QUERY},
        triplet_accuracy=correct / sampled_count if sampled_count else float("nan"),
        queries=n_queries,
        recall_levels=recall_levels.tolist(),
        pr_precision=means["pr_precision"],
    )
