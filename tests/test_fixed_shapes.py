"""Every training batch has the same tensor shapes at every step (cuDNN plans its kernels once), for both samplers,
on the trainer's stream of shard records, decoded by the current per-image transform or kept uint8 for the device."""

from __future__ import annotations

import itertools

import pytest
import torch

from ranking.core.config import TrainConfig
from ranking.data.augment import StoredDecoder, TrainAugment
from ranking.data.sampling import PaperTripletSampler, build_batches
from ranking.data.stream import Decoder, train_records, train_transform
from ranking.shards import load_manifest

# torchvision 0.29 deprecates its JPEG decoder for TorchCodec; 0.26 (the GPU machine's) does not: still the one to use
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CONFIGS = {
    "paper 32x1x1": TrainConfig(
        sampler="paper", triplets_per_batch=32, pos_per_query=1, neg_per_query=1, buffer_per_class=8
    ),
    "paper 8x2x3": TrainConfig(
        sampler="paper", triplets_per_batch=8, pos_per_query=2, neg_per_query=3, buffer_per_class=6
    ),
    "batch 4x4": TrainConfig(sampler="batch", classes_per_batch=4, samples_per_class=4),
}


def shapes(batch) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in batch)


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_shapes_are_constant_over_50_steps(synth_shards, name):
    cfg = CONFIGS[name]
    num_classes = len(load_manifest(synth_shards)["classes"])
    records = train_records(str(synth_shards), shuffle_buffer=50, seed=0)
    batches = build_batches(records, cfg, num_classes, seed=0, decode=StoredDecoder(64).image)
    seen = {shapes(batch) for batch in itertools.islice(iter(batches), 50)}
    assert len(seen) == 1, seen
    ((images, labels, ids, triplets),) = seen
    if cfg.sampler == "paper":
        rows = cfg.triplets_per_batch * (1 + cfg.pos_per_query + cfg.pos_per_query * cfg.neg_per_query)
        assert triplets == ((cfg.triplets_per_batch * cfg.pos_per_query * cfg.neg_per_query, 3), torch.long)
    else:
        rows = cfg.classes_per_batch * cfg.samples_per_class
        assert triplets is None
    assert images == ((rows, 3, 64, 64), torch.uint8) and labels == ids == ((rows,), torch.long)


def test_paper_batches_are_the_fixed_layout_with_real_rows(synth_shards):
    """Queries, then positives, then negatives; every row is in a triplet (no padding rows in BatchNorm's statistics),
    and the triplets are the same index tensor at every step; an image drawn twice has two rows."""
    cfg = CONFIGS["paper 8x2x3"]
    records = train_records(str(synth_shards), shuffle_buffer=50, seed=0)
    sampler = build_batches(records, cfg, 6, seed=0, decode=StoredDecoder(64).image)
    assert isinstance(sampler, PaperTripletSampler)
    repeated = 0
    for batch in itertools.islice(iter(sampler), 20):
        assert torch.equal(batch.triplets, sampler.triplet_rows())
        assert torch.equal(torch.unique(batch.triplets), torch.arange(sampler.rows_per_batch)), "every row is used"
        q, p, n = batch.triplets.unbind(1)
        assert (batch.labels[q] == batch.labels[p]).all() and (batch.labels[q] != batch.labels[n]).all()
        assert (batch.ids[q] != batch.ids[p]).all()
        repeated += len(batch.ids) - len(set(batch.ids.tolist()))
    assert repeated > 0, "6 classes x 6 reservoir slots: some images are drawn twice in a batch"


def test_uint8_batches_then_device_augment_match_the_per_image_shapes(synth_shards):
    """The new path (uint8 batches, TrainAugment where the model is) gives the tensors today's path gives."""
    cfg = CONFIGS["batch 4x4"]
    size = 48
    new = build_batches(train_records(str(synth_shards), 50, seed=0), cfg, 6, 0, StoredDecoder(64).image)
    old = build_batches(
        train_records(str(synth_shards), 50, seed=0), cfg, 6, 0, Decoder(train_transform(size, MEAN, STD)).image
    )
    augment, generator = TrainAugment(size, MEAN, STD), torch.Generator().manual_seed(0)
    for new_batch, old_batch in itertools.islice(zip(new, old), 3):
        assert torch.equal(new_batch.ids, old_batch.ids), "the same samples: only the pixels' path differs"
        images = augment(new_batch.images, generator)
        assert images.shape == old_batch.images.shape and images.dtype == old_batch.images.dtype
        assert abs(images.mean() - old_batch.images.mean()) < 0.3 and abs(images.std() - old_batch.images.std()) < 0.3
