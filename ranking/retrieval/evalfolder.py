"""The evaluation folder's contract (DESIGN.md "Evaluation folder"): ``ranking evaluate`` writes it, the report
and search read it, all through this module.

    EVAL/embeddings.pt   an EvalIndex: gallery and query embeddings with their ids and labels, and where they came from
    EVAL/metrics.json    the retrieval metrics of each split and their PR curves
    EVAL/table.md        the train/val table
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ranking.core.errors import RankingError
from ranking.core.files import read_json, write_atomically, write_text_atomically
from ranking.folders.shardformat import MANIFEST
from ranking.retrieval.metrics import EmbeddingSet, RetrievalMetrics, titles

if TYPE_CHECKING:  # the report and compare read evaluation folders without torchvision
    from ranking.learning.models import ModelSpec

EMBEDDINGS = "embeddings.pt"
METRICS = "metrics.json"
TABLE = "table.md"


def default_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where ``ranking evaluate`` writes the evaluation of a run's checkpoint at ``step``."""
    return Path(run_dir) / f"eval-{step:07d}"


def find_in_run(run_dir: str | os.PathLike) -> Path | None:
    """The most recently written evaluation folder of a run (any sub-folder holding metrics.json)."""
    candidates = [p.parent for p in Path(run_dir).glob(f"*/{METRICS}")]
    return max(candidates, key=lambda p: (p / METRICS).stat().st_mtime) if candidates else None


# ---------------------------------------------------------------------------------------------------------- embeddings


@dataclass
class EvalIndex:
    """What ``EVAL/embeddings.pt`` holds (load with ``weights_only=True``); rows sorted by id.

    File names, wnids and words are not stored: they come from the shards by id (``ranking.folders.shardformat``).
    ``model_sha256`` (the checkpoint's ``state.pt``) and ``embed_dim`` say which model embedded the rows, so that
    search refuses another one; indexes written before they existed load with "" and the embeddings' width.
    ``model`` is the identity the rows were embedded with (search rebuilds the checkpoint's network from it); None
    in folders written before, whose model is the run's.
    """

    run_dir: str
    step: int
    shards: str
    gallery_split: str
    query_split: str
    normalized: bool
    flip: bool
    gallery: EmbeddingSet
    query: EmbeddingSet
    model_sha256: str = ""
    embed_dim: int = 0
    model: ModelSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        def rows(s: EmbeddingSet) -> dict[str, torch.Tensor]:
            return {"embeddings": s.embeddings.cpu(), "ids": s.ids.cpu(), "labels": s.labels.cpu()}

        return {
            "run_dir": self.run_dir,
            "step": self.step,
            "shards": self.shards,
            "gallery_split": self.gallery_split,
            "query_split": self.query_split,
            "normalized": self.normalized,
            "flip": self.flip,
            "gallery": rows(self.gallery),
            "query": rows(self.query),
            "model_sha256": self.model_sha256,
            "embed_dim": self.embed_dim or int(self.gallery.embeddings.shape[1]),
            **({"model": self.model.to_dict()} if self.model is not None else {}),
        }

    def save(self, eval_dir: str | os.PathLike) -> Path:
        stored = self.to_dict()
        return write_atomically(Path(eval_dir) / EMBEDDINGS, lambda f: torch.save(stored, f))

    @classmethod
    def load(cls, eval_dir: str | os.PathLike) -> EvalIndex:
        path = Path(eval_dir) / EMBEDDINGS
        if not path.is_file():
            raise RankingError(f"{path}: not found (run `ranking evaluate` first?)")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a damaged file
            raise RankingError(f"{path}: cannot load ({str(e).splitlines()[0]})") from None
        for part in ("gallery", "query"):
            if not isinstance(data, dict) or not all(k in data.get(part, {}) for k in ("embeddings", "ids", "labels")):
                raise RankingError(f"{path}: missing {part} embeddings, ids or labels")

        def rows(part: str) -> EmbeddingSet:
            embeddings, ids, labels = (data[part][key] for key in ("embeddings", "ids", "labels"))
            if not (
                isinstance(embeddings, torch.Tensor)
                and embeddings.dim() == 2
                and embeddings.is_floating_point()
                and all(
                    isinstance(t, torch.Tensor)
                    and t.dim() == 1
                    and len(t) == len(embeddings)
                    and not t.is_floating_point()
                    for t in (ids, labels)
                )
            ):
                raise RankingError(
                    f"{path}: its {part} rows are not float embeddings [N, D] with N integer ids and "
                    "labels (damaged or edited); rerun `ranking evaluate`"
                )
            finite = torch.isfinite(embeddings).all(dim=1)
            if not bool(finite.all()):
                raise RankingError(
                    f"{path}: {int((~finite).sum())} {part} embedding row(s) are not finite (NaN or "
                    "inf), the first of sample id "
                    f"{int(ids[(~finite).nonzero()[0, 0]])}; rerun `ranking evaluate`"
                )
            return EmbeddingSet(embeddings, ids, labels)

        from ranking.learning.models import ModelSpec

        model = ModelSpec.from_dict(data["model"], f"{path}: model") if data.get("model") is not None else None

        return cls(
            run_dir=str(data.get("run_dir") or ""),
            step=int(data.get("step", 0)),
            shards=str(data.get("shards") or ""),
            gallery_split=data.get("gallery_split", "train"),
            query_split=data.get("query_split", "val"),
            normalized=bool(data.get("normalized")),
            flip=bool(data.get("flip")),
            gallery=rows("gallery"),
            query=rows("query"),
            model_sha256=str(data.get("model_sha256") or ""),
            embed_dim=int(data.get("embed_dim") or data["gallery"]["embeddings"].shape[-1]),
            model=model,
        )

    def shards_dir(self, eval_dir: str | os.PathLike, override: str | None = None) -> Path:
        """The shards this evaluation read (a relative path starts where `ranking evaluate` ran), or ``override``."""
        shards = Path(override or self.shards)
        if not (shards / MANIFEST).is_file():
            raise RankingError(
                f"{Path(eval_dir) / EMBEDDINGS}: its shards folder {str(shards)!r} has no {MANIFEST} "
                "(pass --shards DIR)"
            )
        return shards


