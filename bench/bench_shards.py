"""Images per second per core: (a) packing shards, (b) streaming them through the train transform, (c) the seeds' way.

(c) is how the seed projects read data: a torch Dataset over a triplets text file (query, positive, negative paths)
that opens one JPEG file per image from the extracted folder. Every measurement runs in this one process with one
thread, so images/s here is images/s per core. Run by hand:

    OMP_NUM_THREADS=1 python bench/bench_shards.py [--zip ../shared/data/tiny-imagenet-40cls.zip] [--images 6000]

The extracted folder of (c) was just written, so it is in the page cache: a best case for one-file-per-image, which
on a cluster file system pays a metadata round trip per file.
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from PIL import Image

from ranking.data.archive import Archive
from ranking.data.stream import train_samples, train_transform
from ranking.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Clock:
    """CPU seconds of this process (images per CPU second = per core, whatever else the machine runs) and wall."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall

    def rate(self, images: int) -> str:
        return (
            f"{images / self.cpu:6.0f} images/s per core  "
            f"({images} images, {self.cpu:.1f} s CPU, {self.wall:.1f} s wall)"
        )


def bench_packing(zip_path: Path, out: Path) -> float:
    with Clock() as clock:
        manifest = write_shards(zip_path, out, shard_size=1000, workers=1, seed=0)
    images = sum(split["count"] for split in manifest["splits"].values())
    print(f"(a) zip -> shards (1 worker):          {clock.rate(images)}")
    return images / clock.cpu


def bench_streaming(shards: Path, images: int, size: int) -> Clock:
    stream = iter(train_samples(str(shards), size, IMAGENET_MEAN, IMAGENET_STD, shuffle_buffer=1000, seed=0))
    next(stream)  # open the first shard and fill the shuffle buffer's start outside the clock
    with Clock() as clock:
        for image, _, _ in itertools.islice(stream, images):
            assert image.shape == (3, size, size)
    print(f"(b) shards -> decode -> transform:     {clock.rate(images)}")
    return clock


class TripletFileDataset(torch.utils.data.Dataset):
    """The seeds' loader: each line of the triplets file names three JPEG files, opened one by one."""

    def __init__(self, triplets_file: Path, transform):
        self.triplets = [line.split() for line in triplets_file.read_text().splitlines()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int):
        return tuple(self.transform(Image.open(path).convert("RGB")) for path in self.triplets[index])


def write_triplets_file(zip_path: Path, root: Path, count: int) -> Path:
    """Random (query, positive, negative) train triplets as absolute paths into the extracted folder."""
    rng = random.Random(0)
    with Archive(zip_path) as archive:
        by_label: dict[int, list[str]] = {}
        for sample in archive.samples("train"):
            by_label.setdefault(sample.label, []).append(str(root / "tiny-imagenet-200" / sample.file))
    labels = sorted(by_label)
    lines = []
    for _ in range(count):
        positive_label, negative_label = rng.sample(labels, 2)
        query, positive = rng.sample(by_label[positive_label], 2)
        lines.append(f"{query} {positive} {rng.choice(by_label[negative_label])}")
    path = root / "triplets.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_seed_loader(zip_path: Path, work: Path, images: int, size: int) -> Clock:
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(work / "extracted")
    triplets = write_triplets_file(zip_path, work / "extracted", images // 3)
    dataset = TripletFileDataset(triplets, train_transform(size, IMAGENET_MEAN, IMAGENET_STD))
    with Clock() as clock:
        for index in range(len(dataset)):
            assert dataset[index][0].shape == (3, size, size)
    print(f"(c) triplets file -> a file per image: {clock.rate(3 * len(dataset))}")
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "data" / "tiny-imagenet-40cls.zip")
    parser.add_argument("--images", type=int, default=6000, help="images timed in (b) and (c)")
    parser.add_argument("--image-size", type=int, default=64, help="train transform output size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_packing(args.zip, work / "shards")
        images = args.images // 3 * 3
        streaming = bench_streaming(work / "shards", images, args.image_size)
        seeds = bench_seed_loader(args.zip, work, images, args.image_size)
    print(
        f"(b)/(c) = {seeds.cpu / streaming.cpu:.2f} per CPU second, {seeds.wall / streaming.wall:.2f} in wall time "
        f"(image size {args.image_size}, 1 thread)"
    )


if __name__ == "__main__":
    main()
