"""How an index's rows are searched: ``exact`` (every row, the reference) or an approximate faiss index (``ivf``,
``hnsw``) whose candidates are re-ranked exactly, so every distance returned is the exact one.

    backend = build_backend("exact" | "ivf" | "hnsw", embeddings)   # or choose_backend(None, embeddings, ann_above)
    distances, rows = backend.search(queries, k)                     # [Q, k] squared distances and row numbers

faiss (``pip install 'deep-ranking[ann]'``) is imported only when an approximate backend is built.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ranking.core.config import SearchBackendName
from ranking.core.errors import RankingError
from ranking.learning.distances import squared_norms
from ranking.retrieval.metrics import nearest_neighbors, ties_in_row_order

APPROXIMATE_ABOVE = 1_000_000  # rows from which `choose_backend` takes ivf when no backend is named
CANDIDATES_PER_RESULT = 8  # an approximate search re-ranks k x this many candidates (at least MIN_CANDIDATES)
MIN_CANDIDATES = 64


class ExactBackend:
    """Every row's distance, one matrix product and a top-k (``metrics.nearest_neighbors``); the rows' squared
    norms are computed once, not per query."""

    name = "exact"

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings
        self.sq_norms = squared_norms(embeddings)
        self.build_s = 0.0

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_neighbors(queries, self.embeddings, k, gallery_sq_norms=self.sq_norms)


@dataclass(frozen=True)
class AnnSettings:
    lists: int = 0  # ivf: inverted lists (0: 4 sqrt(rows))
    probes: int = 0  # ivf: lists visited per query (0: lists / 32, at least 8)
    links: int = 32  # hnsw: graph links per row
    ef_construction: int = 80  # hnsw: candidates kept while linking a row in
    ef_search: int = 128  # hnsw: candidates kept while walking the graph


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise RankingError(
            "an approximate search backend needs faiss: pip install 'deep-ranking[ann]' (or use --backend exact)"
        ) from None
    return faiss


class FaissBackend:
    """A faiss index proposes candidates, which are re-ranked by their exact distances (``ivf``: inverted lists of
    8-bit scalar-quantised rows, a quarter of the rows' memory; ``hnsw``: a graph over the rows)."""

    def __init__(self, name: SearchBackendName, embeddings: torch.Tensor, settings: AnnSettings = AnnSettings()):
        faiss = _faiss()
        self.name = name
        self.embeddings = embeddings
        rows, dim = embeddings.shape
        data = embeddings.detach().cpu().float().contiguous().numpy()
        started = time.perf_counter()
        if name == "ivf":
            lists = settings.lists or max(1, min(rows // 39, int(4 * math.sqrt(rows))))  # faiss wants 39 rows a list
            self.index = faiss.IndexIVFScalarQuantizer(
                faiss.IndexFlatL2(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2
            )
            sample = data
            if rows > 64 * lists:  # k-means on a seeded sample: the lists' centres, not every row, need training
                generator = torch.Generator().manual_seed(0)
                sample = data[torch.randperm(rows, generator=generator)[: 64 * lists].sort().values.numpy()]
            self.index.train(sample)
            self.index.nprobe = settings.probes or max(8, lists // 32)
        elif name == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, settings.links)
            self.index.hnsw.efConstruction = settings.ef_construction
            self.index.hnsw.efSearch = settings.ef_search
        else:
            raise RankingError(f"unknown approximate backend {name!r}; expected ivf or hnsw")
        self.index.add(data)
        self.build_s = time.perf_counter() - started

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.embeddings.shape[0]
        k = min(k, rows)
        wanted = min(rows, max(MIN_CANDIDATES, k * CANDIDATES_PER_RESULT))
        if self.name == "hnsw":
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, wanted)
        queries = queries.float().cpu().contiguous()
        _, candidates = self.index.search(queries.numpy(), wanted)
        candidates = torch.from_numpy(candidates).long()
        found = candidates >= 0  # faiss pads with -1 when it finds fewer
        safe = candidates.clamp_min(0)
        gathered = self.embeddings[safe.reshape(-1)].reshape(*safe.shape, -1).float()
        distances = (gathered - queries[:, None, :]).pow(2).sum(dim=2).masked_fill(~found, math.inf)
        top = distances.topk(k, dim=1, largest=False, sorted=True)
        return ties_in_row_order(top.values, safe.gather(1, top.indices))


Backend = ExactBackend | FaissBackend
BACKENDS: dict[str, str] = {
    "exact": "every row (the reference)",
    "ivf": "faiss inverted lists of 8-bit rows, candidates re-ranked exactly",
    "hnsw": "faiss HNSW graph, candidates re-ranked exactly",
}


def build_backend(name: SearchBackendName, embeddings: torch.Tensor, settings: AnnSettings = AnnSettings()) -> Backend:
    if name == "exact":
        return ExactBackend(embeddings)
    if name not in BACKENDS:
        raise RankingError(f"unknown search backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return FaissBackend(name, embeddings, settings)


def choose_backend(
    name: SearchBackendName | None, embeddings: torch.Tensor, approximate_above: int = APPROXIMATE_ABOVE
) -> Backend:
    """``name``, or else exact up to ``approximate_above`` rows and ivf above."""
    if name is None:
        name = "ivf" if embeddings.shape[0] > approximate_above else "exact"
    return build_backend(name, embeddings)
