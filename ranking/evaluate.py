"""`ranking evaluate`: embed the gallery and the queries over all ranks, then compute retrieval metrics with collectives.

    ranking evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR                  # one process
    accelerate launch -m ranking.evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR   # every rank

Writes EVAL_DIR/embeddings.pt, metrics.json and table.md (see DESIGN.md, "Evaluation folder"); EVAL_DIR defaults to
RUN_DIR/eval-<step>. Every rank embeds its share and evaluates its share of the queries; rank 0 only writes files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from ranking import checkpoint, cli, config, embed, models, report, retrieval
from ranking.config import EvalConfig, TrainConfig
from ranking.errors import RankingError
from ranking.files import write_atomically, write_text_atomically
from ranking.retrieval import EmbeddingSet, RetrievalMetrics

def precision(mixed_precision: str) -> str:
    """fp16 autocast needs a GPU; on a CPU-only machine evaluate in bf16 instead."""
    return "bf16" if mixed_precision == "fp16" and not torch.cuda.is_available() else mixed_precision


def split_counts(shards: str, splits: list[str]) -> dict[str, int]:
    """Sample count of each split from the manifest, read before any embedding so a bad folder fails fast."""
    from ranking.shards import load_manifest

    manifest = load_manifest(shards)
    missing = [split for split in splits if split not in manifest["splits"]]
    if missing:
        raise RankingError(f"{shards}: no {', '.join(missing)} split in manifest.json")
    return {split: manifest["splits"][split]["count"] for split in splits}


def check_complete(found: EmbeddingSet, expected: int, shards: str, split: str) -> None:
    """The gathered ids must be exactly 0..count-1 (they are sorted and unique): no sample lost or invented."""
    if len(found.ids) != expected or (expected and int(found.ids[-1]) != expected - 1):
        raise RankingError(f"{shards}: the {split} shards hold {len(found.ids)} distinct ids, manifest.json says "
                           f"{expected} (ids 0..{expected - 1})")


def embeddings_file(run_dir: Path, step: int, cfg: EvalConfig, normalized: bool, gallery: EmbeddingSet,
                    query: EmbeddingSet) -> dict:
    as_dict = lambda s: {"embeddings": s.embeddings.cpu(), "ids": s.ids.cpu(), "labels": s.labels.cpu()}  # noqa: E731
    return {"run_dir": str(run_dir), "step": step, "shards": str(Path(cfg.shards).resolve()), "gallery_split": cfg.gallery_split,
            "query_split": cfg.query_split, "normalized": normalized, "flip": cfg.flip, "gallery": as_dict(gallery),
            "query": as_dict(query)}


def metrics_file(step: int, k: int, by_split: dict[str, RetrievalMetrics]) -> dict:
    return {"k": k, "step": step, "splits": {name: m.summary() for name, m in by_split.items()},
            "pr_curve": {name: {"recall": m.recall_levels, "precision": m.pr_precision}
                         for name, m in by_split.items()}}


def log_to_wandb(run_dir: Path, train_cfg: TrainConfig, step: int, by_split: dict[str, RetrievalMetrics]) -> str:
    """Add the metrics to the run's W&B run (resumed by id; offline without an API key). Returns its URL or folder."""
    import wandb

    run_id = report.wandb_run_id(run_dir)
    name = None if run_id else train_cfg.run_name or run_dir.resolve().name
    run = wandb.init(id=run_id, resume="allow", dir=str(run_dir), project=train_cfg.wandb_project, name=name,
                     mode=report.wandb_mode())
    try:
        values = {f"eval/{split}/{key}": value for split, metrics in by_split.items()
                  for key, value in metrics.summary().items()}
        run.log({"eval/step": step, **values})
        return run.url or run.dir
    finally:
        run.finish()


def evaluate_splits(cfg: EvalConfig, gallery: EmbeddingSet, query: EmbeddingSet) -> dict[str, RetrievalMetrics]:
    """Queries against the gallery, and the gallery against itself without the query (collective calls)."""
    options = dict(k=cfg.k, chunk_size=cfg.chunk_size, pr_points=cfg.pr_points, triplets=cfg.triplets, seed=cfg.seed)
    return {
        cfg.gallery_split: retrieval.evaluate_retrieval(gallery, gallery, exclude_self=True, **options),
        cfg.query_split: retrieval.evaluate_retrieval(query, gallery, exclude_self=cfg.query_split == cfg.gallery_split,
                                                      **options),
    }


def write_outputs(out: Path, cfg: EvalConfig, run_dir: Path, step: int, normalized: bool, gallery: EmbeddingSet,
                  query: EmbeddingSet, by_split: dict[str, RetrievalMetrics]) -> str:
    """EVAL/embeddings.pt, metrics.json and table.md, each written atomically; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    stored = embeddings_file(run_dir, step, cfg, normalized, gallery, query)
    write_atomically(out / "embeddings.pt", lambda f: torch.save(stored, f))
    metrics = metrics_file(step, cfg.k, by_split)
    write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    table = report.markdown_table(metrics)
    write_text_atomically(out / "table.md", table)
    return table


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(EvalConfig, argv, "ranking evaluate", "embed gallery and queries, compute retrieval metrics")
    if not cfg.checkpoint:
        raise RankingError("--checkpoint is required: a run folder or one of its checkpoints/step-* folders")
    if cfg.chunk_size < 1 or cfg.batch_size < 1 or cfg.pr_points < 2 or cfg.triplets < 0:
        raise RankingError("chunk_size and batch_size must be at least 1, pr_points at least 2, triplets at least 0")
    checkpoint_dir = checkpoint.resolve(cfg.checkpoint)
    run_dir = checkpoint_dir.parent.parent
    model, train_cfg, step = checkpoint.load_model(checkpoint_dir)
    cfg.shards = cfg.shards or train_cfg.shards
    counts = split_counts(cfg.shards, [cfg.gallery_split, cfg.query_split])

    accelerator = Accelerator(mixed_precision=precision(cfg.mixed_precision))
    model = model.to(accelerator.device)
    mean, std = models.input_normalization(train_cfg.backbone)
    options = dict(image_size=train_cfg.image_size, mean=mean, std=std, batch_size=cfg.batch_size,
                   workers=cfg.workers, dim=train_cfg.embed_dim, normalize=train_cfg.normalize, flip=cfg.flip)
    gallery, query = (embed.embed_split(model, accelerator, cfg.shards, split, **options)
                      for split in (cfg.gallery_split, cfg.query_split))
    check_complete(gallery, counts[cfg.gallery_split], cfg.shards, cfg.gallery_split)
    check_complete(query, counts[cfg.query_split], cfg.shards, cfg.query_split)

    by_split = evaluate_splits(cfg, gallery, query)
    if accelerator.is_main_process:
        out = Path(cfg.out or run_dir / f"eval-{step:07d}")
        table = write_outputs(out, cfg, run_dir, step, train_cfg.normalize, gallery, query, by_split)
        print(f"{run_dir} step {step}: {len(gallery.ids)} {cfg.gallery_split} gallery images, {len(query.ids)} "
              f"{cfg.query_split} queries, {accelerator.num_processes} process(es)\n\n{table}")
        print(f"wrote {out}/embeddings.pt, metrics.json, table.md", flush=True)
        if train_cfg.wandb:
            print(f"logged to W&B: {log_to_wandb(run_dir, train_cfg, step, by_split)}", flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.evaluate")
