"""Samples from the shards as ``(image: FloatTensor[3, H, W], label: int, id: int)``, for training and evaluation.

Training streams are infinite: every rank and every DataLoader worker resamples all train shards with its own seed
(derived from the run seed, the rank and the worker id), so ranks never run out of data at different times and no
rank waits for another. Evaluation streams read each sample of a split exactly once over all ranks.
"""

from __future__ import annotations

import functools
import io
import os
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torchvision.transforms import v2

from ranking.errors import RankingError
from ranking.shards import shard_paths

Sample = tuple[torch.Tensor, int, int]


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Random crop of 50-100% of the image, resized to ``size`` (upsampling 64 px images when size > 64), and flip."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def process_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def worker_seed(seed: int) -> int:
    """A seed of its own for each (seed, rank, DataLoader worker); call it where the data is read (in the worker)."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    return int(np.random.SeedSequence([seed % 2**64, process_rank(), worker]).generate_state(1)[0])


def sample_id(sample: dict) -> int:
    """The integer id in the key ``{split}_{id:07d}``."""
    return int(sample["__key__"].rsplit("_", 1)[1])


def train_samples(shards_dir: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                  shuffle_buffer: int, seed: int) -> wds.DataPipeline:
    """Infinite stream of augmented train samples; reproducible for a given (seed, rank, worker)."""
    paths = _nonempty_shards(shards_dir, "train")
    return wds.DataPipeline(
        wds.ResampledShards(paths, seed=seed, worker_seed=functools.partial(worker_seed, seed), deterministic=True),
        wds.tarfile_to_samples(handler=_unreadable_shard),
        functools.partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed),
        wds.map(functools.partial(_decode, transform=train_transform(image_size, mean, std))),
    )


def eval_samples(shards_dir: str, split: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 rank: int, world_size: int) -> wds.DataPipeline:
    """Each sample of ``split`` once over all ranks: rank r keeps ids with ``id % world_size == r``.

    Shards are split over DataLoader workers, and the id filter runs before decoding, so a rank decodes only its share.
    """
    paths = _nonempty_shards(shards_dir, split)
    return wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_unreadable_shard),
        wds.select(functools.partial(_owned_by, rank=rank, world_size=world_size)),
        wds.map(functools.partial(_decode, transform=eval_transform(image_size, mean, std))),
    )


def _nonempty_shards(shards_dir: str, split: str) -> list[str]:
    paths = shard_paths(shards_dir, split)
    if not paths:
        raise RankingError(f"{shards_dir}: no {split} shards (run `ranking shards` first?)")
    return paths


def _owned_by(sample: dict, rank: int, world_size: int) -> bool:
    return sample_id(sample) % world_size == rank


def _seeded_shuffle(samples: Iterator[dict], bufsize: int, seed: int) -> Iterator[dict]:
    """webdataset's shuffle buffer, seeded inside the worker (its own ``shuffle`` seeds from the clock)."""
    if bufsize <= 1:
        return samples
    rng = random.Random(worker_seed(seed))
    return wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(samples)


def _decode(sample: dict, transform: v2.Compose) -> Sample:
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as encoded:
            image = encoded.convert("RGB")  # Tiny ImageNet has grayscale JPEGs
        label = int(sample["cls"])
        return transform(image), label, sample_id(sample)
    except KeyError as e:
        raise RankingError(f"{where}: missing field {e}") from None
    except (OSError, ValueError) as e:
        raise RankingError(f"{where}: cannot decode ({e})") from None


def _unreadable_shard(exn: Exception) -> bool:
    """webdataset's error handler: it appends the shard's url to the exception's args."""
    *details, url = exn.args or (type(exn).__name__,)
    reason = getattr(exn, "strerror", None) or (details[0] if details else type(exn).__name__)
    raise RankingError(f"{url}: cannot read shard ({reason})") from exn
