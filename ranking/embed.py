"""Sharded embedding: every rank embeds its share of a split, then all ranks gather the whole split, once per id.

DataLoader workers decode to uint8; ``augment.EvalResize`` (resize, centre crop, normalise) makes the model's input
on the device, for the shards' splits as for images in memory (``ranking search``'s query files).

The eval stream gives rank r the samples with ``id % world_size == r``, so ranks hold different numbers of rows.
The gather pads every rank's rows to the longest (padding rows carry id -1), gathers, drops the padding and keeps
one row per id, sorted by id: every sample exactly once at any world size, on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor

from ranking import models, stream
from ranking.augment import EvalResize, collate_samples
from ranking.config import TrainConfig
from ranking.retrieval import EmbeddingSet

PADDING_ID = -1


@torch.inference_mode()
def embed_local(model: nn.Module, accelerator: Accelerator, loader: DataLoader, resize: EvalResize, dim: int,
                flip: bool = False) -> EmbeddingSet:
    """This rank's rows, in stream order, as float32 on ``accelerator.device`` (a rank may have none); the loader's
    uint8 images (``augment.collate_samples``) are resized and normalised on the device."""
    device = accelerator.device
    embeddings = [torch.zeros(0, dim, device=device)]
    ids, labels = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for images, batch_labels, batch_ids in loader:
        pixels = resize(to_device(images, device))
        with accelerator.autocast():
            embeddings.append(models.embed_with_mirror(model, pixels, flip).float())
        labels.append(batch_labels.long())
        ids.append(batch_ids.long())
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


def embed_split(model: nn.Module, accelerator: Accelerator, shards: str, split: str, *, image_size: int,
                mean: Sequence[float], std: Sequence[float], batch_size: int, workers: int, dim: int,
                normalize: bool, flip: bool = False) -> EmbeddingSet:
    """Embed ``split`` of the shards over all ranks; every rank returns the whole split, sorted by id.

    The loader is not passed through ``accelerator.prepare``: the stream already splits the samples over ranks
    (by id) and over DataLoader workers (by shard).
    """
    samples = stream.eval_samples(shards, split, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(samples, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples,
                        pin_memory=accelerator.device.type == "cuda")
    model.eval()
    resize = EvalResize(image_size, mean, std)
    split_set = gather_unique(accelerator, embed_local(model, accelerator, loader, resize, dim, flip))
    if normalize:  # the model normalised in reduced precision; make the rows exactly unit-norm again
        split_set = EmbeddingSet(F.normalize(split_set.embeddings, dim=1), split_set.ids, split_set.labels)
    return split_set


@torch.inference_mode()
def embed_images(model: nn.Module, config: TrainConfig, images: list[Image.Image], normalize: bool,
                 flip: bool = False, batch_size: int = 64) -> torch.Tensor:
    """[N, D] float32 embeddings on the CPU of images in memory (any sizes), through the evaluation's ``EvalResize``
    on the device, in full precision; ``flip`` as the index was embedded (``ranking evaluate --flip``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resize = EvalResize(config.image_size, *models.input_normalization(config.backbone))
    model = model.to(device).eval()
    pixels = [pil_to_tensor(image.convert("RGB")) for image in images]  # uint8, each its own size
    embeddings = torch.cat([models.embed_with_mirror(model, resize(to_device(batch, device)), flip).float().cpu()
                            for batch in chunks(pixels, batch_size)])
    return F.normalize(embeddings, dim=1) if normalize else embeddings


def chunks(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]
