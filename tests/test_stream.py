"""Sample streams over real shard files: labels and ids, transforms, per-rank/worker seeding, eval splitting."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.data.augment import StoredDecoder
from ranking.data.sampling import build_batches
from ranking.data.stream import eval_samples, eval_transform, train_records, train_samples, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASSES = 4


def jpeg(sample_id: int, size: int = 16) -> bytes:
    """An image whose brightness encodes its id; every third one grayscale, as some Tiny ImageNet JPEGs are."""
    mode = "L" if sample_id % 3 == 0 else "RGB"
    color = sample_id * 9 % 256 if mode == "L" else (sample_id * 9 % 256, 40, 200)
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_split(out: Path, split: str, ids: list[int], per_shard: int, corrupt: int | None = None) -> dict:
    shards = []
    for index, start in enumerate(range(0, len(ids), per_shard)):
        name = f"{split}-{index:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for sample_id in ids[start : start + per_shard]:
                label = sample_id % CLASSES
                sink.write(
                    {
                        "__key__": f"{split}_{sample_id:07d}",
                        "jpg": b"not a jpeg" if sample_id == corrupt else jpeg(sample_id),
                        "cls": str(label).encode(),
                        "json": json.dumps(
                            {
                                "id": sample_id,
                                "split": split,
                                "label": label,
                                "wnid": f"n{label:08d}",
                                "words": f"class {label}",
                                "file": f"{split}/{sample_id}.JPEG",
                            }
                        ).encode(),
                    }
                )
        shards.append(
            {
                "name": name,
                "count": len(ids[start : start + per_shard]),
                "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
            }
        )
    return {"count": len(ids), "shards": shards}


def write_tiny_shards(out: Path, corrupt: int | None = None) -> Path:
    """A few shards in the DESIGN.md format, written with webdataset's TarWriter (train in shuffled order)."""
    out.mkdir(parents=True)
    train_ids = [(i * 7) % 24 for i in range(24)]
    splits = {
        "train": write_split(out, "train", train_ids, 8, corrupt),
        "val": write_split(out, "val", list(range(10)), 4),
        "test": write_split(out, "test", list(range(2)), 4),
    }
    manifest = {
        "format": "deep-ranking-shards/1",
        "source": "tiny.zip",
        "seed": 0,
        "shard_size": 8,
        "classes": [{"wnid": f"n{c:08d}", "words": f"class {c}"} for c in range(CLASSES)],
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("tiny") / "shards")


def take(dataset, n: int, workers: int = 0) -> list:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return list(itertools.islice(iter(loader), n))


def test_train_samples_yield_transformed_images_labels_and_ids(tiny_shards):
    samples = take(train_samples(str(tiny_shards), 32, MEAN, STD, shuffle_buffer=10, seed=0), 60)
    for image, label, sample_id in samples:
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == sample_id % CLASSES
    assert {s[2] for s in samples} == set(range(24)), "the stream is infinite and resamples every shard"
    # grayscale JPEGs come out as three equal channels
    gray = next(image for image, _, sample_id in samples if sample_id % 3 == 0 and sample_id > 0)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


@pytest.mark.system  # DataLoader worker processes
def test_train_streams_split_over_workers_and_are_seeded(tiny_shards):
    def ids(seed: int) -> list[int]:
        stream = train_samples(str(tiny_shards), 16, MEAN, STD, shuffle_buffer=10, seed=seed)
        return [int(sample_id) for _, _, sample_id in take(stream, 40, workers=2)]

    first, again, other = ids(0), ids(0), ids(1)
    assert first == again, "same seed, same stream"
    assert first != other, "another seed, another stream"
    # the DataLoader alternates between its workers: each worker reads its own resampled stream
    assert first[0::2] != first[1::2]


def test_train_stream_differs_by_rank(tiny_shards, monkeypatch):
    def ids(rank: int) -> list[int]:
        monkeypatch.setenv("RANK", str(rank))
        stream = train_samples(str(tiny_shards), 16, MEAN, STD, shuffle_buffer=10, seed=0)
        return [sample_id for _, _, sample_id in take(stream, 30)]

    assert ids(0) != ids(1)
    assert ids(1) == ids(1)


@pytest.mark.system  # DataLoader worker processes
@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_samples_cover_the_split_once_over_ranks(tiny_shards, world_size):
    seen = []
    for rank in range(world_size):
        stream = eval_samples(str(tiny_shards), "val", rank, world_size)
        rank_samples = take(stream, 1000, workers=2)
        assert all(sample_id % world_size == rank for _, _, sample_id in rank_samples)
        # uint8 at the stored size (16 px here): the device resizes (augment.EvalResize)
        assert all(image.shape == (3, 16, 16) and image.dtype == torch.uint8 for image, _, _ in rank_samples)
        assert all(label == sample_id % CLASSES for _, label, sample_id in rank_samples)
        seen += [int(sample_id) for _, _, sample_id in rank_samples]
    assert sorted(seen) == list(range(10))


