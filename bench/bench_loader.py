"""The data path alone, shards to a ready augmented batch on the training device (no model): the per-image worker
transform the trainer ran before against the device-side path it runs now (ranking/data/augment.py), in the same run, on
the same samples.

- current: what ``ranking.data.loader.train_batches`` ran in a DataLoader worker before issue 11 phase 2 (kept in
  ``stream.py`` as the reference): ``stream.train_records``, the sampler, and ``stream.Decoder(train_transform)`` per
  image (decode to a PIL image, random resized crop to the output size, flip, float32, normalise); the worker ships
  float32 ``[N, 3, S, S]``.
- new: what the trainer runs now: the same records and sampler, ``augment.StoredDecoder`` per image (JPEG -> uint8
  64 px); the worker ships uint8 ``[N, 3, 64, 64]``; the training process runs ``augment.TrainAugment`` on the batch
  (here on the CPU, the device of a CPU-only run; on a GPU this part leaves the CPU altogether).

Both paths run in this process, one batch each in turn (a machine shared with other jobs slows them alike), as a
DataLoader worker would run them: "worker" is the CPU time of producing a batch (read, decode, per-image transform,
collate), "device" the CPU time of the batched augmentation, "bytes/img" the batch's tensors (images, labels, ids,
triplets) over its rows, what crosses from a worker to the training process. images/s is one core doing both, one
after the other. The shards are built from ``--zip`` into a temporary folder unless ``--shards`` names some. Run:

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--shards DIR] [--images 3072] [--sizes 64 160] [--sampler batch]
                                                    [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ranking import shards
from ranking.core.config import TrainConfig
from ranking.data import augment, sampling, stream
from ranking.data.sampling import Batch
from ranking.learning import models

ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-40cls.zip"


class DataPath:
    """One data path: ``batches`` is what a worker yields, ``device`` what the training process does with it."""

    def __init__(
        self, name: str, batches: Iterator[Batch], device: Callable[[Batch], torch.Tensor], sync: Callable[[], None]
    ) -> None:
        self.name, self.batches, self.device, self.sync = name, batches, device, sync
        self.rows = 0
        self.worker_cpu = self.device_cpu = self.device_wall = self.wall = 0.0
        self.bytes = 0

    def step(self, timed: bool) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        batch = next(self.batches)
        worker_cpu = time.process_time() - cpu
        device_cpu, device_wall = time.process_time(), time.perf_counter()
        images = self.device(batch)
        self.sync()
        assert images.dtype == torch.float32 and images.shape[0] == len(batch.ids)
        device_cpu, device_wall = time.process_time() - device_cpu, time.perf_counter() - device_wall
        if timed:
            self.wall += time.perf_counter() - wall
            self.worker_cpu += worker_cpu
            self.device_cpu += device_cpu
            self.device_wall += device_wall
            self.rows += len(batch.ids)
            self.bytes += sum(t.numel() * t.element_size() for t in batch if t is not None)

    def per_image_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.rows


def build_paths(
    cfg: TrainConfig, shards_dir: str, num_classes: int, seed: int, device: torch.device
) -> dict[str, DataPath]:
    mean, std = models.input_normalization(cfg.backbone)

    def batches(decode: Callable) -> Iterator[Batch]:  # the same records and sampler draws for both paths
        records = stream.train_records(shards_dir, cfg.shuffle_buffer, seed)
        return iter(sampling.build_batches(records, cfg, num_classes, seed, decode))

    current = stream.Decoder(stream.train_transform(cfg.image_size, mean, std))
    train_augment = augment.TrainAugment(cfg.image_size, mean, std)
    generator = augment.seeded_generator(seed, rank=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return {  # the device side includes the copy to the device (none on the CPU), as the trainer's DeviceAugment does
        "current": DataPath("current", batches(current.image), lambda batch: batch.images.to(device), sync),
        "new": DataPath(
            "new",
            batches(augment.StoredDecoder().image),
            lambda batch: train_augment(batch.images.to(device), generator),
            sync,
        ),
    }


def measure(
    cfg: TrainConfig, shards_dir: str, num_classes: int, images: int, warmup: int, device: torch.device
) -> dict[str, DataPath]:
    paths = build_paths(cfg, shards_dir, num_classes, seed=0, device=device)
    for _ in range(warmup):  # fills the shuffle buffers and the samplers' queues
        for path in paths.values():
            path.step(timed=False)
    while min(path.rows for path in paths.values()) < images:
        for path in paths.values():
            path.step(timed=True)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="a shards folder (default: built from --zip in a temp folder)")
    parser.add_argument("--zip", default=str(ZIP), help="archive to build the shards from")
    parser.add_argument("--images", type=int, default=3072, help="images timed per path and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 160])
    parser.add_argument("--sampler", choices=("batch", "paper"), default="batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker has one)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per path first")
    parser.add_argument("--device", default="cpu", help="the training device: cpu, or cuda (device side in wall ms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        shards_dir = args.shards
        if shards_dir is None:
            started = time.perf_counter()
            shards_dir = str(Path(tmp) / "shards")
            shards.write_shards(args.zip, shards_dir, shard_size=1000, workers=1, seed=0, progress=False)
            print(f"shards: {Path(args.zip).name} -> {shards_dir} in {time.perf_counter() - started:.1f} s")
        num_classes = len(shards.load_manifest(shards_dir)["classes"])
        results = {}
        for size in args.sizes:
            cfg = TrainConfig(
                shards=shards_dir, image_size=size, sampler=args.sampler, classes_per_batch=min(16, num_classes)
            )
            results[size] = measure(cfg, shards_dir, num_classes, args.images, args.warmup, device)
        report(results, args, num_classes)


def report(results: dict[int, dict[str, DataPath]], args: argparse.Namespace, num_classes: int) -> None:
    print(
        f"{args.sampler} sampler, {num_classes} classes, {args.images} images per path and size, "
        f"{args.threads} torch thread(s), device {args.device}; ms per image: CPU time (worker, device, total), "
        f"and the device side's wall time (with the copy to the device)"
    )
    print(
        f"{'size':>4}  {'path':<8} {'images/s':>9} {'worker':>8} {'device':>8} {'total':>8} {'dev wall':>8} "
        f"{'bytes/img':>10}"
    )
    for size, paths in results.items():
        for path in paths.values():
            worker, device = path.per_image_ms(path.worker_cpu), path.per_image_ms(path.device_cpu)
            print(
                f"{size:>4}  {path.name:<8} {path.rows / path.wall:9.0f} {worker:8.3f} {device:8.3f} "
                f"{worker + device:8.3f} {path.per_image_ms(path.device_wall):8.3f} {path.bytes / path.rows:10.0f}"
            )
    if 160 not in results:
        return
    current, new = results[160]["current"], results[160]["new"]
    old = current.worker_cpu + current.device_cpu  # the old whole path is the worker's
    worker_share = (new.worker_cpu / new.rows) / (old / current.rows)
    whole = ((new.worker_cpu + new.device_cpu) / new.rows) / (old / current.rows)
    rate = (new.rows / new.wall) / (current.rows / current.wall)
    print(
        f"targets at 160 px: new worker CPU / current whole path {worker_share:.2f} (at most 0.33); "
        f"new whole path CPU / current's {whole:.2f}, images/s {rate:.2f}x current's (no slower); "
        f"{new.bytes / new.rows / 1000:.1f} KB per image from a worker (at most 13 KB)"
    )
    print(f"worker-side speed-up at 160 px: {1 / worker_share:.1f}x")


if __name__ == "__main__":
    main()
