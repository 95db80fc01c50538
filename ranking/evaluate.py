"""`ranking evaluate`: embed gallery and queries over all ranks, then compute retrieval metrics with collectives.

    ranking evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR                  # one process
    accelerate launch -m ranking.evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR   # every rank

Writes EVAL_DIR/embeddings.pt, metrics.json and table.md (see DESIGN.md, "Evaluation folder"); EVAL_DIR defaults to
RUN_DIR/eval-<step>. Every rank embeds its share and evaluates its share of the queries; rank 0 only writes files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ranking import cli, config, embed, evalfolder, models, retrieval, runfolder, tracking
from ranking.config import EvalConfig, TrainConfig
from ranking.errors import RankingError
from ranking.evalfolder import EvalIndex
from ranking.retrieval import EmbeddingSet, RetrievalMetrics
from ranking.shardformat import split_counts


def precision(mixed_precision: str) -> str:
    """fp16 autocast needs a GPU; on a CPU-only machine evaluate in bf16 instead."""
    return "bf16" if mixed_precision == "fp16" and not torch.cuda.is_available() else mixed_precision


def check_complete(found: EmbeddingSet, expected: int, shards: str, split: str) -> None:
    """The gathered ids must be exactly 0..count-1 (they are sorted and unique): no sample lost or invented."""
    if len(found.ids) != expected or (expected and int(found.ids[-1]) != expected - 1):
        raise RankingError(f"{shards}: the {split} shards hold {len(found.ids)} distinct ids, manifest.json says "
                           f"{expected} (ids 0..{expected - 1})")


def log_to_wandb(run_dir: Path, train_cfg: TrainConfig, step: int, by_split: dict[str, RetrievalMetrics]) -> str:
    """Add the metrics to the run's W&B run. Returns its URL or folder."""
    values = {f"eval/{split}/{key}": value for split, metrics in by_split.items()
              for key, value in metrics.summary().items()}
    return tracking.log_into_run(run_dir, train_cfg.wandb_project, train_cfg.run_name or run_dir.resolve().name,
                                 lambda wandb: {"eval/step": step, **values})


def evaluate_splits(cfg: EvalConfig, gallery: EmbeddingSet, query: EmbeddingSet) -> dict[str, RetrievalMetrics]:
    """Queries against the gallery, and the gallery against itself without the query (collective calls)."""
    options = dict(k=cfg.k, chunk_size=cfg.chunk_size, pr_points=cfg.pr_points, triplets=cfg.triplets, seed=cfg.seed)
    return {
        cfg.gallery_split: retrieval.evaluate_retrieval(gallery, gallery, exclude_self=True, **options),
        cfg.query_split: retrieval.evaluate_retrieval(query, gallery, exclude_self=cfg.query_split == cfg.gallery_split,
                                                      **options),
    }


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(EvalConfig, argv, "ranking evaluate", "embed gallery and queries, compute retrieval metrics")
    if not cfg.checkpoint:
        raise RankingError("--checkpoint is required: a run folder or one of its checkpoints/step-* folders")
    checkpoint_dir = runfolder.resolve_checkpoint(cfg.checkpoint)
    run_dir = runfolder.run_of(checkpoint_dir)
    model, train_cfg, step = models.load_trained(checkpoint_dir)
    cfg.shards = cfg.shards or train_cfg.shards
    counts = split_counts(cfg.shards, [cfg.gallery_split, cfg.query_split])

    accelerator = Accelerator(mixed_precision=precision(cfg.mixed_precision))
    model = model.to(accelerator.device)
    mean, std = models.input_normalization(train_cfg.backbone)
    gallery, query = (embed.embed_split(model, accelerator, cfg.shards, split, image_size=train_cfg.image_size,
                                        mean=mean, std=std, batch_size=cfg.batch_size, workers=cfg.workers,
                                        dim=train_cfg.embed_dim, normalize=train_cfg.normalize, flip=cfg.flip)
                      for split in (cfg.gallery_split, cfg.query_split))
    check_complete(gallery, counts[cfg.gallery_split], cfg.shards, cfg.gallery_split)
    check_complete(query, counts[cfg.query_split], cfg.shards, cfg.query_split)

    by_split = evaluate_splits(cfg, gallery, query)
    if accelerator.is_main_process:
        out = Path(cfg.out or evalfolder.default_dir(run_dir, step))
        out.mkdir(parents=True, exist_ok=True)
        EvalIndex(run_dir=str(run_dir), step=step, shards=str(Path(cfg.shards).resolve()),
                  gallery_split=cfg.gallery_split, query_split=cfg.query_split, normalized=train_cfg.normalize,
                  flip=cfg.flip, gallery=gallery, query=query).save(out)
        metrics = evalfolder.metrics_record(step, cfg.k, by_split)
        evalfolder.write_metrics(out, metrics)
        print(f"{run_dir} step {step}: {len(gallery.ids)} {cfg.gallery_split} gallery images, {len(query.ids)} "
              f"{cfg.query_split} queries, {accelerator.num_processes} process(es)\n\n"
              f"{evalfolder.markdown_table(metrics)}")
        print(f"wrote {out}/{evalfolder.EMBEDDINGS}, {evalfolder.METRICS}, {evalfolder.TABLE}", flush=True)
        if train_cfg.wandb:
            print(f"logged to W&B: {log_to_wandb(run_dir, train_cfg, step, by_split)}", flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.evaluate")
