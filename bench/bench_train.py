"""Training triplets per second: our step vs. the seeds' loop, ResNet-18 at 64x64, 32 triplets a batch.

- ours: the trainer's step (``ranking.learning.losses.DistributedLoss`` through Accelerate): one forward pass over the
  q, p and n images concatenated, bf16 autocast, channels_last.
- seeds: ``model(q)``, ``model(p)``, ``model(n)`` (three forward calls), fp32, contiguous NCHW.

Both train the same network (the seeds' 4096-d unnormalised head, TripletMarginLoss margin 1.0, SGD with Nesterov)
on the same random images, so only the step differs; data loading is out of the picture (see bench_shards.py). Every
batch holds 3 x 32 distinct images: the paper sampler's batches often share images, which only helps ours. Run:

    python bench/bench_train.py [--threads 2] [--steps 10] [--triplets 32] [--size 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn

from ranking.core.config import TrainConfig
from ranking.data.sampling import Batch
from ranking.learning.losses import build_objective
from ranking.learning.models import build_model, set_train_mode
from ranking.learning.optim import build_optimizer


def seed_recipe() -> TrainConfig:
    return TrainConfig(
        backbone="resnet18",
        pretrained=False,
        freeze_bn_stats=False,
        frozen_stages=0,
        trunk_lr_scale=1.0,
        embed_dim=4096,
        normalize=False,
        loss="triplet_margin",
        margin=1.0,
        optimizer="sgd",
        lr=1e-3,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-5,
    )


def random_triplets(triplets: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [3T, 3, H, W] (queries, then positives, then negatives), labels and the [T, 3] index triplets."""
    images = torch.randn(3 * triplets, 3, size, size)
    rows = torch.arange(triplets)
    labels = torch.cat([rows, rows, rows + triplets])
    return images, labels, torch.stack([rows, rows + triplets, rows + 2 * triplets], dim=1)


def timed(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """(wall seconds, CPU seconds) per step of each variant; the variants take turns step by step, so a machine
    shared with other jobs slows them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    totals = {name: [0.0, 0.0] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.process_time() - cpu
    return {name: (wall / repeats, cpu / repeats) for name, (wall, cpu) in totals.items()}


def ours(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, triplets: torch.Tensor | None):
    """The trainer's step; ``triplets=None`` mines them from the batch (P x K batches)."""
    accelerator = Accelerator(mixed_precision="bf16")
    model = build_model(cfg).to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, build_optimizer(cfg, model))
    set_train_mode(model, cfg.freeze_bn_stats)
    loss_fn = build_objective(cfg)
    batch = Batch(images.to(accelerator.device).contiguous(memory_format=torch.channels_last), labels, labels, triplets)

    def step(images: torch.Tensor | None = None) -> None:  # other images on the device, else the batch's
        accelerator.backward(
            loss_fn(model(batch.images if images is None else images), batch.labels, batch.triplets).objective
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def one_forward_fp32(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, triplets: torch.Tensor):
    """Our single concatenated forward alone (fp32, NCHW, no Accelerate): separates its gain from bf16's."""
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    loss_fn = build_objective(cfg)
    batch = Batch(images, labels, labels, triplets)

    def step() -> None:
        loss_fn(model(batch.images), batch.labels, batch.triplets).objective.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seeds(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, triplets: torch.Tensor):
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    criterion = nn.TripletMarginLoss(margin=cfg.margin)
    query, positive, negative = (images[triplets[:, i]] for i in range(3))

    def step() -> None:
        loss = criterion(model(query), model(positive), model(negative))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--triplets", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = seed_recipe()
    data = random_triplets(args.triplets, args.size)

    variants = {
        "seeds (3 forwards, fp32)": seeds(cfg, *data),
        "1 forward, fp32 (for reference)": one_forward_fp32(cfg, *data),
        "ours (1 forward, bf16, channels_last)": ours(cfg, *data),
    }
    rates = {}
    for name, (wall, cpu) in timed(variants, args.steps).items():
        rates[name] = args.triplets / wall
        print(
            f"{name:<40} {rates[name]:7.1f} triplets/s  ({wall:.2f} s/step wall, {cpu:.2f} s CPU; "
            f"{args.threads} threads, {args.size}x{args.size}, {args.triplets} triplets, {args.steps} steps)"
        )
    seeds_rate, ours_rate = rates["seeds (3 forwards, fp32)"], rates["ours (1 forward, bf16, channels_last)"]
    print(f"ratio ours / seeds: {ours_rate / seeds_rate:.2f}x")


if __name__ == "__main__":
    main()
