"""Search backends (issue 21): exact is today's search (the reference); ivf and hnsw (faiss) find the exact
neighbours of clustered rows with their exact distances, and an index chooses one by its size or by name."""

from __future__ import annotations

import sys

import pytest
import torch

from ranking.core.errors import RankingError
from ranking.retrieval import backends
from ranking.retrieval.metrics import nearest_neighbors


def clustered(rows: int, dim: int = 32, centres: int = 100, seed: int = 0) -> torch.Tensor:
    """Rows around class centres, as embeddings of many classes are."""
    generator = torch.Generator().manual_seed(seed)
    middle = torch.randn(centres, dim, generator=generator)
    assigned = torch.randint(0, centres, (rows,), generator=generator)
    return torch.nn.functional.normalize(middle[assigned] + 0.3 * torch.randn(rows, dim, generator=generator), dim=1)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()


def test_exact_is_the_nearest_neighbours_search():
    rows = clustered(5000)
    queries = rows[:50] + 0.01
    distances, found = backends.build_backend("exact", rows).search(queries, 10)
    expected_distances, expected = nearest_neighbors(queries, rows, 10)
    assert torch.equal(found, expected) and torch.equal(distances, expected_distances)


@pytest.mark.parametrize("name", ["ivf", "hnsw"])
def test_an_approximate_backend_finds_the_exact_neighbours_with_exact_distances(name):
    rows, queries = clustered(20200).split([20000, 200])  # queries of the same classes, not in the gallery
    exact_distances, exact = backends.build_backend("exact", rows).search(queries, 10)
    distances, found = backends.build_backend(name, rows).search(queries, 10)
    assert recall(found, exact) >= 0.95
    same = found == exact
    assert torch.allclose(distances[same], exact_distances[same], atol=1e-5)  # re-ranked: exact distances
    assert torch.equal(distances, distances.sort(dim=1).values)
    assert found.shape == (200, 10) and int(found.min()) >= 0


@pytest.mark.parametrize("name", ["exact", "ivf", "hnsw"])
def test_equal_distances_come_in_row_order_as_in_the_metrics(name):
    """Copies of a row tie exactly; topk would order them differently from one CPU to the next."""
    originals = clustered(300)
    rows = torch.cat([originals] * 3)[torch.randperm(900, generator=torch.Generator().manual_seed(0))]
    distances, found = backends.build_backend(name, rows).search(originals[:40] + 0.01, 30)
    tied = distances[:, 1:] == distances[:, :-1]
    assert int(tied.sum()) >= 40 * 10  # each nearest row's copies tie with it
    assert (found[:, 1:] > found[:, :-1])[tied].all()


def test_the_backend_follows_the_row_count_unless_named():
    rows = clustered(3000)
    assert backends.choose_backend(None, rows, approximate_above=5000).name == "exact"
    assert backends.choose_backend(None, rows, approximate_above=2000).name == "ivf"
    assert backends.choose_backend("hnsw", rows, approximate_above=10**9).name == "hnsw"
    with pytest.raises(RankingError, match="unknown search backend 'annoy'"):
        backends.build_backend("annoy", rows)  # type: ignore[arg-type]


def test_k_above_the_rows_returns_every_row():
    rows = clustered(100)
    for name in ("exact", "ivf", "hnsw"):
        distances, found = backends.build_backend(name, rows).search(rows[:3], 500)
        assert found.shape == (3, 100) and sorted(found[0].tolist()) == list(range(100)), name


def test_without_the_extras_one_line_names_the_extra_to_install(monkeypatch, capsys, tmp_path):
    from harness import cli_refusal

    monkeypatch.setitem(sys.modules, "faiss", None)  # what a missing package looks like to `import faiss`
    with pytest.raises(RankingError, match=r"needs faiss: pip install 'deep-ranking\[ann\]' \(or use --backend exact"):
        backends.build_backend("ivf", clustered(100))
    assert backends.build_backend("exact", clustered(100)).name == "exact"  # the base package still searches
    monkeypatch.setitem(sys.modules, "fastapi", None)
    line = cli_refusal(capsys, "serve", "--index", str(tmp_path))
    assert line == "ranking serve: error: ranking serve needs fastapi: pip install 'deep-ranking[serve]'"
