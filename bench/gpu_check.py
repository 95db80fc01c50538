"""The Python parts of bench/gpu_check.sh; each subcommand prints what it measured.

python bench/gpu_check.py install WHEELS_DIR TARGET_DIR   # pip-install the wheels whose package is missing
python bench/gpu_check.py ceiling [--sizes 64 256 512]    # the trainer's step on random images on the device
python bench/gpu_check.py train-summary RUN_DIR --per-step N
python bench/gpu_check.py util-summary FILE                # nvidia-smi utilization.gpu samples, one per line
python bench/gpu_check.py embed RUN_DIR --shards DIR      # the evaluation's embedding of a split, images/s
python bench/gpu_check.py augment                          # ranking/data/augment on the GPU: speed, CPU agreement
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def seconds_per_call(call, warmup: int, repeats: int, sync) -> float:
    """Mean seconds of ``call()`` after ``warmup`` calls, with the device synchronised around the timed ones."""
    for _ in range(warmup):
        call()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - started) / repeats


def install(args: argparse.Namespace) -> int:
    """Install, without an index and without dependencies, every wheel of the folder whose distribution is not
    installed yet, into ``target`` (put on PYTHONPATH by the caller): the machine's own packages stay as they are."""
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    missing = []
    for wheel in wheels:
        name = wheel.name.split("-")[0].replace("_", "-").lower()
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(wheel)
    print(
        f"install: {len(wheels)} wheels in {args.wheels}, {len(missing)} not installed: "
        f"{' '.join(w.name.split('-')[0] for w in missing) or '-'}"
    )
    if not missing:
        return 0
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        args.target,
        *map(str, missing),
    ]
    return subprocess.run(command, check=False).returncode


