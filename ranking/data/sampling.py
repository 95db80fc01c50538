"""Batches for training, formed online from the infinite sample stream (the miners are in ``ranking.learning.miners``).

Two samplers turn ``(image, label, id)`` samples into ``Batch``es (DESIGN.md "Batches"):
- ``PaperTripletSampler``: the paper's online triplet sampling from per-class reservoir buffers; the batch holds
  a row for each query, positive and negative slot (a fixed number of rows) and the triplets as indices into it.
- ``PKBatcher``: P classes x K images from per-class queues; the triplets are mined later from the embeddings.
Both are IterableDatasets for a DataLoader with ``batch_size=None``; each worker keeps its own buffers and draws from
an RNG seeded by (seed, rank, worker), so a run is reproducible.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, NoReturn

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from ranking.core.config import SamplerName, TrainConfig
from ranking.core.errors import RankingError
from ranking.data.stream import Sample, worker_seed


class Batch(NamedTuple):
    images: Tensor  # [N, 3, H, W]; N is the same at every step of a run
    labels: Tensor  # [N] long
    ids: Tensor  # [N] long
    triplets: Tensor | None  # [T, 3] long (query, positive, negative) row indices, or None: mine them


def paper_sampler(
    samples: Iterable[Sample], config: TrainConfig, num_classes: int, seed: int, decode: Callable[[Any], Tensor] | None
) -> IterableDataset:
    return PaperTripletSampler(
        samples,
        num_classes,
        config.triplets_per_batch,
        config.pos_per_query,
        config.neg_per_query,
        config.buffer_per_class,
        seed,
        decode,
    )


def pk_sampler(
    samples: Iterable[Sample], config: TrainConfig, num_classes: int, seed: int, decode: Callable[[Any], Tensor] | None
) -> IterableDataset:
    if config.classes_per_batch > num_classes:
        raise RankingError(
            f"{config.shards}: classes_per_batch {config.classes_per_batch} exceeds the "
            f"{num_classes} classes in the shards"
        )
    return PKBatcher(
        samples,
        config.classes_per_batch,
        config.samples_per_class,
        seed,
        max_per_class=max(config.samples_per_class, config.buffer_per_class),
        decode=decode,
    )


SAMPLERS: dict[SamplerName, Callable[..., IterableDataset]] = {"batch": pk_sampler, "paper": paper_sampler}


def images_per_batch(config: TrainConfig) -> int:
    """Rows of a training batch: P x K, or a row for every query, positive and negative slot of the paper sampler's
    (its fixed layout: an image drawn twice has two rows)."""
    if config.sampler == "batch":
        return config.classes_per_batch * config.samples_per_class
    return config.triplets_per_batch * (1 + config.pos_per_query + config.pos_per_query * config.neg_per_query)


def build_batches(
    samples: Iterable[Sample],
    config: TrainConfig,
    num_classes: int,
    seed: int,
    decode: Callable[[Any], Tensor] | None = None,
) -> IterableDataset:
    """``decode(sample) -> image tensor`` runs when a batch is formed (the trainer's ``augment.StoredDecoder().image``:
    uint8 at the stored size, for the records of ``stream.train_records``); without it the samples already hold image
    tensors."""
    return SAMPLERS[config.sampler](samples, config, num_classes, seed, decode)


def check_feasible(config: TrainConfig, counts: dict[int, int]) -> None:
    """Refuse, before training, a sampler that can never form a batch from these per-class image counts (label ->
    images): it would wait on the infinite stream forever, with no step and no message."""

    def fail(need: str, have: str) -> NoReturn:
        raise RankingError(
            f"{config.shards}: the {config.sampler} sampler needs {need}, but the train shards have "
            f"{have} ({sum(counts.values())} images in {len(counts)} classes)"
        )

    if config.sampler == "batch":
        enough = sum(count >= config.samples_per_class for count in counts.values())
        if enough < config.classes_per_batch:
            fail(
                f"{config.classes_per_batch} classes (--classes-per-batch) of at least {config.samples_per_class} "
                "images (--samples-per-class)",
                f"{enough} such classes",
            )
    else:  # the warm-up of PaperTripletSampler: a class with a query and its positives, and another for negatives
        ready = sum(count >= config.pos_per_query + 1 for count in counts.values())
        if ready < 1 or len(counts) < 2:
            fail(
                f"a class of at least {config.pos_per_query + 1} images (a query and --pos-per-query positives) "
                "and another class for the negatives",
                f"{ready} classes of {config.pos_per_query + 1} images",
            )


def to_batch(
    samples: list[Sample],
    triplets: Tensor | list[tuple[int, int, int]] | None,
    decode: Callable[[Any], Tensor] | None = None,
) -> Batch:
    images = [sample[0] for sample in samples]
    if decode is not None:  # decoded per use: a buffered image is augmented anew each time a batch uses it
        images = [decode(sample) for sample in samples]
    labels, ids = [sample[1] for sample in samples], [sample[2] for sample in samples]
    return Batch(
        torch.stack(images),
        torch.tensor(labels),
        torch.tensor(ids),
        None if triplets is None else torch.as_tensor(triplets, dtype=torch.long).view(-1, 3),
    )


class ClassReservoirs:
    """One reservoir of at most ``capacity`` samples per class (Vitter's algorithm R).

    Once a class's reservoir is full, its n-th sample replaces a random slot with probability capacity / n, so the
    reservoir is a uniform sample of everything that class has streamed. A sample whose id is already held is
    skipped: resampled shards repeat images, and a query must never be its own positive.
    """

    def __init__(self, capacity: int, rng: random.Random):
        self.capacity = capacity
        self.rng = rng
        self.buffers: dict[int, list[Sample]] = defaultdict(list)
        self.held: dict[int, set[int]] = defaultdict(set)
        self.seen: dict[int, int] = defaultdict(int)

    def add(self, sample: Sample) -> None:
        label, sample_id = sample[1], sample[2]
        buffer, held = self.buffers[label], self.held[label]
        if sample_id in held:
            return
        self.seen[label] += 1
        if len(buffer) < self.capacity:
            buffer.append(sample)
            held.add(sample_id)
            return
        slot = self.rng.randrange(self.seen[label])
        if slot < self.capacity:
            held.discard(buffer[slot][2])
            buffer[slot] = sample
            held.add(sample_id)

    def classes_with(self, at_least: int) -> list[int]:
        return sorted(label for label, buffer in self.buffers.items() if len(buffer) >= at_least)


class PaperTripletSampler(IterableDataset):
    """The paper's online triplet sampling (Wang et al. 2014, section 5).

    A batch has ``triplets_per_batch`` queries; each query has ``pos_per_query`` distinct positives from its class's
    reservoir, and each (query, positive) pair ``neg_per_query`` negatives drawn from other classes' reservoirs:
    ``triplets_per_batch * pos_per_query * neg_per_query`` triplets. Between batches the reservoirs take in as many
    new samples as the last batch used distinct images, so the stream is consumed at the rate it is trained on.
    Every batch has ``rows_per_batch`` rows and the same ``triplet_rows()`` (see ``_sample_batch``).
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        num_classes: int,
        triplets_per_batch: int,
        pos_per_query: int,
        neg_per_query: int,
        buffer_per_class: int,
        seed: int,
        decode: Callable[[Any], Tensor] | None = None,
    ):
        if num_classes < 2:
            raise RankingError(f"the paper sampler needs two classes or more; the shards have {num_classes}")
        if buffer_per_class < pos_per_query + 1:
            raise RankingError(
                f"buffer_per_class {buffer_per_class} cannot hold a query and its "
                f"{pos_per_query} positives; use at least {pos_per_query + 1}"
            )
        self.samples = samples
        self.num_classes = num_classes
        self.queries = triplets_per_batch
        self.positives = pos_per_query
        self.negatives = neg_per_query
        self.buffer_per_class = buffer_per_class
        self.seed = seed
        self.decode = decode

    def __iter__(self) -> Iterator[Batch]:
        rng = random.Random(worker_seed(self.seed))
        reservoirs = ClassReservoirs(self.buffer_per_class, rng)
        stream = iter(self.samples)
        try:
            self._warm_up(reservoirs, stream)
            while True:
                batch = self._sample_batch(reservoirs, rng)
                yield batch
                for _ in range(len(set(batch.ids.tolist()))):
                    reservoirs.add(next(stream))
        except StopIteration:  # a finite stream ends the batches; the train stream never ends
            return

    def _warm_up(self, reservoirs: ClassReservoirs, stream: Iterator[Sample]) -> None:
        """Fill until queries can come from distinct classes, or, if the data has fewer classes, until the first
        num_classes * buffer_per_class samples have been read and at least two classes are usable."""
        wanted = min(self.num_classes, self.queries + 1)
        patience = self.num_classes * self.buffer_per_class
        read = 0
        while True:
            ready = len(reservoirs.classes_with(self.positives + 1))
            if ready >= wanted or (read >= patience and ready >= 1 and len(reservoirs.classes_with(1)) >= 2):
                return
            reservoirs.add(next(stream))
            read += 1

    def _sample_batch(self, reservoirs: ClassReservoirs, rng: random.Random) -> Batch:
        """Every triplet slot has a row of its own, in a fixed layout: the queries, then their positives, then the
        positives' negatives (``rows_per_batch`` rows, the same at every step).

        The layout used to hold each image once, so the number of rows varied from batch to batch and cuDNN planned
        its kernels anew at each step. Padding to a fixed count would have added rows in no triplet, which still
        pass through the network and move BatchNorm's batch statistics; so no row is padding: an image drawn twice
        gets two rows, augmented differently, which are two real training inputs.
        """
        ready = reservoirs.classes_with(self.positives + 1)
        nonempty = reservoirs.classes_with(1)
        queries, positives, negatives = [], [], []
        for _ in range(self.queries):
            label = rng.choice(ready)
            other_classes = [other for other in nonempty if other != label]
            query, *chosen = rng.sample(range(len(reservoirs.buffers[label])), self.positives + 1)
            queries.append(reservoirs.buffers[label][query])
            for positive in chosen:
                positives.append(reservoirs.buffers[label][positive])
                for _ in range(self.negatives):
                    other = rng.choice(other_classes)
                    negatives.append(reservoirs.buffers[other][rng.randrange(len(reservoirs.buffers[other]))])
        return to_batch(queries + positives + negatives, self.triplet_rows(), self.decode)

    @property
    def rows_per_batch(self) -> int:
        return self.queries * (1 + self.positives + self.positives * self.negatives)

    def triplet_rows(self) -> Tensor:
        """``[T, 3]`` (query, positive, negative) rows of the fixed layout, ordered by query, positive, negative."""
        query = torch.arange(self.queries).repeat_interleave(self.positives * self.negatives)
        pair = torch.arange(self.queries * self.positives).repeat_interleave(self.negatives)
        positive = self.queries + pair
        negative = self.queries * (1 + self.positives) + torch.arange(len(pair))
        return torch.stack([query, positive, negative], dim=1)