# ---------------------------------------------------------------------------------------------------------- metrics


def metrics_record(step: int, k: int, by_split: dict[str, RetrievalMetrics], model: ModelSpec | None = None) -> dict:
    """metrics.json's content; ``model``, the identity that embedded the rows, as embeddings.pt holds it."""
    return {
        "k": k,
        "step": step,
        "splits": {name: m.summary() for name, m in by_split.items()},
        "pr_curve": {name: {"recall": m.recall_levels, "precision": m.pr_precision} for name, m in by_split.items()},
        **({"model": model.to_dict()} if model is not None else {}),
    }


def write_metrics(eval_dir: str | os.PathLike, metrics: dict) -> None:
    """EVAL/metrics.json and EVAL/table.md, each atomically."""
    write_text_atomically(Path(eval_dir) / METRICS, json.dumps(metrics, indent=2) + "\n")
    write_text_atomically(Path(eval_dir) / TABLE, markdown_table(metrics))


def read_metrics(eval_dir: str | os.PathLike) -> dict:
    path = Path(eval_dir) / METRICS
    metrics = read_json(path, "not found (run `ranking evaluate` first?)")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("splits"), dict):
        raise RankingError(f"{path}: no 'splits' entry")
    return metrics


def table_rows(metrics: dict) -> tuple[list[str], list[list[Any]]]:
    """Header and one row per split (train first, like the seeds' table), with the fractions of metrics.json."""
    columns = titles(metrics.get("k", 30))
    splits = sorted(metrics["splits"], key=lambda s: (s != "train", s))
    return (
        ["split", *columns.values()],
        [[s] + [float(metrics["splits"][s].get(name, math.nan)) for name in columns] for s in splits],
    )


def markdown_table(metrics: dict) -> str:
    """The train/val table in percent, formatted as evaluate's table.md."""
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row[0]] + [f"{100 * v:.2f}" for v in row[1:]]) + " |" for row in rows]
    return "\n".join(lines) + "\n"
