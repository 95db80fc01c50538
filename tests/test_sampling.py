"""Triplet samplers and miners, on a synthetic in-memory stream (the shard stream is tested in test_stream.py)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.data.sampling import Batch, ClassReservoirs, PaperTripletSampler, PKBatcher, build_batches
from ranking.learning.miners import mine_triplets


def fake_stream(num_classes: int, seed: int = 0, ids: int = 10_000):
    """Infinite (image, label, id) samples in random order; every pixel of an image holds its id."""
    rng = random.Random(seed)
    while True:
        sample_id = rng.randrange(ids)
        yield torch.full((3, 2, 2), float(sample_id)), sample_id % num_classes, sample_id


class FakeStream:
    """Re-iterable like a webdataset pipeline."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes, self.seed = num_classes, seed

    def __iter__(self):
        return fake_stream(self.num_classes, self.seed)


def check_batch_consistent(batch: Batch, unique: bool = True) -> None:
    assert batch.images.shape[0] == len(batch.labels) == len(batch.ids)
    if unique:  # the paper sampler gives every triplet slot its own row: an image drawn twice has two rows
        assert len(set(batch.ids.tolist())) == len(batch.ids), "each image appears once in a batch"
    assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.ids), "images travel with their ids"


@pytest.mark.parametrize("pos_per_query, neg_per_query", [(1, 1), (1, 3), (2, 2)])
def test_paper_sampler_triplets(pos_per_query, neg_per_query):
    queries, num_classes = 8, 10
    sampler = PaperTripletSampler(
        FakeStream(num_classes), num_classes, queries, pos_per_query, neg_per_query, buffer_per_class=6, seed=0
    )
    for batch in itertools.islice(iter(sampler), 5):
        check_batch_consistent(batch, unique=False)
        assert len(batch.ids) == queries * (1 + pos_per_query + pos_per_query * neg_per_query)
        assert torch.equal(batch.labels, batch.ids % num_classes)
        triplets = batch.triplets
        assert triplets.dtype == torch.long
        assert triplets.shape == (queries * pos_per_query * neg_per_query, 3)
        q, p, n = triplets.unbind(1)
        assert (batch.labels[q] == batch.labels[p]).all(), "positives share the query's class"
        assert (batch.labels[q] != batch.labels[n]).all(), "negatives never do"
        assert (batch.ids[q] != batch.ids[p]).all(), "a query is not its own positive"
        # [query, positive, negative]: every (query, positive) pair has exactly neg_per_query negatives
        grouped = triplets.view(queries, pos_per_query, neg_per_query, 3)
        assert (grouped[:, :, :, :2] == grouped[:, :, :1, :2]).all()
        for per_query in grouped[:, :, 0, :2]:
            assert (per_query[:, 0] == per_query[0, 0]).all()
            assert len(set(per_query[:, 1].tolist())) == pos_per_query, "distinct positives per query"


def test_paper_sampler_is_reproducible_and_seeded():
    def first_batches(seed):
        sampler = PaperTripletSampler(FakeStream(5), 5, 4, 1, 2, buffer_per_class=4, seed=seed)
        return list(itertools.islice(iter(sampler), 3))

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x.ids, y.ids) and torch.equal(x.triplets, y.triplets) for x, y in zip(a, b))
    assert not all(torch.equal(x.ids, y.ids) for x, y in zip(a, c))


def test_paper_sampler_consumes_the_stream():
    """Reservoirs take in new samples between batches: later batches show images the first one could not."""
    sampler = PaperTripletSampler(FakeStream(4), 4, 4, 1, 1, buffer_per_class=4, seed=0)
    batches = list(itertools.islice(iter(sampler), 30))
    seen = set().union(*(set(b.ids.tolist()) for b in batches))
    assert len(seen) > 4 * 4, "more distinct images than the reservoirs hold at once"


def test_samplers_end_with_a_finite_stream():
    samples = list(itertools.islice(fake_stream(3), 40))
    assert 0 < len(list(PaperTripletSampler(samples, 3, 2, 1, 1, buffer_per_class=4, seed=0))) < 40
    assert 0 < len(list(PKBatcher(samples, 2, 2, seed=0))) <= 10


