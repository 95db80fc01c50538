"""Sharded embedding: every rank embeds its share of a split, then all ranks gather the whole split, once per id.

DataLoader workers decode to uint8; ``augment.EvalResize`` (resize, centre crop, normalise) makes the model's input
on the device, for the shards' splits as for images in memory (``ranking search``'s query files).

The eval stream gives rank r the samples with ``id % world_size == r``, so ranks hold different numbers of rows.
The gather pads every rank's rows to the longest (padding rows carry id -1), gathers, drops the padding and keeps
one row per id, sorted by id: every sample exactly once at any world size, on every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ranking.data import stream
from ranking.data.augment import EvalResize, collate_samples
from ranking.learning import models
from ranking.learning.models import ModelSpec
from ranking.retrieval.metrics import EmbeddingSet

if TYPE_CHECKING:  # searching imports this module: it needs no launcher
    from accelerate import Accelerator

PADDING_ID = -1
LOG_EVERY_S = 30.0  # seconds between a rank's progress lines while it embeds
log = logging.getLogger("ranking.retrieval.embed")


@torch.inference_mode()
def embed_local(
    model: nn.Module,
    accelerator: Accelerator,
    loader: DataLoader,
    dim: int,
    flip: bool = False,
    name: str = "",
    expected: int | None = None,
    resize: EvalResize | None = None,
) -> EmbeddingSet:
    """This rank's rows, in stream order, as float32 on ``accelerator.device`` (a rank may have none); a log line
    every LOG_EVERY_S seconds and at the end, naming the split (``name``) and this rank's count so far. With
    ``resize``, the loader's images are uint8 (``augment.collate_samples``), resized and normalised on the device;
    without it they are the model's input already."""
    device = accelerator.device
    embeddings = [torch.zeros(0, dim, device=device)]
    ids, labels = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    started = last = time.perf_counter()
    done = 0
    of = f"/{expected}" if expected is not None else ""
    for images, batch_labels, batch_ids in loader:
        moved = to_device(images, device)
        pixels = resize(moved) if resize is not None else torch.stack(list(moved)) if isinstance(moved, list) else moved
        with accelerator.autocast():
            embeddings.append(models.embed_with_mirror(model, pixels, flip).float())
        labels.append(batch_labels.long())
        ids.append(batch_ids.long())
        done += len(batch_ids)
        if time.perf_counter() - last > LOG_EVERY_S:
            last = time.perf_counter()
            log.info(f"{name}: embedded {done}{of} images ({done / (last - started):.0f} images/s)")
    seconds = time.perf_counter() - started
    log.info(f"{name}: embedded {done}{of} images in {seconds:.1f} s")
    return EmbeddingSet(torch.cat(embeddings), torch.cat(ids).to(device), torch.cat(labels).to(device))


def to_device(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


def gather_unique(accelerator: Accelerator, local: EmbeddingSet) -> EmbeddingSet:
    """Every rank's rows on every rank: padding dropped, one row per id, sorted by id."""
    rows = {"embeddings": local.embeddings, "ids": local.ids, "labels": local.labels}
    gathered = accelerator.gather(accelerator.pad_across_processes(rows, dim=0, pad_index=PADDING_ID))
    ids = gathered["ids"]
    order = ids.argsort(stable=True)
    ids = ids[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    keep = order[first & (ids != PADDING_ID)]
    return EmbeddingSet(gathered["embeddings"][keep], gathered["ids"][keep], gathered["labels"][keep])


def embed_split(
    model: nn.Module,
    accelerator: Accelerator,
    shards: str,
    split: str,
    *,
    spec: ModelSpec,
    batch_size: int,
    workers: int,
    flip: bool = False,
    only_ids: frozenset[int] | None = None,
    total: int | None = None,
) -> EmbeddingSet:
    """Embed ``split`` of the shards (or its samples in ``only_ids``) over all ranks with ``model``, fed as its
    ``spec`` says; every rank returns the whole split, sorted by id. ``total``, the split's sample count, lets each
    rank log its progress out of its share.

    The loader is not passed through ``accelerator.prepare``: the stream already splits the samples over ranks
    (by id) and over DataLoader workers (by shard).
    """
    samples = stream.eval_samples(shards, split, accelerator.process_index, accelerator.num_processes, only_ids)
    loader = DataLoader(
        samples,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=accelerator.device.type == "cuda",
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if only_ids is not None:
        mine: int | None = sum(1 for i in only_ids if i % world == rank)
    else:
        mine = None if total is None else len(range(rank, total, world))  # ids with id % world == rank
    return embed_loader(
        model,
        accelerator,
        loader,
        spec.embed_dim,
        spec.normalize,
        flip,
        split,
        mine,
        resize=EvalResize(spec.image_size, spec.mean, spec.std),
    )


def embed_loader(
    model: nn.Module,
    accelerator: Accelerator,
    loader: DataLoader,
    dim: int,
    normalize: bool,
    flip: bool = False,
    name: str = "",
    expected: int | None = None,
    resize: EvalResize | None = None,
) -> EmbeddingSet:
    """Embed this rank's batches ``(images, labels, ids)`` of ``loader``, then gather every rank's rows: every rank
    returns them all, one per id, sorted by id (``name`` and ``expected`` go into this rank's progress lines;
    ``resize`` as for ``embed_local``)."""
    model.eval()
    split_set = gather_unique(accelerator, embed_local(model, accelerator, loader, dim, flip, name, expected, resize))
    if normalize:  # the model normalised in reduced precision; make the rows exactly unit-norm again
        split_set = EmbeddingSet(F.normalize(split_set.embeddings, dim=1), split_set.ids, split_set.labels)
    return split_set


@torch.inference_mode()
def embed_images(
    model: nn.Module,
    spec: ModelSpec,
    images: Sequence[torch.Tensor],
    flip: bool = False,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[N, D] float32 embeddings on the CPU of uint8 RGB images ``[3, H, W]`` in memory (any sizes, as
    ``ranking.data.decode`` makes them), fed as ``spec`` says through the evaluation's ``EvalResize`` on the device,
    in full precision; ``flip`` as the gallery was embedded. ``device`` defaults to the GPU if there is one (the
    model is moved there)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resize = EvalResize(spec.image_size, spec.mean, spec.std)
    model = model.to(device).eval()
    embeddings = [torch.zeros(0, spec.embed_dim)]
    for start in range(0, len(images), batch_size):
        pixels = list(images[start : start + batch_size])
        embeddings.append(models.embed_with_mirror(model, resize(to_device(pixels, device)), flip).float().cpu())
    embeddings_cpu = torch.cat(embeddings)
    return F.normalize(embeddings_cpu, dim=1) if spec.normalize else embeddings_cpu