def test_eval_transform_is_deterministic_and_train_transform_is_not():
    image = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    evaluate, train = eval_transform(32, MEAN, STD), train_transform(32, MEAN, STD)
    assert torch.equal(evaluate(image), evaluate(image))
    torch.manual_seed(0)
    assert not torch.equal(train(image), train(image))
    assert train(image).shape == evaluate(image).shape == (3, 32, 32)


@pytest.mark.system  # DataLoader worker processes
@pytest.mark.parametrize("decode_in_batches", [True, False], ids=["records decoded per batch", "decoded samples"])
@pytest.mark.parametrize("sampler", ["paper", "batch"])
def test_batches_from_the_shard_stream_in_workers(tiny_shards, sampler, decode_in_batches):
    config = TrainConfig(
        sampler=sampler,
        classes_per_batch=3,
        samples_per_class=2,
        triplets_per_batch=4,
        neg_per_query=2,
        buffer_per_class=3,
    )
    if decode_in_batches:  # the trainer's path: buffers hold JPEG bytes, a batch decodes what it uses, to uint8
        records = train_records(str(tiny_shards), shuffle_buffer=10, seed=0)
        assert isinstance(next(iter(records)).image, bytes)
        batches = build_batches(records, config, CLASSES, seed=0, decode=StoredDecoder(16).image)
    else:  # the per-image reference transform
        batches = build_batches(
            train_samples(str(tiny_shards), 16, MEAN, STD, shuffle_buffer=10, seed=0), config, CLASSES, seed=0
        )
    for batch in take(batches, 4, workers=2):
        assert batch.images.shape[1:] == (3, 16, 16)
        assert batch.images.dtype == (torch.uint8 if decode_in_batches else torch.float32)
        assert torch.equal(batch.labels, batch.ids % CLASSES)
        red = batch.images[:, 0].float().mean(dim=(1, 2))  # each image is one colour: id * 9 in red
        if not decode_in_batches:
            red = (red * STD[0] + MEAN[0]) * 255
        assert torch.allclose(red, (batch.ids * 9 % 256).float(), atol=6), "an image travelled with another id"
        if sampler == "paper":
            q, p, n = batch.triplets.unbind(1)
            assert len(q) == 8 and (batch.labels[q] == batch.labels[p]).all()
            assert (batch.labels[q] != batch.labels[n]).all()
        else:
            assert batch.triplets is None and len(batch.ids) == 6


def test_corrupt_jpeg_names_the_shard_and_sample(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", corrupt=5)
    with pytest.raises(RankingError, match=r"train-00000\d\.tar: sample train_0000005: cannot decode"):
        take(train_samples(str(shards), 16, MEAN, STD, shuffle_buffer=1, seed=0), 500)


@pytest.mark.system  # DataLoader worker processes
@pytest.mark.parametrize("sampler", ["paper", "batch"])
def test_corrupt_jpeg_in_the_trainers_workers_names_the_shard_and_sample(tmp_path, sampler):
    """The trainer's path: DataLoader workers decode the records a batch uses to uint8 (augment.StoredDecoder)."""
    shards = write_tiny_shards(tmp_path / "shards", corrupt=5)
    config = TrainConfig(
        sampler=sampler, classes_per_batch=2, samples_per_class=2, triplets_per_batch=2, buffer_per_class=3
    )
    batches = build_batches(
        train_records(str(shards), shuffle_buffer=1, seed=0), config, CLASSES, seed=0, decode=StoredDecoder(16).image
    )
    with pytest.raises(RankingError, match=r"train-00000\d\.tar: sample train_0000005: cannot decode"):
        take(batches, 500, workers=2)


def test_truncated_shard_is_named(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards")
    shard = shards / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(RankingError, match=r"val-000001\.tar: cannot read shard"):
        take(eval_samples(str(shards), "val", 0, 1), 100)


@pytest.mark.system  # DataLoader worker processes
def test_real_shards_stream(synth_shards):
    """The shards `ranking shards` writes: labels agree with each sample's json, at the requested size."""
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    labels_by_id = {}
    for shard in manifest["splits"]["train"]["shards"]:
        for sample in wds.WebDataset(str(synth_shards / shard["name"]), shardshuffle=False):
            record = json.loads(sample["json"])
            labels_by_id[record["id"]] = record["label"]
    samples = take(train_samples(str(synth_shards), 48, MEAN, STD, shuffle_buffer=50, seed=0), 100, workers=2)
    assert all(image.shape == (3, 48, 48) for image, _, _ in samples)
    assert all(labels_by_id[int(i)] == label for _, label, i in samples)
    assert len({label for _, label, _ in samples}) == len(manifest["classes"])