def ceiling(args: argparse.Namespace) -> int:
    """The default recipe's trainer step (bench_train's, through Accelerate: bf16, channels_last, mining on the
    batch's P x K labels) on random images already on the device: the images/s no data path can beat; and the same
    step after the trainer's device-side augmentation of uint8 64 px images already on the device (what the data
    path adds on the GPU itself)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import ours
    from ranking.core.config import TrainConfig
    from ranking.data.augment import seeded_generator
    from ranking.data.loader import recipe_augment

    cfg = TrainConfig(image_size=args.image_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    augment = recipe_augment(cfg)
    generator = seeded_generator(0)
    for size in args.sizes:
        images = torch.randn(size, 3, cfg.image_size, cfg.image_size)
        stored = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, device=device)
        labels = torch.arange(size) // cfg.samples_per_class  # P x K classes, as the batch sampler's
        step = ours(cfg, images, labels, None)
        rates = {}
        for name, run in (
            ("random images on the device", lambda step=step: step(None)),
            (
                "+ TrainAugment of uint8 64 px",
                lambda step=step, stored=stored: step(
                    augment(stored, generator).contiguous(memory_format=torch.channels_last)
                ),
            ),
        ):
            rates[name] = 1 / seconds_per_call(run, args.warmup, args.steps, sync)
        parts = [f"{name}: {per_s:6.2f} steps/s, {per_s * size:6.0f} images/s" for name, per_s in rates.items()]
        print(f"ceiling {size:>4} images/step ({cfg.backbone}, {cfg.image_size} px): {'; '.join(parts)}", flush=True)
        del step
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def train_summary(args: argparse.Namespace) -> int:
    """Mean triplets/s of the logged intervals, the first (start-up, cuDNN planning, workers' warm-up) left out."""
    path = Path(args.run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = records[args.drop :]
    if not kept:
        print(f"{args.label}: no logged interval after the first {args.drop} ({len(records)} logged)")
        return 1
    # this script runs without the package installed: it reads today's name and the one before `train/`
    rate = statistics.fmean(
        r["train/triplets_per_s"] if "train/triplets_per_s" in r else r["triplets_per_s"] for r in kept
    )
    steps = kept[-1]["step"] - records[args.drop - 1]["step"] if args.drop else kept[-1]["step"]
    print(
        f"{args.label}: {rate:8.0f} {args.unit}/s, {rate / args.per_step:6.2f} steps/s "
        f"({len(kept)} logged intervals, {steps} steps after the first {args.drop})"
    )
    return 0


def util_summary(args: argparse.Namespace) -> int:
    values = []
    for line in Path(args.file).read_text().splitlines():
        try:
            values.append(float(line.strip().split(",")[-1].strip().rstrip("%").strip()))
        except ValueError:
            continue
    if not values:
        print(f"{args.label}: no utilization samples")
        return 1
    busy = sum(v >= 90 for v in values) / len(values)
    mean, median = statistics.fmean(values), statistics.median(values)
    print(
        f"{args.label}: GPU utilization mean {mean:.0f}%, median {median:.0f}%,"
        f" min {min(values):.0f}%, >=90% in {busy:.0%} of {len(values)} samples"
    )
    return 0


def embed(args: argparse.Namespace) -> int:
    """``embed.embed_split`` (the evaluation's loader: uint8 from the workers, EvalResize on the device) on a split,
    one process."""
    import torch
    from accelerate import Accelerator

    from ranking.retrieval import embed
    from ranking.retrieval.inference import EmbeddingModel

    accelerator = Accelerator(mixed_precision="bf16")
    model = EmbeddingModel.from_run(args.run_dir, device=accelerator.device)
    spec = model.spec
    options = dict(spec=spec, batch_size=args.batch_size, workers=args.workers)
    for split in args.splits:
        started = time.perf_counter()
        rows = embed.embed_split(model.net, accelerator, args.shards, split, **options)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(
            f"evaluation embedding of {split}: {len(rows.ids)} images in {seconds:.1f} s, "
            f"{len(rows.ids) / seconds:.0f} images/s ({spec.image_size} px, batch {args.batch_size}, "
            f"{args.workers} workers, loader start-up included)",
            flush=True,
        )
    return 0


def augment(args: argparse.Namespace) -> int:
    """TrainAugment and EvalResize on the device: batches per second, and agreement with the CPU on the same crops;
    TorchCodec's batched nvJPEG decode against its CPU decode (tests/test_decode.py checks it where pytest is)."""
    import io

    import torch
    from PIL import Image

    from ranking.data.augment import EvalResize, TrainAugment, seeded_generator
    from ranking.data.decode import decode_jpeg, decode_jpegs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for size in args.sizes:
        train, evaluate = TrainAugment(args.image_size, mean, std), EvalResize(args.image_size, mean, std)
        images = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8)
        on_device = images.to(device)
        same = (train(on_device, seeded_generator(0)).cpu() - train(images, seeded_generator(0))).abs().max()
        same_eval = (evaluate(on_device).cpu() - evaluate(images)).abs().max()
        timings = {}

        def run_train(train=train, on_device=on_device):
            return train(on_device, seeded_generator(1))

        def run_eval(evaluate=evaluate, on_device=on_device):
            return evaluate(on_device)

        for name, transform in (("TrainAugment", run_train), ("EvalResize", run_eval)):
            timings[name] = seconds_per_call(transform, 3, args.repeats, sync)
        print(
            f"augment {size:>4} images 64 -> {args.image_size} px on {device}: TrainAugment "
            f"{1e3 * timings['TrainAugment']:.2f} ms ({size / timings['TrainAugment']:.0f} images/s), EvalResize "
            f"{1e3 * timings['EvalResize']:.2f} ms; max |device - cpu| {same:.1e} (train), {same_eval:.1e} (eval)",
            flush=True,
        )
    jpegs = []
    for seed in range(args.decode):
        buffer = io.BytesIO()
        pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    decode_jpegs(jpegs[:8], device=device)
    sync()
    started = time.perf_counter()
    decoded = decode_jpegs(jpegs, device=device)
    sync()
    seconds = time.perf_counter() - started
    worst = max(int((a.cpu().int() - decode_jpeg(j).int()).abs().max()) for a, j in zip(decoded, jpegs))
    print(
        f"augment decode_jpegs of {len(jpegs)} JPEGs on {device}: {len(jpegs) / seconds:.0f} images/s; "
        f"max level difference from the CPU's decode {worst}",
        flush=True,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install")
    p.add_argument("wheels")
    p.add_argument("target")
    p.set_defaults(run=install)
    p = sub.add_parser("ceiling")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.set_defaults(run=ceiling)
    p = sub.add_parser("train-summary")
    p.add_argument("run_dir")
    p.add_argument("--per-step", type=float, required=True, help="triplets per step, to give steps/s")
    p.add_argument("--drop", type=int, default=1, help="first logged intervals to leave out")
    p.add_argument("--label", default="trainer")
    p.add_argument("--unit", default="images", help="what triplets_per_s counts (batch sampler: images)")
    p.set_defaults(run=train_summary)
    p = sub.add_parser("util-summary")
    p.add_argument("file")
    p.add_argument("--label", default="utilization")
    p.set_defaults(run=util_summary)
    p = sub.add_parser("embed")
    p.add_argument("run_dir")
    p.add_argument("--shards", required=True)
    p.add_argument("--splits", nargs="+", default=["val", "train"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.set_defaults(run=embed)
    p = sub.add_parser("augment")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--decode", type=int, default=512, help="JPEGs in the batched decode")
    p.set_defaults(run=augment)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