def test_reservoir_bounded_and_fair():
    capacity, stream_length = 10, 200
    early = late = 0
    for trial in range(300):
        reservoirs = ClassReservoirs(capacity, random.Random(trial))
        for sample_id in range(stream_length):
            reservoirs.add((torch.zeros(1), sample_id % 2, sample_id))
        for label in (0, 1):
            held = [s[2] for s in reservoirs.buffers[label]]
            assert len(held) == capacity == len(set(held))
            early += sum(i < stream_length // 2 for i in held)
            late += sum(i >= stream_length // 2 for i in held)
    # uniform reservoir: the first and second half of the stream are equally likely to be held
    assert 0.45 < early / (early + late) < 0.55


def test_reservoir_skips_images_it_already_holds():
    reservoirs = ClassReservoirs(3, random.Random(0))
    for sample_id in [7, 7, 8, 7]:
        reservoirs.add((torch.zeros(1), 0, sample_id))
    assert [s[2] for s in reservoirs.buffers[0]] == [7, 8]
    assert reservoirs.seen[0] == 2


def test_pk_batcher_yields_p_distinct_classes_by_k():
    p, k, num_classes = 4, 3, 9
    batcher = PKBatcher(FakeStream(num_classes), p, k, seed=0, max_per_class=8)
    used = Counter()
    for batch in itertools.islice(iter(batcher), 40):
        check_batch_consistent(batch)
        assert batch.triplets is None
        assert len(batch.ids) == p * k
        counts = Counter(batch.labels.tolist())
        assert len(counts) == p and set(counts.values()) == {k}
        assert torch.equal(batch.labels, batch.ids % num_classes)
        used.update(counts.keys())
    assert len(used) == num_classes, "every class gets its turn"


def test_build_batches_picks_the_sampler():
    paper = build_batches(FakeStream(6), TrainConfig(sampler="paper", triplets_per_batch=3, neg_per_query=2), 6, 0)
    batch = next(iter(paper))
    assert batch.triplets.shape == (6, 3)
    pk = build_batches(FakeStream(6), TrainConfig(sampler="batch", classes_per_batch=3, samples_per_class=2), 6, 0)
    batch = next(iter(pk))
    assert batch.triplets is None and len(batch.ids) == 6
    with pytest.raises(RankingError, match="classes_per_batch 8 exceeds the 6 classes"):
        build_batches(FakeStream(6), TrainConfig(sampler="batch", classes_per_batch=8), 6, 0)
    with pytest.raises(RankingError, match="buffer_per_class"):
        build_batches(FakeStream(6), TrainConfig(sampler="paper", pos_per_query=4, buffer_per_class=4), 6, 0)


@pytest.mark.system  # DataLoader worker processes
def test_batches_work_in_dataloader_workers():
    sampler = PaperTripletSampler(FakeStream(6), 6, 4, 1, 1, buffer_per_class=4, seed=0)
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2)
    batches = list(itertools.islice(iter(loader), 4))
    assert all(isinstance(b, Batch) and b.triplets.shape == (4, 3) for b in batches)
    # the in-memory stream is the same in both workers, so the seed (rank, worker) alone tells them apart
    assert not torch.equal(batches[0].ids, batches[1].ids)


# --- miners against brute force -------------------------------------------------------------------------------


def random_batch(seed: int, n: int = 14, classes: int = 4, dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels[-1] = classes  # a singleton class: an anchor without positives
    return torch.randn(n, dim, generator=g), labels


def brute_distance(x, i, j) -> float:
    return float(((x[i] - x[j]) ** 2).sum())


def brute_force(x, labels, strategy, margin):
    n = len(labels)
    triplets, fallbacks = set(), 0
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [m for m in range(n) if labels[m] != labels[a]]
        if not positives or not negatives:
            continue
        if strategy == "hard":
            p = max(positives, key=lambda j: brute_distance(x, a, j))
            m = min(negatives, key=lambda j: brute_distance(x, a, j))
            triplets.add((a, p, m))
        for p in positives:
            d_ap = brute_distance(x, a, p)
            if strategy == "all":
                triplets.update((a, p, m) for m in negatives)
            elif strategy == "semihard":
                window = [m for m in negatives if d_ap < brute_distance(x, a, m) < d_ap + margin]
                fallbacks += not window
                m = min(window or negatives, key=lambda j: brute_distance(x, a, j))
                triplets.add((a, p, m))
    return triplets, fallbacks


@pytest.mark.parametrize("strategy", ["hard", "semihard", "all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miners_match_brute_force(strategy, seed):
    x, labels = random_batch(seed)
    margin = 1.0
    mined = mine_triplets(x, labels, strategy, margin)
    assert mined.dtype == torch.long and mined.shape[1] == 3
    expected, fallbacks = brute_force(x, labels, strategy, margin)
    assert {tuple(t) for t in mined.tolist()} == expected
    assert len(mined) == len(expected), "no duplicate triplets"
    if strategy == "semihard":
        assert 0 < fallbacks < len(expected), "the data exercises both semi-hard picks and the fallback"


def test_miners_take_no_gradient_and_accept_bf16():
    x, labels = random_batch(0)
    x = x.to(torch.bfloat16).requires_grad_()
    mined = mine_triplets(x, labels, "hard", 0.2)
    assert not mined.requires_grad and len(mined) == 13