class PKBatcher(IterableDataset):
    """Class-balanced batches: ``classes_per_batch`` (P) random classes x ``samples_per_class`` (K) images each.

    Samples wait in per-class FIFO queues (at most ``max_per_class`` each, oldest dropped) until P classes hold K.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        classes_per_batch: int,
        samples_per_class: int,
        seed: int,
        max_per_class: int = 64,
        decode: Callable[[Any], Tensor] | None = None,
    ):
        self.samples = samples
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.max_per_class = max(max_per_class, samples_per_class)
        self.seed = seed
        self.decode = decode

    def __iter__(self) -> Iterator[Batch]:
        rng = random.Random(worker_seed(self.seed))
        queues: dict[int, deque[Sample]] = defaultdict(lambda: deque(maxlen=self.max_per_class))
        ready: set[int] = set()
        for sample in self.samples:
            label, sample_id = sample[1], sample[2]
            queue = queues[label]
            if any(queued[2] == sample_id for queued in queue):  # resampled shards repeat images
                continue
            queue.append(sample)
            if len(queue) >= self.samples_per_class:
                ready.add(label)
            if len(ready) >= self.classes_per_batch:
                yield self._take_batch(queues, ready, rng)

    def _take_batch(self, queues: dict[int, deque[Sample]], ready: set[int], rng: random.Random) -> Batch:
        chosen = rng.sample(sorted(ready), self.classes_per_batch)
        batch = []
        for label in chosen:
            queue = queues[label]
            batch += [queue.popleft() for _ in range(self.samples_per_class)]
            if len(queue) < self.samples_per_class:
                ready.discard(label)
        return to_batch(batch, None, self.decode)
