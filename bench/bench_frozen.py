"""Training images per second of the default recipe (pretrained-style EfficientNet-Lite0) by `frozen_stages`.

Frozen stages get no gradients, so no backward pass runs through them: most of a fine-tuning step's cost is the
backward pass of the early, high-resolution layers. Each setting runs the trainer's step (one forward over a P x K
batch, semi-hard mining, the hinge loss, AdamW, bf16 autocast, channels_last) on the same random images; the
baseline is the whole trunk trained (`frozen_stages 0`), measured in the same run. Run:

    python bench/bench_frozen.py [--threads 2] [--steps 5] [--size 160] [--stages 0 3 5 7]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench_train import ours, timed
from ranking.core.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=TrainConfig().image_size)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = TrainConfig(pretrained=False, freeze_bn_stats=True)  # the default recipe; random weights time the same
    images = torch.randn(base.classes_per_batch * base.samples_per_class, 3, args.size, args.size)
    labels = torch.arange(base.classes_per_batch).repeat_interleave(base.samples_per_class)
    stages = sorted(set([0, *args.stages]))
    variants = {count: ours(dataclasses.replace(base, frozen_stages=count), images, labels, None) for count in stages}
    rates = {count: len(images) / wall for count, (wall, _) in timed(variants, args.steps).items()}
    for count, rate in rates.items():
        print(
            f"frozen_stages {count}: {rate:6.1f} images/s, {rate / rates[0]:.2f}x the whole trunk trained "
            f"({args.size} px, batch {len(images)}, {args.threads} threads, {args.steps} steps)"
        )


if __name__ == "__main__":
    main()
