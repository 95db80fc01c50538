"""`ranking dedup --index INDEX --threshold D`: groups of near-duplicate images in an index folder.

Rows closer than D (squared distance, the search's own measure) are grouped, transitively; the same search as
`ranking search` finds them (exact unless --backend says otherwise). Prints one line per group (its size, the farthest
joined pair's distance and its files), or with --json the groups as JSON; --grid draws each group as a row of its
thumbnails (PNG), --html writes a page of them (thumbnails inline: it opens anywhere). Pick D from `ranking search`'s
distances: a copy or a re-encoded copy is at ~0, the same scene in another shot further.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranking import cli
from ranking.core.config import SearchBackendName
from ranking.core.errors import RankingError
from ranking.core.files import check_output_file, shown_name, write_text_atomically
from ranking.core.flags import above, at_least, finite, parse
from ranking.retrieval import indexfolder
from ranking.retrieval.duplicates import DuplicateGroup, near_duplicate_groups
from ranking.retrieval.indexfolder import Index

MAX_GRID_COLUMNS = 8  # a larger group is drawn on one row of this many, the rest counted in the caption


@dataclass
class DedupConfig:
    # the search
    index: str  # an index folder written by `ranking index`
    threshold: float  # rows closer than this squared distance are near-duplicates
    neighbours: int = 10  # nearest rows looked at per row (a group grows beyond it through its members)
    backend: SearchBackendName = "exact"  # how the rows are searched (exact: every row, the reference)

    # output
    json: bool = False  # print the groups as JSON
    out: str = ""  # also write the JSON to this file
    grid: str = ""  # also draw each group as a row of thumbnails (PNG)
    html: str = ""  # also write a page of the groups: every thumbnail inside it, so it opens anywhere

    def validate(self) -> None:
        finite("--threshold", self.threshold)
        above("--threshold", self.threshold, 0)
        at_least("--neighbours", self.neighbours, 1)


def group_json(index: Index, group: DuplicateGroup) -> dict[str, Any]:
    items = [index.items[row] for row in group.rows]
    return {
        "size": len(items),
        "max_distance": group.max_distance,
        "items": [
            {"id": item.id, "file": shown_name(item.file, one_line=False), "class": item.wnid, "sha256": item.sha256}
            for item in items
        ],
    }


def draw_groups(index: Index, groups: list[DuplicateGroup], path: Path, threshold: float) -> Path:
    from ranking.reporting.grids import NEUTRAL, QUERY, Tile, draw_grid, save_png

    shown = [group.rows[:MAX_GRID_COLUMNS] for group in groups]
    thumbnails = index.thumbnails([index.items[row] for rows in shown for row in rows])
    rows = []
    for group, members in zip(groups, shown):
        rest = len(group.rows) - len(members)
        rows.append(
            [
                Tile(
                    thumbnails[row],
                    [
                        f"id {row}" + (f" (+{rest} more)" if rest and n == len(members) - 1 else ""),
                        Path(index.items[row].file).name,
                    ],
                    QUERY if n == 0 else NEUTRAL,
                )
                for n, row in enumerate(members)
            ]
        )
    title = f"{len(groups)} groups of near-duplicates (squared distance < {threshold:g}), one per row"
    return save_png(draw_grid(rows, title), path)


def groups_page(index: Index, groups: list[DuplicateGroup], threshold: float) -> str:
    """A self-contained HTML page: one row per group, each image's thumbnail (inline), id, file and distance to the
    group's first image."""
    import base64
    import html

    from ranking.retrieval.indexfolder import THUMBS, read_thumbnail_bytes

    assert index.path is not None
    items = [index.items[row] for group in groups for row in group.rows]
    thumbnails = read_thumbnail_bytes(index.path / THUMBS, [item for item in items if item.thumb is not None])
    sections = []
    for n, group in enumerate(groups, 1):
        first = index.embeddings[group.rows[0]]
        cells = []
        for row in group.rows:
            item = index.items[row]
            distance = float((index.embeddings[row] - first).pow(2).sum())
            image = (
                f'<img src="data:image/jpeg;base64,{base64.b64encode(thumbnails[row]).decode()}" alt="">'
                if row in thumbnails
                else "<div class=none>no thumbnail</div>"
            )
            cells.append(
                f"<figure>{image}<figcaption>id {row}, d={distance:.4f}<br>"
                f"{html.escape(shown_name(item.file))}</figcaption></figure>"
            )
        sections.append(
            f"<section><h2>group {n}: {len(group.rows)} images, up to d={group.max_distance:.4f}</h2>"
            f"{''.join(cells)}</section>"
        )
    title = (
        f"{len(groups)} groups of near-duplicates in {html.escape(index.path.name)} (squared distance < {threshold:g})"
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:1.5rem}section{margin-bottom:1.5rem}"
        "figure{display:inline-block;margin:0 .6rem .6rem 0;width:140px;font-size:.8rem;vertical-align:top}"
        "img{width:128px;height:128px;object-fit:contain;border:1px solid #ccc}figcaption{overflow-wrap:anywhere}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style>'
        f"</head><body><h1>{title}</h1>{''.join(sections)}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    config = parse(DedupConfig, argv, "ranking dedup", __doc__.split("\n\n")[0], config_file=False)
    grid = check_output_file(config.grid, "--grid") if config.grid else None
    out = check_output_file(config.out, "--out") if config.out else None
    page = check_output_file(config.html, "--html") if config.html else None
    path = Path(config.index)
    if not indexfolder.is_index(path):
        raise RankingError(f"{path}: not an index folder (ranking dedup reads one written by `ranking index`)")
    index = Index.load(path, device="cpu")
    index.use_backend(config.backend)
    groups = near_duplicate_groups(index, config.threshold, config.neighbours)
    found = {
        "index": str(path),
        "threshold": config.threshold,
        "rows": len(index),
        "groups": [group_json(index, group) for group in groups],
    }
    text = json.dumps(found, indent=2)
    if out is not None:
        write_text_atomically(out, text + "\n")
    if config.json:
        print(text)
    else:
        for group in groups:
            files = "  ".join(shown_name(index.items[row].file) for row in group.rows)
            print(f"{len(group.rows)} images, up to d={group.max_distance:.4f}: {files}")
    duplicated = sum(len(group.rows) for group in groups)
    summary = f"{len(groups)} groups ({duplicated} of {len(index)} images) closer than {config.threshold:g}"
    print(summary, file=sys.stderr if config.json else sys.stdout)
    if grid is not None and groups:
        written = draw_groups(index, groups, grid, config.threshold)
        print(f"wrote {written}", file=sys.stderr if config.json else sys.stdout)
    if page is not None:
        written = write_text_atomically(page, groups_page(index, groups, config.threshold))
        print(f"wrote {written}", file=sys.stderr if config.json else sys.stdout)
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.dedup")
