"""Chunked exact retrieval and its metrics against a brute-force numpy/sklearn reference, at world size 1, 2 and 3."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, precision_recall_curve
from sklearn.neighbors import NearestNeighbors

from harness import free_port
from ranking.retrieval.metrics import EmbeddingSet, evaluate_retrieval, nearest_neighbors, sample_triplets

K = 10
PR_POINTS = 11
TRIPLETS = 500


def random_set(n: int, dim: int, classes: int, seed: int, first_id: int = 0, unit: bool = True) -> EmbeddingSet:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator)
    if unit:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    labels = torch.randint(classes, (n,), generator=generator)
    return EmbeddingSet(embeddings, torch.arange(first_id, first_id + n), labels)


def reference_metrics(query: EmbeddingSet, gallery: EmbeddingSet, k: int, exclude_self: bool) -> dict:
    """Brute force: the full distance matrix in float64, one query at a time, sklearn for AP and the PR curve."""
    q, g = query.embeddings.double().numpy(), gallery.embeddings.double().numpy()
    distances = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    levels = np.linspace(0, 1, PR_POINTS)
    rows = []
    for i in range(len(q)):
        keep = gallery.ids.numpy() != query.ids[i].item() if exclude_self else np.ones(len(g), bool)
        d, labels = distances[i][keep], gallery.labels.numpy()[keep]
        relevant = labels[np.argsort(d, kind="stable")] == query.labels[i].item()
        r = int(relevant.sum())
        precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        if r:
            ap = average_precision_score(labels == query.labels[i].item(), -d)
            curve_p, curve_r, _ = precision_recall_curve(labels == query.labels[i].item(), -d)
            curve_p, curve_r = curve_p[:-1], curve_r[:-1]  # drop sklearn's artificial (recall 0, precision 1)
            interpolated = [curve_p[curve_r >= level - 1e-9].max() for level in levels]
        else:
            ap, interpolated = 0.0, [0.0] * PR_POINTS
        rows.append(
            [
                relevant[:k].mean(),
                relevant[0],
                relevant[:k].any(),
                ap,
                (precision[:r] * relevant[:r]).sum() / max(r, 1),
                *interpolated,
            ]
        )
    means = np.mean(np.array(rows, dtype=np.float64), 0)
    return {
        "precision_at_k": means[0],
        "knn1_accuracy": means[1],
        "hit_at_k": means[2],
        "map": means[3],
        "map_at_r": means[4],
        "pr_precision": means[5:],
    }


def assert_matches_reference(metrics, reference: dict) -> None:
    for name in ("precision_at_k", "knn1_accuracy", "hit_at_k", "map", "map_at_r"):
        assert getattr(metrics, name) == pytest.approx(reference[name], abs=1e-6), name
    np.testing.assert_allclose(metrics.pr_precision, reference["pr_precision"], atol=1e-6)


def test_nearest_neighbors_match_sklearn_in_uneven_chunks():
    query, gallery = random_set(23, 16, 4, seed=1), random_set(200, 16, 4, seed=2, unit=False)
    distances, indices = nearest_neighbors(query.embeddings, gallery.embeddings, k=30, chunk_size=7)
    knn = NearestNeighbors(n_neighbors=30, algorithm="brute").fit(gallery.embeddings.numpy())
    ref_distances, ref_indices = knn.kneighbors(query.embeddings.numpy())
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    np.testing.assert_allclose(distances.numpy(), ref_distances**2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_val_against_train_matches_brute_force(chunk_size):
    query, gallery = random_set(37, 8, 5, seed=3, first_id=0), random_set(101, 8, 5, seed=4)
    metrics = evaluate_retrieval(query, gallery, k=K, chunk_size=chunk_size, pr_points=PR_POINTS, triplets=TRIPLETS)
    assert metrics.queries == 37
    assert 0 < metrics.map < 1 and 0 < metrics.precision_at_k < 1
    assert_matches_reference(metrics, reference_metrics(query, gallery, K, exclude_self=False))


def test_train_against_train_excludes_the_query_itself():
    gallery = random_set(53, 8, 4, seed=5)
    metrics = evaluate_retrieval(
        gallery, gallery, k=K, chunk_size=10, pr_points=PR_POINTS, triplets=TRIPLETS, exclude_self=True
    )
    assert_matches_reference(metrics, reference_metrics(gallery, gallery, K, exclude_self=True))
    # Without the exclusion every query finds itself first.
    assert evaluate_retrieval(gallery, gallery, k=K, pr_points=PR_POINTS, triplets=0).knn1_accuracy == 1.0
    assert metrics.knn1_accuracy < 1.0


def test_perfect_embedding_scores_one():
    labels = torch.arange(40) % 4
    embeddings = torch.nn.functional.one_hot(labels, 4).float() + 0.01 * torch.randn(40, 4)
    gallery = EmbeddingSet(embeddings, torch.arange(40), labels)
    metrics = evaluate_retrieval(
        gallery, gallery, k=5, chunk_size=6, pr_points=PR_POINTS, triplets=200, exclude_self=True
    )
    for name in ("precision_at_k", "knn1_accuracy", "hit_at_k", "map", "map_at_r", "triplet_accuracy"):
        assert getattr(metrics, name) == pytest.approx(1.0), name
    assert metrics.pr_precision == pytest.approx([1.0] * PR_POINTS)


def test_ties_are_ranked_by_gallery_id():
    # Every gallery item is at the same distance: the ranking is the gallery's id order.
    gallery = EmbeddingSet(torch.ones(6, 2), torch.arange(6), torch.tensor([1, 0, 0, 1, 0, 1]))
    query = EmbeddingSet(torch.ones(1, 2), torch.tensor([0]), torch.tensor([1]))
    metrics = evaluate_retrieval(query, gallery, k=3, pr_points=PR_POINTS, triplets=0)
    assert metrics.knn1_accuracy == 1.0
    assert metrics.precision_at_k == pytest.approx(1 / 3)
    assert metrics.map == pytest.approx((1 / 1 + 2 / 4 + 3 / 6) / 3)
    assert math.isnan(metrics.triplet_accuracy)


def test_sampled_triplets_are_valid_seeded_and_exclude_self():
    labels = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, -1, 3])  # class 3 has no positive besides itself
    triplets = sample_triplets(labels, labels, 2000, seed=7, exclude_self=True)
    q, p, n = triplets.T
    assert triplets.shape == (2000, 3)
    assert bool((labels[q] == labels[p]).all()) and bool((labels[q] != labels[n]).all())
    assert bool((p != q).all())
    assert set(labels[q].tolist()) == {0, 1, 2}  # unlabelled and positive-less queries are never drawn
    assert set(p[labels[q] == 2].tolist()) == {0, 3, 7, 8}  # every positive can be drawn
    assert set(n.tolist()) == set(range(11))  # every item is someone's negative
    assert torch.equal(triplets, sample_triplets(labels, labels, 2000, seed=7, exclude_self=True))
    assert not torch.equal(triplets, sample_triplets(labels, labels, 2000, seed=8, exclude_self=True))


def test_triplet_accuracy_matches_brute_force():
    query, gallery = random_set(30, 4, 3, seed=8), random_set(60, 4, 3, seed=9)
    metrics = evaluate_retrieval(query, gallery, k=K, pr_points=PR_POINTS, triplets=TRIPLETS, seed=3)
    triplets = sample_triplets(query.labels, gallery.labels, TRIPLETS, seed=3, exclude_self=False).numpy()
    q, g = query.embeddings.numpy(), gallery.embeddings.numpy()
    d_pos = ((q[triplets[:, 0]] - g[triplets[:, 1]]) ** 2).sum(1)
    d_neg = ((q[triplets[:, 0]] - g[triplets[:, 2]]) ** 2).sum(1)
    assert metrics.triplet_accuracy == pytest.approx(float(np.mean(d_pos < d_neg)))


# ---------------------------------------------------------------------------------------------------------------
# world size 1, 2, 3: real gloo processes


def evaluate_both(chunk_size: int = 5):
    query, gallery = random_set(37, 8, 5, seed=3), random_set(101, 8, 5, seed=4)
    val = evaluate_retrieval(query, gallery, k=K, chunk_size=chunk_size, pr_points=PR_POINTS, triplets=TRIPLETS)
    train = evaluate_retrieval(
        gallery, gallery, k=K, chunk_size=chunk_size, pr_points=PR_POINTS, triplets=TRIPLETS, exclude_self=True
    )
    return val, train


def distributed_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, evaluate_both()))
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        distributed_worker, args=(world_size, free_port(), results), nprocs=world_size, start_method="spawn"
    )
    return dict(results.get() for _ in range(world_size))


def test_same_metrics_at_world_size_1_2_3():
    query, gallery = random_set(37, 8, 5, seed=3), random_set(101, 8, 5, seed=4)
    val_reference = reference_metrics(query, gallery, K, exclude_self=False)
    train_reference = reference_metrics(gallery, gallery, K, exclude_self=True)
    single = evaluate_both()  # world size 1: no process group, the same code path without the all_reduce
    for world_size in (2, 3):
        results = run_distributed(world_size)
        assert sorted(results) == list(range(world_size))
        for val, train in results.values():  # every rank holds the same numbers
            assert val == results[0][0] and train == results[0][1]
        val, train = results[0]
        assert_matches_reference(val, val_reference)
        assert_matches_reference(train, train_reference)
        assert val.triplet_accuracy == single[0].triplet_accuracy
        assert train.triplet_accuracy == single[1].triplet_accuracy
        assert val.precision_at_k == pytest.approx(single[0].precision_at_k, abs=1e-9)
    assert_matches_reference(single[0], val_reference)
    assert_matches_reference(single[1], train_reference)
