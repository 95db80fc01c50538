"""Near-duplicates of an index: rows closer than a threshold, joined into groups (``ranking dedup``).

Each row's nearest ``neighbours`` rows come from the index's own search (``Index.backend``: exact unless chosen
otherwise), so a group is what a search of any of its members would show within the threshold. Pairs closer than the
threshold are joined transitively (union-find): A~B and B~C put A, B, C in one group even where A and C are further
apart; ``max_distance`` says how far the farthest joined pair is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ranking.retrieval.indexfolder import Index


@dataclass(frozen=True)
class DuplicateGroup:
    rows: list[int]  # ascending
    max_distance: float  # the largest squared distance of a pair that joined the group


def near_duplicate_groups(
    index: Index, threshold: float, neighbours: int = 10, chunk_rows: int = 4096
) -> list[DuplicateGroup]:
    """Groups of rows whose squared distance is below ``threshold``, largest group first (then by first row)."""
    count = len(index)
    parent = list(range(count))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    joined: list[tuple[int, int, float]] = []
    for start in range(0, count, chunk_rows):
        queries = index.embeddings[start : start + chunk_rows]
        distances, rows = index.backend.search(queries, min(count, neighbours + 1))
        close = (distances < threshold).nonzero().tolist()
        for q, n in close:
            row, other = start + q, int(rows[q, n])
            if row != other:
                joined.append((row, other, float(distances[q, n])))
                parent[root(row)] = root(other)
    members: dict[int, list[int]] = {}
    for row in range(count):
        members.setdefault(root(row), []).append(row)
    farthest: dict[int, float] = {}
    for row, _, distance in joined:
        group = root(row)
        farthest[group] = max(farthest.get(group, 0.0), distance)
    groups = [DuplicateGroup(rows, farthest.get(key, 0.0)) for key, rows in members.items() if len(rows) > 1]
    return sorted(groups, key=lambda g: (-len(g.rows), g.rows[0]))
