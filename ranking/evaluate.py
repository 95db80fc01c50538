"""`ranking evaluate`: embed gallery and queries over all ranks, then compute retrieval metrics with collectives.

    ranking evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR                  # one process
    accelerate launch -m ranking.evaluate --checkpoint RUN_DIR --shards DIR --out EVAL_DIR   # every rank

Writes EVAL_DIR/embeddings.pt, metrics.json and table.md (see DESIGN.md, "Evaluation folder"); EVAL_DIR defaults to
RUN_DIR/eval-<step>. Every rank embeds its share and evaluates its share of the queries; rank 0 only writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

from accelerate import Accelerator

from ranking import cli
from ranking.core import distributed, flags, logs, precision
from ranking.core.config import EvalConfig, TrainConfig
from ranking.core.errors import RankingError
from ranking.core.files import check_writable_folder
from ranking.folders import checkpoint, runfolder
from ranking.folders.shardformat import check_labels, split_counts
from ranking.learning.models import ModelSpec
from ranking.reporting import tracking
from ranking.retrieval import embed, evalfolder, validation
from ranking.retrieval.evalfolder import EvalIndex
from ranking.retrieval.inference import EmbeddingModel
from ranking.retrieval.metrics import EmbeddingSet, RetrievalMetrics, evaluate_retrieval

log = logging.getLogger("ranking.evaluate")


class Inputs(NamedTuple):
    """What rank 0 checked before any work, for every rank."""

    checkpoint: Path
    train_config: TrainConfig  # the run's (its shards, its W&B settings)
    spec: ModelSpec  # the run's model: every rank rebuilds it from this, config.yaml is read once
    shards: str
    counts: dict[str, int]
    out: Path
    gallery_ids: frozenset[int] | None  # --gallery-per-class: the fixed subset of the train split, else None


def check_inputs(cfg: EvalConfig) -> Inputs:
    """The checkpoint (and the run's config and model identity), the shards' splits and the output folder, before
    any image is embedded or anything is written."""
    if not cfg.checkpoint:
        raise RankingError("--checkpoint is required: a run folder or one of its checkpoints/step-* folders")
    checkpoint_dir = runfolder.resolve_checkpoint(cfg.checkpoint)
    run_dir = runfolder.run_of(checkpoint_dir)
    train_cfg = runfolder.read_config(run_dir)
    spec = ModelSpec.of_run(run_dir)
    step = checkpoint.load_weights(checkpoint_dir)[1]
    shards = cfg.shards or train_cfg.shards
    counts = split_counts(shards, [cfg.gallery_split, cfg.query_split])
    for split, count in counts.items():
        if count == 0:
            raise RankingError(f"{shards}: the {split} split is empty")
    check_labels(shards, counts)
    out = Path(cfg.out or evalfolder.default_dir(run_dir, step))
    check_writable_folder(out, "--out")
    gallery_ids = (
        validation.gallery_subset(shards, cfg.gallery_per_class, cfg.seed) if cfg.gallery_split == "train" else None
    )
    return Inputs(checkpoint_dir, train_cfg, spec, shards, counts, out, gallery_ids)


def check_complete(found: EmbeddingSet, expected: int, shards: str, split: str) -> None:
    """The gathered ids must be exactly 0..count-1 (they are sorted and unique): no sample lost or invented."""
    if len(found.ids) != expected or (expected and int(found.ids[-1]) != expected - 1):
        raise RankingError(
            f"{shards}: the {split} shards hold {len(found.ids)} distinct ids, manifest.json says "
            f"{expected} (ids 0..{expected - 1})"
        )


def check_subset(found: EmbeddingSet, wanted: frozenset[int], shards: str) -> None:
    if set(found.ids.tolist()) != wanted:
        raise RankingError(
            f"{shards}: the train shards hold {len(found.ids)} of the {len(wanted)} gallery ids chosen "
            "from their own labels"
        )


def wandb_names(split: str, k: int) -> dict[str, str]:
    """A split's metric name -> its W&B key: the val split on the names of the trainer's validation (``val/...``, so
    one panel shows both), any other split under ``eval/<split>/``; "queries" counts them."""
    prefix = validation.VAL_PREFIX if split == "val" else f"{tracking.EVAL_PREFIX}{split}/"
    return {**validation.metric_keys(k, prefix), "queries": f"{prefix}queries"}


def log_to_wandb(
    run_dir: Path,
    train_cfg: TrainConfig,
    cfg: EvalConfig,
    step: int,
    metrics: dict,
    out: Path,
    checkpoint_dir: Path,
    model_sha256: str,
) -> str | None:
    """The metrics as values and a table, and the PR curves as a table with a line plot (so runs overlay), in an
    "eval" run in the training run's group; the embeddings as an artifact with --wandb-artifacts. The run's config
    is what ran: ``cfg`` with its precision resolved, the checkpoint's step and sha256. Returns its URL or folder,
    or None when W&B is disabled."""

    def values(wandb: Any) -> dict[str, Any]:
        logged: dict[str, Any] = {
            names[key]: value
            for split, summary in metrics["splits"].items()
            for names in [wandb_names(split, cfg.k)]
            for key, value in summary.items()
            if key in names
        }
        header, rows = evalfolder.table_rows(metrics)
        logged[f"{tracking.EVAL_PREFIX}metrics"] = wandb.Table(columns=header, data=rows)
        curve = wandb.Table(
            columns=["split", "recall", "precision"],
            data=[
                [split, r, p]
                for split, points in metrics["pr_curve"].items()
                for r, p in zip(points["recall"], points["precision"])
            ],
        )
        logged[f"{tracking.EVAL_PREFIX}pr_curve"] = wandb.plot.line(
            curve, "recall", "precision", stroke="split", title=f"precision-recall, step {step}"
        )
        return logged

    artifacts = (
        {f"embeddings-{tracking.run_name(train_cfg, run_dir)}-step-{step}": ("embeddings", out / evalfolder.EMBEDDINGS)}
        if train_cfg.wandb_artifacts
        else None
    )
    ran = {
        **dataclasses.asdict(cfg),
        "checkpoint": str(checkpoint_dir),
        "checkpoint_step": step,
        "checkpoint_sha256": model_sha256,
    }
    return tracking.log_job(run_dir, train_cfg, "eval", step, values, config=ran, artifacts=artifacts)


def evaluate_splits(cfg: EvalConfig, gallery: EmbeddingSet, query: EmbeddingSet) -> dict[str, RetrievalMetrics]:
    """Queries against the gallery, and (gallery_metrics) the gallery against itself without the query (collective
    calls)."""
    options = dict(k=cfg.k, chunk_size=cfg.chunk_size, pr_points=cfg.pr_points, triplets=cfg.triplets, seed=cfg.seed)
    by_split: dict[str, RetrievalMetrics] = (
        {cfg.gallery_split: evaluate_retrieval(gallery, gallery, exclude_self=True, **options)}
        if cfg.gallery_metrics
        else {}
    )
    by_split[cfg.query_split] = evaluate_retrieval(
        query, gallery, exclude_self=cfg.query_split == cfg.gallery_split, **options
    )
    return by_split


def main(argv: list[str] | None = None) -> int:
    cfg = flags.parse(EvalConfig, argv, "ranking evaluate", "embed gallery and queries, compute retrieval metrics")
    chosen = precision.for_inference(precision.resolve(cfg.mixed_precision))
    accelerator = Accelerator(
        mixed_precision=chosen.value, kwargs_handlers=[distributed.process_group_kwargs(cfg.collective_timeout_s)]
    )
    logs.setup_logging(accelerator.process_index)
    inputs = distributed.decided_by_main(lambda: check_inputs(cfg))
    cfg.shards, counts, out = inputs.shards, inputs.counts, inputs.out
    train_cfg, spec = inputs.train_config, inputs.spec
    model = EmbeddingModel.from_run(inputs.checkpoint, cfg.flip, accelerator.device, spec)
    step = model.step
    run_dir = runfolder.run_of(inputs.checkpoint)
    if accelerator.is_main_process:
        log.info(f"{inputs.checkpoint} (step {step}), {chosen.describe()}, {accelerator.num_processes} process(es)")

    gallery, query = (
        embed.embed_split(
            model.net,
            accelerator,
            cfg.shards,
            split,
            spec=spec,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            flip=cfg.flip,
            only_ids=only_ids,
            total=counts[split],
        )
        for split, only_ids in ((cfg.gallery_split, inputs.gallery_ids), (cfg.query_split, None))
    )
    if inputs.gallery_ids is not None:
        check_subset(gallery, inputs.gallery_ids, cfg.shards)
    else:
        check_complete(gallery, counts[cfg.gallery_split], cfg.shards, cfg.gallery_split)
    check_complete(query, counts[cfg.query_split], cfg.shards, cfg.query_split)

    if accelerator.is_main_process:
        log.info(
            f"metrics: {len(query.ids)} {cfg.query_split} and {len(gallery.ids)} {cfg.gallery_split} queries "
            f"against {len(gallery.ids)} {cfg.gallery_split} images, on every rank's share"
        )
    by_split = evaluate_splits(cfg, gallery, query)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model_sha256 = checkpoint.state_sha256(inputs.checkpoint)
        EvalIndex(
            run_dir=str(run_dir),
            step=step,
            shards=str(Path(cfg.shards).resolve()),
            gallery_split=cfg.gallery_split,
            query_split=cfg.query_split,
            normalized=spec.normalize,
            flip=cfg.flip,
            gallery=gallery,
            query=query,
            model_sha256=model_sha256,
            embed_dim=spec.embed_dim,
            model=spec,
        ).save(out)
        metrics = evalfolder.metrics_record(step, cfg.k, by_split, spec)
        evalfolder.write_metrics(out, metrics)
        print(
            f"{run_dir} step {step}: {len(gallery.ids)} {cfg.gallery_split} gallery images, {len(query.ids)} "
            f"{cfg.query_split} queries, {accelerator.num_processes} process(es)\n\n"
            f"{evalfolder.markdown_table(metrics)}"
        )
        print(f"wrote {out}/{evalfolder.EMBEDDINGS}, {evalfolder.METRICS}, {evalfolder.TABLE}", flush=True)
        if train_cfg.wandb:
            where = log_to_wandb(
                run_dir,
                train_cfg,
                dataclasses.replace(cfg, mixed_precision=chosen.value),
                step,
                metrics,
                out,
                inputs.checkpoint,
                model_sha256,
            )
            print(tracking.logged_line(where), flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.evaluate")
