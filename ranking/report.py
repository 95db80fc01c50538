"""`ranking report RUN_DIR [EVAL_DIR]`: what people look at after a run.

Writes, each file atomically:
- ``RUN/loss.png``: loss and active-triplet fraction against the step, from ``RUN/metrics.jsonl``;
- ``EVAL/pr_curve.png``: the precision-recall curves of the val and train queries, from ``EVAL/metrics.json``;
- ``EVAL/ranked_<i>.png``: for val queries of different classes, the query, its nearest and its farthest gallery
  images, captioned with their distances and bordered green (same class) or red (other class);
and prints the train/val precision table. The pictures and the table also go to the run's W&B run.

Gallery images are read from the shards by id; each split's id -> (shard, file, wnid, words) index is cached in
EVAL as ``<split>-index.json`` (``ranking search`` shares it, and the drawing code: :func:`draw_grid`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402

from ranking.errors import RankingError  # noqa: E402
from ranking.files import write_atomically  # noqa: E402
from ranking.retrieval import squared_distances  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# PNG files (written atomically)


def save_png(image: Image.Image, path: Path) -> Path:
    return write_atomically(path, lambda f: image.save(f, format="PNG"))


def save_figure(figure: plt.Figure, path: Path) -> Path:
    try:
        return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------
# inputs: the run's metrics log, the evaluation folder


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``, one per logged step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RankingError(f"{path}: not found (is {run_dir} a run folder written by `ranking train`?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RankingError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RankingError(f"{path}: line {number} has no step")
        records.append(record)
    return records


def read_metrics(eval_dir: Path) -> dict:
    path = eval_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise RankingError(f"{path}: not found (run `ranking evaluate` first?)") from None
    except json.JSONDecodeError as e:
        raise RankingError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("splits"), dict):
        raise RankingError(f"{path}: no 'splits' entry")
    return metrics


def read_embeddings(eval_dir: Path) -> dict:
    """``EVAL/embeddings.pt`` as written by ``ranking evaluate`` (see DESIGN.md, "Evaluation folder")."""
    path = eval_dir / "embeddings.pt"
    if not path.is_file():
        raise RankingError(f"{path}: not found (run `ranking evaluate` first?)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise RankingError(f"{path}: cannot load ({str(e).splitlines()[0]})") from None
    for part in ("gallery", "query"):
        if not isinstance(data, dict) or not all(k in data.get(part, {}) for k in ("embeddings", "ids", "labels")):
            raise RankingError(f"{path}: missing {part} embeddings, ids or labels")
    return data


def find_eval_dir(run_dir: Path) -> Path | None:
    """The most recently written evaluation folder of a run (any sub-folder holding metrics.json)."""
    candidates = [p.parent for p in run_dir.glob("*/metrics.json")]
    return max(candidates, key=lambda p: (p / "metrics.json").stat().st_mtime) if candidates else None


def resolve_shards(eval_data: dict, eval_dir: Path, override: str | None) -> Path:
    """The shards an evaluation read (a relative path starts where `ranking evaluate` ran), or ``override``."""
    shards = Path(override or eval_data.get("shards") or "")
    if not (shards / "manifest.json").is_file():
        raise RankingError(f"{eval_dir / 'embeddings.pt'}: its shards folder {str(shards)!r} has no manifest.json "
                           "(pass --shards DIR)")
    return shards


# ---------------------------------------------------------------------------------------------------------------
# samples from the shards, by id


@dataclass(frozen=True)
class SampleInfo:
    id: int
    label: int
    file: str
    wnid: str | None
    words: str | None
    shard: str  # file name inside the shards folder


def split_index(shards_dir: Path, split: str, cache_dir: Path | None = None) -> dict[int, SampleInfo]:
    """id -> SampleInfo for every sample of ``split``, from the samples' json; cached in ``cache_dir``.

    The cache names the shards it was built from (name and sha256 from the manifest) and is rebuilt when they change.
    """
    from ranking.shards import load_manifest

    shard_list = load_manifest(shards_dir)["splits"][split]["shards"]
    cache = cache_dir / f"{split}-index.json" if cache_dir else None
    if cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("shards") == shard_list:
                return {s["id"]: SampleInfo(**s) for s in cached["samples"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a stale or foreign cache is rebuilt
    index = {info.id: info for shard in shard_list for info in _scan_shard(shards_dir / shard["name"])}
    if cache:
        samples = [asdict(index[i]) for i in sorted(index)]
        payload = json.dumps({"shards": shard_list, "samples": samples}).encode()
        try:
            write_atomically(cache, lambda f: f.write(payload))
        except OSError:
            pass  # a read-only index folder: scan again next time
    return index


def _scan_shard(path: Path) -> Iterable[SampleInfo]:
    """The json of every sample in one tar; tarfile seeks over the JPEG bytes instead of reading them."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    yield SampleInfo(id=int(meta["id"]), label=int(meta["label"]), file=str(meta["file"]),
                                     wnid=meta.get("wnid"), words=meta.get("words"), shard=path.name)
    except (OSError, tarfile.TarError) as e:
        raise RankingError(f"{path}: cannot read shard ({e})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RankingError(f"{path}: a sample's json is not in the shard format ({e})") from None


def read_images(shards_dir: Path, split: str, samples: Iterable[SampleInfo]) -> dict[int, Image.Image]:
    """id -> RGB image of each requested sample, opening each shard that holds one of them once."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for info in samples:
        by_shard[info.shard].append(info.id)
    images = {}
    for shard, ids in by_shard.items():
        path = shards_dir / shard
        try:
            with tarfile.open(path) as tar:
                for sample_id in ids:
                    data = tar.extractfile(f"{split}_{sample_id:07d}.jpg").read()
                    with Image.open(io.BytesIO(data)) as image:
                        images[sample_id] = image.convert("RGB")
        except (OSError, tarfile.TarError, KeyError) as e:
            raise RankingError(f"{path}: cannot read a sample image ({e})") from None
    return images


# ---------------------------------------------------------------------------------------------------------------
# result grids (shared with `ranking search`)

TILE = 128  # pixels of an image in a grid; Tiny ImageNet's 64 px images are upsampled 2x
BORDER = 6
CAPTION = 30  # two lines of text under each tile
GAP = 4
TITLE = 24
CELL_WIDTH = TILE + 2 * BORDER
CELL_HEIGHT = TILE + 2 * BORDER + CAPTION
SAME_CLASS = (30, 160, 60)
OTHER_CLASS = (210, 40, 40)
NEUTRAL = (150, 150, 150)
QUERY = (40, 90, 200)
BACKGROUND = (255, 255, 255)


@dataclass
class Tile:
    """One cell of a grid: an image (or None for a text-only cell), its caption lines and its border colour."""

    image: Image.Image | None
    caption: Sequence[str]
    border: tuple[int, int, int] = NEUTRAL


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    return columns * CELL_WIDTH + (columns + 1) * GAP, TITLE + rows * CELL_HEIGHT + (rows + 1) * GAP


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of a cell's border."""
    return GAP + column * (CELL_WIDTH + GAP), TITLE + GAP + row * (CELL_HEIGHT + GAP)


def draw_grid(rows: Sequence[Sequence[Tile | None]], title: str = "") -> Image.Image:
    """Rows of captioned, bordered tiles (None leaves a cell empty); images are padded to TILE x TILE, bicubic."""
    columns = max((len(row) for row in rows), default=1)
    canvas = Image.new("RGB", grid_size(len(rows), columns), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((GAP, GAP), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is not None:
                _draw_tile(canvas, draw, font, tile, *cell_origin(r, c))
    return canvas


def _draw_tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, tile: Tile,
               x: int, y: int) -> None:
    caption_y = y + TILE + 2 * BORDER + 2
    if tile.image is None:  # a text-only cell: the caption, centred where the image would be
        caption_y = y + TILE // 2
    else:
        draw.rectangle((x, y, x + CELL_WIDTH - 1, y + TILE + 2 * BORDER - 1), fill=tile.border)
        image = ImageOps.pad(tile.image.convert("RGB"), (TILE, TILE), method=Image.Resampling.BICUBIC,
                             color=BACKGROUND)
        canvas.paste(image, (x + BORDER, y + BORDER))
    for i, line in enumerate(tile.caption[:2]):
        draw.text((x + 2, caption_y + 13 * i), _fit(draw, font, line, CELL_WIDTH - 4), fill=(0, 0, 0), font=font)


def _fit(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def short_name(info: SampleInfo) -> str:
    """The first of a class's words ("goldfish, Carassius auratus" -> "goldfish")."""
    return (info.words or info.wnid or "?").split(",")[0]


def caption(info: SampleInfo, distance: float) -> list[str]:
    return [f"d={distance:.3f}", short_name(info)]


# ---------------------------------------------------------------------------------------------------------------
# ranked examples: a few val queries of different classes, their nearest and farthest gallery items


@dataclass
class RankedQuery:
    query_id: int
    label: int
    nearest: list[tuple[int, float]]  # (gallery id, squared distance), nearest first
    farthest: list[tuple[int, float]]  # (gallery id, squared distance), the farthest last


def pick_queries(labels: torch.Tensor, count: int) -> list[int]:
    """Row indices of ``count`` queries of different classes, spread over the classes (the first query of each)."""
    classes = labels.unique(sorted=True)
    chosen = torch.linspace(0, len(classes) - 1, min(count, len(classes))).round().long()
    return [int((labels == classes[c]).nonzero()[0]) for c in chosen.unique()]


def ranked_queries(eval_data: dict, count: int = 5, k: int = 10) -> list[RankedQuery]:
    query, gallery = eval_data["query"], eval_data["gallery"]
    rows = pick_queries(query["labels"], count)
    g = gallery["embeddings"].float()
    distances = squared_distances(query["embeddings"][rows].float(), g, g.pow(2).sum(1))
    order = distances.sort(dim=1, stable=True).indices  # equal distances ranked by gallery id, as in the metrics
    k = min(k, g.shape[0])
    ranked = []
    for i, row in enumerate(rows):
        ids, row_distances = gallery["ids"][order[i]].tolist(), distances[i, order[i]].tolist()
        ranked.append(RankedQuery(int(query["ids"][row]), int(query["labels"][row]),
                                  nearest=list(zip(ids[:k], row_distances[:k])),
                                  farthest=list(zip(ids[-k:], row_distances[-k:]))))
    return ranked


def ranked_grid(ranked: RankedQuery, query_info: SampleInfo, query_image: Image.Image,
                gallery_index: dict[int, SampleInfo], gallery_images: dict[int, Image.Image]) -> Image.Image:
    """Row 0: the query and its nearest; row 1: its farthest. Green border: same class as the query."""
    def tiles(pairs: list[tuple[int, float]]) -> list[Tile]:
        return [Tile(gallery_images[i], caption(gallery_index[i], d),
                     SAME_CLASS if gallery_index[i].label == ranked.label else OTHER_CLASS) for i, d in pairs]

    query_tile = Tile(query_image, ["query", short_name(query_info)], QUERY)
    k = len(ranked.nearest)
    title = (f"{query_info.file}: top row: its {k} nearest gallery images; bottom row: its {k} farthest "
             "(green: same class, red: other class; d = squared distance)")
    return draw_grid([[query_tile, *tiles(ranked.nearest)],
                      [Tile(None, ["farthest", f"{k} of {len(gallery_index)}"]), *tiles(ranked.farthest)]], title)


def write_ranked_grids(eval_data: dict, eval_dir: Path, shards_dir: Path, count: int = 5,
                       k: int = 10) -> list[Path]:
    query_split, gallery_split = eval_data.get("query_split", "val"), eval_data.get("gallery_split", "train")
    query_index = split_index(shards_dir, query_split, eval_dir)
    gallery_index = split_index(shards_dir, gallery_split, eval_dir)
    ranked = ranked_queries(eval_data, count, k)
    query_images = read_images(shards_dir, query_split, [query_index[r.query_id] for r in ranked])
    shown = {i for r in ranked for i, _ in r.nearest + r.farthest}
    gallery_images = read_images(shards_dir, gallery_split, [gallery_index[i] for i in sorted(shown)])
    for old in eval_dir.glob("ranked_*.png"):  # a rerun with fewer queries leaves no stale grids
        old.unlink()
    return [save_png(ranked_grid(r, query_index[r.query_id], query_images[r.query_id], gallery_index,
                                 gallery_images), eval_dir / f"ranked_{n}.png") for n, r in enumerate(ranked)]


# ---------------------------------------------------------------------------------------------------------------
# plots and the table

TABLE_COLUMNS = {"precision_at_k": "precision@{k}", "knn1_accuracy": "kNN-1", "hit_at_k": "hit@{k}", "map": "mAP",
                 "map_at_r": "MAP@R", "triplet_accuracy": "triplet accuracy"}  # the columns of evaluate's table.md


def table_rows(metrics: dict) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per split (train first, like the seeds' table), with the fractions of metrics.json."""
    k = metrics.get("k", 30)
    header = ["split"] + [title.format(k=k) for title in TABLE_COLUMNS.values()]
    splits = sorted(metrics["splits"], key=lambda s: (s != "train", s))
    return header, [[s] + [float(metrics["splits"][s].get(key, math.nan)) for key in TABLE_COLUMNS] for s in splits]


def markdown_table(metrics: dict) -> str:
    """The train/val table in percent, formatted as evaluate's table.md."""
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row[0]] + [f"{100 * v:.2f}" for v in row[1:]]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_loss(records: list[dict], path: Path, title: str) -> Path:
    figure, (loss_axes, active_axes) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for axes, key, label in ((loss_axes, "loss", "loss"), (active_axes, "active_fraction", "active triplets")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        axes.plot(*zip(*points) if points else ([], []), linewidth=1.2)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    active_axes.set_ylim(0, 1.05)
    active_axes.set_xlabel("step")
    loss_axes.set_title(f"training of {title}: loss and share of active (margin-violating) triplets")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_pr_curve(metrics: dict, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 5))
    for split in sorted(metrics.get("pr_curve", {}), key=lambda s: (s != "train", s)):
        curve = metrics["pr_curve"][split]
        mean_ap = metrics["splits"].get(split, {}).get("map", math.nan)
        axes.plot(curve["recall"], curve["precision"], label=f"{split} (mAP {mean_ap:.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"precision-recall, step {metrics.get('step', '?')}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id the trainer logged to: RUN/wandb_run_id, else the latest checkpoint's state.pt."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip() or None
    state = run_dir / "checkpoints" / "latest" / "state.pt"
    if state.is_file():
        try:  # mmap: only the small entry is read, not the weights
            return torch.load(state, map_location="cpu", weights_only=True, mmap=True).get("wandb_run_id") or None
        except Exception as e:
            raise RankingError(f"{state}: cannot load ({str(e).splitlines()[0]})") from None
    return None


def wandb_mode() -> str:
    """Offline when there is no API key (the files go to RUN/wandb and `wandb sync` uploads them later)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def log_to_wandb(run_dir: Path, images: dict[str, Path], metrics: dict | None) -> str | None:
    """Log the pictures (and the table) to the run's W&B run; returns the run's folder (or URL when online)."""
    import wandb

    from ranking.config import TrainConfig, build

    config = build(TrainConfig, str(run_dir / "config.yaml")) if (run_dir / "config.yaml").is_file() else None
    if config is not None and not config.wandb:
        return None
    project = config.wandb_project if config else "deep-ranking"
    run_id = wandb_run_id(run_dir)
    name = None if run_id else (config.run_name if config else "") or run_dir.resolve().name  # keep a resumed name
    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), project=project, name=name, mode=wandb_mode())
    try:
        logged: dict[str, Any] = {f"report/{name}": wandb.Image(str(path)) for name, path in images.items()}
        if metrics is not None:
            header, rows = table_rows(metrics)
            logged["report/metrics"] = wandb.Table(columns=header, data=rows)
        run.log(logged)
        return run.url or run.dir
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ranking report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run folder (metrics.jsonl, config.yaml, checkpoints/)")
    parser.add_argument("eval_dir", type=Path, nargs="?", help="the evaluation folder (default: the newest in RUN)")
    parser.add_argument("--shards", default=None, help="shards folder, if it moved since the evaluation")
    parser.add_argument("--queries", type=int, default=5, help="val queries shown, each from a different class")
    parser.add_argument("--top", type=int, default=10, help="nearest and farthest gallery images per query")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                        help="log the pictures and the table to the run's W&B run")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        raise RankingError(f"{args.run_dir}: no such run folder")

    images = {"loss_curve": plot_loss(read_metrics_log(args.run_dir), args.run_dir / "loss.png",
                                      args.run_dir.resolve().name)}
    eval_dir, metrics = args.eval_dir or find_eval_dir(args.run_dir), None
    if eval_dir is None:
        print(f"no evaluation folder in {args.run_dir} (run `ranking evaluate`): only the loss curve")
    else:
        metrics = read_metrics(eval_dir)
        images["pr_curve"] = plot_pr_curve(metrics, eval_dir / "pr_curve.png")
        eval_data = read_embeddings(eval_dir)
        shards = resolve_shards(eval_data, eval_dir, args.shards)
        for n, path in enumerate(write_ranked_grids(eval_data, eval_dir, shards, args.queries, args.top)):
            images[f"ranked_{n}"] = path
        print(markdown_table(metrics))

    for path in images.values():
        print(f"wrote {path}")
    if args.wandb:
        where = log_to_wandb(args.run_dir, images, metrics)
        if where:
            print(f"logged to W&B: {where}")
    return 0
