"""Samples from the shards, for training and evaluation: records (JPEG bytes, label, id) and decoded samples.

Training streams are infinite: every rank and every DataLoader worker resamples all train shards with its own seed
(derived from the run seed, the rank and the worker id), so ranks never run out of data at different times and no
rank waits for another. Evaluation streams read each sample of a split exactly once over all ranks.

The trainer and the evaluation decode to uint8 at the stored size in their DataLoader workers and make the model's
pixels on the training device (``ranking.data.augment``). ``train_transform``, ``Decoder`` and ``train_samples`` are
the per-image torchvision path the trainer ran in its workers before (on PIL images, decoded by
``ranking.data.decode`` as everything is): the reference that ``augment.TrainAugment`` is tested and benchmarked
against (tests, ``bench/bench_loader.py``'s "current", ``bench/bench_shards.py``); ``eval_transform`` is
``augment.EvalResize``'s reference.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torchvision.transforms import v2

from ranking.core import distributed
from ranking.core.errors import RankingError
from ranking.data.augment import StoredDecoder
from ranking.data.decode import decode_jpeg, to_pil
from ranking.folders.shardformat import MANIFEST, key_id, shard_counts, shard_paths

Sample = tuple[torch.Tensor, int, int]


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Random crop of 50-100% of the image, resized to ``size`` (upsampling 64 px images when size > 64), and flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def worker_seed(seed: int) -> int:
    """A seed of its own for each (seed, rank, DataLoader worker); call it where the data is read (in the worker)."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    return int(np.random.SeedSequence([seed % 2**64, distributed.launched_rank(), worker]).generate_state(1)[0])


def sample_id(sample: dict) -> int:
    return key_id(sample["__key__"])


def train_records(shards_dir: str, shuffle_buffer: int, seed: int) -> wds.DataPipeline:
    """Infinite stream of ``(jpeg_bytes, label, id)``, not yet decoded; reproducible for a given (seed, rank, worker).

    The samplers buffer these few-kilobyte records and decode only the images a batch uses: a reservoir of 200
    classes x 32 decoded 224 px float images would take 3.9 GB per DataLoader worker.
    """
    paths = _nonempty_shards(shards_dir, "train")
    return wds.DataPipeline(
        wds.ResampledShards(paths, seed=seed, worker_seed=functools.partial(worker_seed, seed), deterministic=True),
        functools.partial(counted_samples, expected=shard_counts(shards_dir, "train")),
        functools.partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed),
        wds.map(_record),
    )


def train_samples(
    shards_dir: str, image_size: int, mean: Sequence[float], std: Sequence[float], shuffle_buffer: int, seed: int
) -> wds.DataPipeline:
    """Infinite stream of augmented train samples ``(image, label, id)``; ``train_records`` decoded by the per-image
    reference transform (the trainer decodes the records to uint8 instead and augments on its device)."""
    decode = Decoder(train_transform(image_size, mean, std))
    return train_records(shards_dir, shuffle_buffer, seed).compose(wds.map(decode.sample))


def eval_samples(
    shards_dir: str, split: str, rank: int, world_size: int, only_ids: frozenset[int] | None = None
) -> wds.DataPipeline:
    """Each sample of ``split`` (or of its ids in ``only_ids``) once over all ranks, as ``(uint8 [3, h, w] at its
    stored size, label, id)``: rank r keeps ids with ``id % world_size == r``; ``augment.EvalResize`` makes the
    model's input on the device.

    Shards are split over DataLoader workers, and the id filter runs before decoding, so a rank decodes only its share.
    """
    paths = _nonempty_shards(shards_dir, split)
    return wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        functools.partial(counted_samples, expected=shard_counts(shards_dir, split)),
        wds.select(functools.partial(_owned_by, rank=rank, world_size=world_size, only_ids=only_ids)),
        wds.map(_record),
        wds.map(StoredDecoder(stored_size=None).sample),
    )


def counted_samples(sources: Iterator[dict], expected: dict[str, int]) -> Iterator[dict]:
    """webdataset's ``tarfile_to_samples``, one shard at a time, checking each shard's sample count against the
    manifest once it is read: a shard cut at a sample boundary (or emptied) is a valid, shorter tar that would
    otherwise train silently on less data, or on nothing at all."""
    expand = wds.tarfile_to_samples(handler=_unreadable_shard)
    for source in sources:
        count = 0
        for sample in expand(iter([source])):
            count += 1
            yield sample
        url = source["url"]
        if count != expected.get(url):
            raise RankingError(
                f"{url}: {count} samples, but {MANIFEST} lists {expected.get(url)} "
                "(truncated or replaced since `ranking shards`; check with `ranking shards --verify`)"
            )


def _nonempty_shards(shards_dir: str, split: str) -> list[str]:
    paths = shard_paths(shards_dir, split)
    if not paths:
        raise RankingError(f"{shards_dir}: no {split} shards (run `ranking shards` first?)")
    return paths


def _owned_by(sample: dict, rank: int, world_size: int, only_ids: frozenset[int] | None = None) -> bool:
    index = sample_id(sample)
    return index % world_size == rank and (only_ids is None or index in only_ids)


def _seeded_shuffle(samples: Iterator[dict], bufsize: int, seed: int) -> Iterator[dict]:
    """webdataset's shuffle buffer, seeded inside the worker (its own ``shuffle`` seeds from the clock)."""
    if bufsize <= 1:
        return samples
    rng = random.Random(worker_seed(seed))
    return wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(samples)


def _record(sample: dict) -> Record:
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    try:
        return Record(sample["jpg"], int(sample["cls"]), sample_id(sample), where)
    except KeyError as e:
        raise RankingError(f"{where}: missing field {e}") from None
    except ValueError as e:
        raise RankingError(f"{where}: bad class ({e})") from None


class Record(NamedTuple):
    """A sample as stored: its JPEG bytes, label, id, and where it came from (for error messages)."""

    image: bytes
    label: int
    id: int
    source: str


class Decoder:
    """JPEG bytes -> transformed image tensor; a picklable callable, so DataLoader workers can run it.

    Decoded by ``decode.decode_jpeg``, then handed to ``transform`` as the PIL image the workers' per-image path
    transformed before: the same pixels as PIL's own decode of every Tiny ImageNet JPEG, so the reference stays what
    it was.
    """

    def __init__(self, transform: v2.Compose) -> None:
        self.transform = transform

    def __call__(self, jpeg: bytes, source: str = "?") -> torch.Tensor:
        return self.transform(to_pil(decode_jpeg(jpeg, source)))

    def image(self, record: Record) -> torch.Tensor:
        return self(record.image, record.source)

    def sample(self, record: Record) -> Sample:
        return self.image(record), record.label, record.id


def _unreadable_shard(exn: Exception) -> bool:
    """webdataset's error handler: it appends the shard's url to the exception's args."""
    *details, url = exn.args or (type(exn).__name__,)
    reason = getattr(exn, "strerror", None) or (details[0] if details else type(exn).__name__)
    raise RankingError(f"{url}: cannot read shard ({reason})") from exn
