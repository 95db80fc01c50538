"""`ranking report RUN_DIR [EVAL_DIR]`: what people look at after a run.

Writes, each file atomically:
- ``RUN/loss.png``: loss and active-triplet fraction against the step, from ``RUN/metrics.jsonl``;
- ``EVAL/pr_curve.png``: the precision-recall curves of the val and train queries, from ``EVAL/metrics.json``;
- ``EVAL/ranked_<i>.png``: for val queries of different classes, the query, its nearest and its farthest gallery
  images, captioned with their distances and bordered green (same class) or red (other class);
and prints the train/val precision table. The pictures and the table also go to the run's W&B run.

Gallery images are read from the shards by id (``ranking.folders.shardformat``); each split's id -> (shard, file, wnid,
words) index is cached in EVAL as ``<split>-index.json``, which ``ranking search`` shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ranking.core.config import TrainConfig
from ranking.core.errors import RankingError
from ranking.core.files import check_writable_folder
from ranking.core.flags import at_least, at_most, parse
from ranking.folders import runfolder
from ranking.folders.shardformat import SampleInfo, read_images, split_index
from ranking.learning.distances import squared_distances
from ranking.reporting import tracking
from ranking.reporting.grids import OTHER_CLASS, QUERY, SAME_CLASS, Tile, caption, draw_grid, save_png, short_name
from ranking.reporting.plots import plot_loss, plot_pr_curve
from ranking.retrieval import evalfolder
from ranking.retrieval.evalfolder import EvalIndex

MAX_GRID = 50  # queries and images per row a grid can show legibly (ReportConfig's help says 50)

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


def ranked_queries(index: EvalIndex, count: int = 5, k: int = 10) -> list[RankedQuery]:
    query, gallery = index.query, index.gallery
    rows = pick_queries(query.labels, count)
    distances = squared_distances(query.embeddings[rows], gallery.embeddings)
    order = distances.sort(dim=1, stable=True).indices  # equal distances ranked by gallery id, as in the metrics
    k = min(k, gallery.embeddings.shape[0])
    ranked = []
    for i, row in enumerate(rows):
        ids, row_distances = gallery.ids[order[i]].tolist(), distances[i, order[i]].tolist()
        ranked.append(
            RankedQuery(
                int(query.ids[row]),
                int(query.labels[row]),
                nearest=list(zip(ids[:k], row_distances[:k])),
                farthest=list(zip(ids[-k:], row_distances[-k:])),
            )
        )
    return ranked


def ranked_grid(
    ranked: RankedQuery,
    query_info: SampleInfo,
    query_image: Image.Image,
    gallery_index: dict[int, SampleInfo],
    gallery_images: dict[int, Image.Image],
) -> Image.Image:
    """Row 0: the query and its nearest; row 1: its farthest. Green border: same class as the query."""

    def tiles(pairs: list[tuple[int, float]]) -> list[Tile]:
        return [
            Tile(
                gallery_images[i],
                caption(gallery_index[i], d),
                SAME_CLASS if gallery_index[i].label == ranked.label else OTHER_CLASS,
            )
            for i, d in pairs
        ]

    query_tile = Tile(query_image, ["query", short_name(query_info)], QUERY)
    k = len(ranked.nearest)
    title = (
        f"{query_info.file}: top row: its {k} nearest gallery images; bottom row: its {k} farthest "
        "(green: same class, red: other class; d = squared distance)"
    )
    return draw_grid(
        [
            [query_tile, *tiles(ranked.nearest)],
            [Tile(None, ["farthest", f"{k} of {len(gallery_index)}"]), *tiles(ranked.farthest)],
        ],
        title,
    )


@dataclass
class RankedResults:
    """The ranked examples with what drawing them needs: sample infos and images by id."""

    ranked: list[RankedQuery]
    query_index: dict[int, SampleInfo]
    gallery_index: dict[int, SampleInfo]
    query_images: dict[int, Image.Image]
    gallery_images: dict[int, Image.Image]

    def rows(self) -> list[list[Any]]:
        """One row per shown result: query, which end of the ranking, rank, result, distance, same class."""
        rows = []
        for r in self.ranked:
            query = self.query_index[r.query_id]
            for end, pairs, first in (
                ("nearest", r.nearest, 1),
                ("farthest", r.farthest, len(self.gallery_index) - len(r.farthest) + 1),
            ):
                for rank, (gallery_id, distance) in enumerate(pairs, first):
                    info = self.gallery_index[gallery_id]
                    rows.append(
                        [
                            r.query_id,
                            query.file,
                            short_name(query),
                            self.query_images[r.query_id],
                            end,
                            rank,
                            gallery_id,
                            info.file,
                            short_name(info),
                            self.gallery_images[gallery_id],
                            distance,
                            info.label == r.label,
                        ]
                    )
        return rows


RANKED_COLUMNS = [
    "query id",
    "query file",
    "query class",
    "query",
    "end",
    "rank",
    "result id",
    "result file",
    "result class",
    "result",
    "squared distance",
    "same class",
]


def ranked_results(index: EvalIndex, eval_dir: Path, shards_dir: Path, count: int = 5, k: int = 10) -> RankedResults:
    query_index = split_index(shards_dir, index.query_split, eval_dir)
    gallery_index = split_index(shards_dir, index.gallery_split, eval_dir)
    ranked = ranked_queries(index, count, k)
    query_images = read_images(shards_dir, index.query_split, [query_index[r.query_id] for r in ranked])
    shown = {i for r in ranked for i, _ in r.nearest + r.farthest}
    gallery_images = read_images(shards_dir, index.gallery_split, [gallery_index[i] for i in sorted(shown)])
    return RankedResults(ranked, query_index, gallery_index, query_images, gallery_images)


def write_ranked_grids(results: RankedResults, eval_dir: Path) -> list[Path]:
    for old in eval_dir.glob("ranked_*.png"):  # a rerun with fewer queries leaves no stale grids
        old.unlink()
    return [
        save_png(
            ranked_grid(
                r,
                results.query_index[r.query_id],
                results.query_images[r.query_id],
                results.gallery_index,
                results.gallery_images,
            ),
            eval_dir / f"ranked_{n}.png",
        )
        for n, r in enumerate(results.ranked)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Weights & Biases


def log_to_wandb(
    run_dir: Path,
    config: TrainConfig,
    step: int,
    images: dict[str, Path],
    metrics: dict | None,
    results: RankedResults | None,
    evaluation: tuple[Path, EvalIndex] | None,
) -> str | None:
    """Log the pictures, the metrics and the ranked results as tables, in a "report" run in the training run's
    group, with the evaluation's checkpoint step and sha256 in its config; returns the run's folder (or URL when
    online), or None when W&B is disabled."""

    def values(wandb: Any) -> dict[str, Any]:
        logged: dict[str, Any] = {f"report/{name}": wandb.Image(str(path)) for name, path in images.items()}
        if metrics is not None:
            header, rows = evalfolder.table_rows(metrics)
            logged["report/metrics"] = wandb.Table(columns=header, data=rows)
        if results is not None:
            rows = [
                [wandb.Image(cell) if isinstance(cell, Image.Image) else cell for cell in row] for row in results.rows()
            ]
            logged["report/ranked_results"] = wandb.Table(columns=RANKED_COLUMNS, data=rows)
        return logged

    evaluated = (
        {}
        if evaluation is None
        else {
            "eval_dir": str(evaluation[0]),
            "checkpoint_step": evaluation[1].step,
            "checkpoint_sha256": evaluation[1].model_sha256,
        }
    )
    return tracking.log_job(run_dir, config, "report", step, values, config=evaluated)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ReportConfig:
    # inputs
    run_dir: str = field(metadata={"positional": True})  # the run folder (metrics.jsonl, config.yaml, checkpoints/)
    # the evaluation folder; empty: the newest in RUN_DIR
    eval_dir: str = field(default="", metadata={"positional": True})
    shards: str = ""  # the shards folder, if it moved since the evaluation

    # ranked examples
    queries: int = 5  # val queries shown, each from a different class (1 to 50)
    top: int = 10  # nearest and farthest gallery images per query (1 to 50)

    # Weights & Biases
    wandb: bool = True  # log the pictures and the table to the run's W&B run

    def validate(self) -> None:
        for name in ("queries", "top"):
            at_least(f"--{name}", getattr(self, name), 1)
            at_most(f"--{name}", getattr(self, name), MAX_GRID)


def main(argv: list[str] | None = None) -> int:
    config = parse(ReportConfig, argv, "ranking report", __doc__.split("\n\n")[0], config_file=False)
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise RankingError(f"{run_dir}: no such run folder")

    # every input is read and checked before the first picture is written
    records = runfolder.read_metrics_log(run_dir)
    run_config = (
        runfolder.read_config(run_dir)
        if runfolder.config_path(run_dir).is_file()
        else TrainConfig(run_dir=str(run_dir))
    )  # its W&B settings
    step = records[-1]["step"] if records else 0
    eval_dir = Path(config.eval_dir) if config.eval_dir else evalfolder.find_in_run(run_dir)
    metrics, results = None, None
    if eval_dir is not None:
        metrics = evalfolder.read_metrics(eval_dir)
        index = evalfolder.EvalIndex.load(eval_dir)
        shards = index.shards_dir(eval_dir, config.shards or None)
        check_writable_folder(eval_dir, "EVAL_DIR")
    check_writable_folder(run_dir, "RUN_DIR")

    images = {"loss_curve": plot_loss(records, run_dir / runfolder.LOSS_PLOT, run_dir.resolve().name)}
    if eval_dir is None:
        print(f"no evaluation folder in {run_dir} (run `ranking evaluate`): only the loss curve")
    else:
        assert metrics is not None
        images["pr_curve"] = plot_pr_curve(metrics, eval_dir / "pr_curve.png")
        step = index.step
        results = ranked_results(index, eval_dir, shards, config.queries, config.top)
        for n, path in enumerate(write_ranked_grids(results, eval_dir)):
            images[f"ranked_{n}"] = path
        print(evalfolder.markdown_table(metrics))

    for path in images.values():
        print(f"wrote {path}")
    if config.wandb and run_config.wandb:
        evaluation = (eval_dir, index) if eval_dir is not None else None
        print(tracking.logged_line(log_to_wandb(run_dir, run_config, step, images, metrics, results, evaluation)))
    return 0
