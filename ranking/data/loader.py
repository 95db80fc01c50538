"""The trainer's input: this rank's DataLoader of uint8 batches, the wait for each batch with a deadline, and the
batch's augmentation on the training device.

``train_batches`` refuses a sampler that can never form a batch, then streams; ``BatchWatchdog`` bounds every
``next`` (``--batch-timeout-s``, cut to ``STOP_GRACE_S`` by a stop signal) and gives a worker's RankingError back as
its one line; ``DeviceAugment`` makes the model's input from a worker's batch with crops drawn from the run segment's
stream seeds, so that a resumed run sees reproducible data (``stream_seeds``).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ranking.core import distributed
from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.data import augment, sampling, stream
from ranking.data.sampling import Batch
from ranking.folders.shardformat import class_counts, load_manifest
from ranking.learning import models

STOP_GRACE_S = 10.0  # a stop signal while a batch is awaited: wait this much longer, then exit without a checkpoint
WORKER_EXIT_S = 5.0  # a DataLoader worker asked to end gets this long before it is killed
WORKER_ERROR = re.compile(r"^(?:[\w.]+\.)?(?:RankingError|ConfigError): (.*)$")


def stream_seeds(seed: int, step: int) -> tuple[int, int]:
    """(samples seed, batches seed) of the stream starting at ``step``: a resumed run reads new, reproducible data."""
    samples_seed, batches_seed = np.random.SeedSequence([seed, step]).generate_state(2)
    return int(samples_seed), int(batches_seed)


def train_batches(cfg: TrainConfig, seeds: tuple[int, int], pin_memory: bool) -> Iterator[Batch]:
    """This rank's infinite iterator of batches of uint8 ``[N, 3, stored_size, stored_size]`` images, not yet
    augmented (stream.py mixes the rank and the worker into the seeds). An image of another size is resized to the
    square (aspect ratio not kept): raise ``stored_size`` for a folder source of larger images.

    A sampler that can never form a batch from the shards' per-class counts is refused first (it would wait forever).
    """
    num_classes = len(load_manifest(cfg.shards)["classes"])
    sampling.check_feasible(cfg, class_counts(cfg.shards, "train", cache_dir=Path(cfg.shards)))
    samples_seed, batches_seed = seeds
    records = stream.train_records(cfg.shards, cfg.shuffle_buffer, samples_seed)
    decode = augment.StoredDecoder(cfg.stored_size).image
    batches = sampling.build_batches(records, cfg, num_classes, batches_seed, decode)
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=functools.partial(distributed.ignore_stop_signals, rank_pid=os.getpid()),
    )
    return iter(loader)


class BatchStall(BaseException):
    """No batch within the allowed time (raised by SIGALRM in the main thread); a BaseException, so that no
    ``except Exception`` in webdataset or the DataLoader, which the wait may be inside, takes it for its own."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(waited_s)
        self.waited_s = waited_s


def worker_error(error: RankingError) -> RankingError:
    """A DataLoader worker's RankingError comes back as "Caught RankingError in DataLoader worker process 0" and the
    worker's traceback: the one line it carried, again."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    found = WORKER_ERROR.match(lines[-1]) if len(lines) > 1 and lines[0].startswith("Caught ") else None
    return RankingError(found.group(1)) if found else error


class BatchWatchdog:
    """``next(batches)`` with a deadline (``--batch-timeout-s``) that stop signals shorten to ``grace_s``.

    A stalled stream (a sampler waiting for classes it never sees, a hung file system) used to block forever, and
    the stop handler only set a flag that nothing read. SIGALRM interrupts the wait in the main thread, whether the
    batch is formed there (``workers: 0``) or awaited from DataLoader workers.
    """

    def __init__(
        self,
        batches: Iterator[Batch],
        timeout_s: float,
        signals: distributed.StopRequest,
        grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.batches, self.timeout_s, self.signals, self.grace_s = batches, timeout_s, signals, grace_s
        self.armed = threading.current_thread() is threading.main_thread()  # SIGALRM reaches the main thread only
        self.started: float | None = None
        signals.on_request = self._on_stop

    def __iter__(self) -> BatchWatchdog:
        return self

    def __next__(self) -> Batch:
        if not self.armed or signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # another's alarm (pytest-timeout): keep it
            return self._next()
        previous = signal.signal(signal.SIGALRM, self._expired)
        self.started = time.monotonic()
        signal.setitimer(
            signal.ITIMER_REAL, min(self.timeout_s, self.grace_s) if self.signals.requested else self.timeout_s
        )
        try:
            return self._next()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.started = None
            signal.signal(signal.SIGALRM, previous)

    def _next(self) -> Batch:
        try:
            return next(self.batches)
        except RankingError as e:
            raise worker_error(e) from None

    def close(self) -> None:
        """End the DataLoader's workers within a bounded time (``stop_workers``); the trainer calls it on every way
        out of its loop."""
        stop_workers(self.batches)

    def _on_stop(self) -> None:
        if self.started is not None:
            left = signal.getitimer(signal.ITIMER_REAL)[0]
            if left == 0 or left > self.grace_s:
                signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _expired(self, signum: int, frame: object) -> None:
        raise BatchStall(time.monotonic() - (self.started or time.monotonic()))


def stop_workers(batches: Iterator[Batch], grace_s: float = WORKER_EXIT_S) -> None:
    """End the workers of a DataLoader iterator in bounded time: torch's own shutdown (the done signal, a join of
    at most 5 s, SIGTERM, another 5 s), then SIGKILL to any worker still alive.

    A worker stuck in its dataset (a hung file system; a stopped process) outlives SIGTERM, and torch's shutdown is
    skipped at interpreter exit, where multiprocessing then joins the worker with no timeout: the rank printed its
    line and never exited, holding the node. SIGKILL ends even a stopped process; it comes after torch's shutdown
    has unregistered the workers, so its SIGCHLD check does not take the kill for a crash. Without workers, nothing.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's _MultiProcessingDataLoaderIter
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=grace_s)


def recipe_augment(cfg: TrainConfig) -> augment.TrainAugment:
    """The training augmentation a recipe names: its image size, its backbone's normalisation, its crop scale."""
    return augment.TrainAugment(cfg.image_size, *models.input_normalization(cfg.backbone), scale=(cfg.crop_scale, 1.0))


class DeviceAugment:
    """A worker's uint8 batch -> the model's input on the training device: ``augment.TrainAugment`` there, its crops
    and flips drawn from a generator of this run segment's stream seed and this rank (a resumed run restarts from
    the seeds of its step: the same crops again), then channels_last."""

    def __init__(self, cfg: TrainConfig, seeds: tuple[int, int], rank: int, device: torch.device) -> None:
        self.augment = recipe_augment(cfg)
        self.generator = augment.seeded_generator(seeds[1], rank)
        self.device, self.channels_last = device, cfg.channels_last

    def __call__(self, batch: Batch) -> Batch:
        images = self.augment(batch.images.to(self.device, non_blocking=True), self.generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        triplets = None if batch.triplets is None else batch.triplets.to(self.device, non_blocking=True)
        return Batch(images, batch.labels.to(self.device, non_blocking=True), batch.ids, triplets)
