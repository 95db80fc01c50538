"""`ranking search IMAGE... --index INDEX_OR_EVAL_DIR --top N [--json] [--grid out.png]`: the nearest gallery images
of any images.

The gallery is an index folder (`ranking index`: it carries its model, embeddings, file names and thumbnails) or an
evaluation folder (`ranking evaluate`: the model is the run's checkpoint at the evaluation's step; file names, wnids
and words are read from the shards, cached in EVAL_DIR as ``<split>-index.json``). Either way each image (any size,
grayscale or colour, any format PIL reads, turned upright by its EXIF orientation) is embedded with the gallery's
model through the eval transform and compared by squared Euclidean distance. Prints, for each image, one line per
result: rank, distance, file, class (wnid) and words; or, with --json, a list of
{"query", "results": [{rank, distance, id, label, class, words, file}]}. File names are printed through
``files.shown_name``: bytes that are not UTF-8 as ``\\xNN``, and in the table control characters escaped too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ranking.core.config import SearchBackendName
from ranking.core.errors import RankingError
from ranking.core.files import check_output_file, shown_name
from ranking.core.flags import at_least, parse
from ranking.data.archive import read_regular_file
from ranking.data.decode import decode_image, read_header, to_pil
from ranking.folders import checkpoint, runfolder
from ranking.folders.shardformat import read_images, split_index
from ranking.reporting.grids import NEUTRAL, QUERY, Tile, draw_grid, save_png
from ranking.retrieval import evalfolder, indexfolder
from ranking.retrieval.evalfolder import EvalIndex
from ranking.retrieval.indexfolder import Index, Item, Result
from ranking.retrieval.inference import EmbeddingModel, parse_device


def load_index_model(index: EvalIndex, eval_dir: Path, device: str | torch.device | None = None) -> EmbeddingModel:
    """The model the gallery was embedded with: the run's checkpoint at the evaluation's step, rebuilt from the
    evaluation's model identity (the run's, for folders written before it was stored)."""
    run_dir = Path(index.run_dir)
    if not runfolder.config_path(run_dir).is_file():  # moved since the evaluation: EVAL defaults to RUN/eval-<step>
        run_dir = eval_dir.parent
    if not runfolder.config_path(run_dir).is_file():
        raise RankingError(
            f"{eval_dir / evalfolder.EMBEDDINGS}: its run folder {index.run_dir!r} (with config.yaml) is not found"
        )
    at_step = runfolder.checkpoint_dir(run_dir, index.step)
    found = runfolder.resolve_checkpoint(at_step if at_step.is_dir() else run_dir)
    if index.model_sha256 and checkpoint.state_sha256(found) != index.model_sha256:
        raise RankingError(
            f"{eval_dir / evalfolder.EMBEDDINGS}: embedded by another model than {found} (state.pt "
            f"sha256 {index.model_sha256[:12]}..., found {checkpoint.state_sha256(found)[:12]}...); "
            "search it from its own run folder or rerun `ranking evaluate`"
        )
    model = EmbeddingModel.from_run(found, index.flip, device, index.model)
    if model.step != index.step:
        raise RankingError(
            f"{run_dir}: the index {eval_dir} was embedded at step {index.step}, but that checkpoint "
            f"is gone (found step {model.step}); rerun `ranking evaluate` for this checkpoint"
        )
    if model.dim != index.embed_dim:
        raise RankingError(
            f"{eval_dir / evalfolder.EMBEDDINGS}: holds {index.embed_dim}-d embeddings, but the model "
            f"of {found} embeds in {model.dim} dimensions (the folder was moved into another "
            "run?); rerun `ranking evaluate`"
        )
    return model


def open_gallery(path: Path, shards: str | None = None, device: str | torch.device | None = None) -> Index:
    """An index folder, or an evaluation folder seen as an Index (its model from the run, items and images from the
    shards): both kinds are searched, printed and drawn by the same code."""
    if indexfolder.is_index(path):
        return Index.load(path, device)
    eval_index = EvalIndex.load(path)
    shards_dir = eval_index.shards_dir(path, shards)
    split = eval_index.gallery_split
    model = load_index_model(eval_index, path, device)
    infos = split_index(shards_dir, split, path)
    gallery = eval_index.gallery
    missing = [i for i in gallery.ids.tolist() if i not in infos]
    if missing:
        raise RankingError(f"{shards_dir}: no {split} sample {missing[0]} of {path / evalfolder.EMBEDDINGS}")
    items = [
        Item(info.id, info.label, info.wnid, info.words, info.file) for info in (infos[i] for i in gallery.ids.tolist())
    ]
    return Index(
        model,
        gallery.embeddings,
        items,
        path=path,
        thumbnails=lambda shown: read_images(shards_dir, split, (infos[item.id] for item in shown)),
    )


def read_query(path: Path) -> bytes:
    """A query file's bytes, read as ``inference.load_image`` reads (a regular file within the size limit), its
    header checked (an image, within the pixel limit); decoded once the model's image size is known."""
    if not path.is_file():
        raise RankingError(f"{path}: no such image file")
    data = read_regular_file(path)
    read_header(data, str(path))
    return data


def result_lines(results: list[Result]) -> list[str]:
    """A header and one aligned line per result: rank, distance, file, wnid (class), words."""
    files = [shown_name(r.item.file) for r in results]  # a newline or non-UTF-8 bytes in a name: escaped
    file_width = max(len("file"), *map(len, files))
    lines = [f"{'rank':>4}  {'distance':>8}  {'file':<{file_width}}  {'wnid':<9}  words"]
    for r, file in zip(results, files):
        wnid, words = shown_name(r.item.wnid or "-"), shown_name(r.item.words or "-")
        lines.append(f"{r.rank:>4}  {r.distance:8.4f}  {file:<{file_width}}  {wnid:<9}  {words}")
    return lines


def result_json(path: Path, results: list[Result]) -> dict:
    """One query's --json entry; file names as ``shown_name`` writes them without escaping control characters
    (JSON does): bytes that are not UTF-8 as \\xNN, never lone surrogates."""
    return {
        "query": shown_name(str(path), one_line=False),
        "results": [{**r.to_dict(), "file": shown_name(r.item.file, one_line=False)} for r in results],
    }


def caption(result: Result) -> list[str]:
    return [f"d={result.distance:.3f}", (result.item.words or result.item.wnid or "?").split(",")[0]]


@dataclass
class SearchConfig:
    # the search
    # query image files (any size, grayscale or colour)
    images: list[str] = field(metadata={"positional": True, "metavar": "IMAGE"})
    index: str  # an index folder (`ranking index`) or an evaluation folder (holds embeddings.pt)
    top: int = 10  # results per image
    device: str = "auto"  # where to embed and search: auto (a GPU if any), cpu, cuda
    # unset: exact up to ranking.retrieval.backends.APPROXIMATE_ABOVE rows, else ivf (faiss: the [ann] extra)
    backend: SearchBackendName | None = None
    shards: str = ""  # an evaluation folder's shards, if they moved since

    # output
    json: bool = False  # print the results as JSON
    grid: str = ""  # also draw the queries and their results (PNG)

    def validate(self) -> None:
        at_least("--top", self.top, 1)


def main(argv: list[str] | None = None) -> int:
    config = parse(SearchConfig, argv, "ranking search", __doc__.split("\n\n")[0], config_file=False)
    device = parse_device(config.device)
    paths = [Path(image) for image in config.images]
    grid = Path(config.grid) if config.grid else None

    if grid is not None:
        check_output_file(grid, "--grid")
    encoded = [read_query(path) for path in paths]  # bad input fails before the model loads
    gallery = open_gallery(Path(config.index), config.shards or None, device)
    # each reduced to the model's image size as it is decoded: 12 photos of 8000x8000 stay small
    images = [decode_image(data, str(path), gallery.model.spec.image_size) for path, data in zip(paths, encoded)]
    gallery.use_backend(config.backend)
    found = gallery.search(images, config.top)

    if config.json:
        print(json.dumps([result_json(path, results) for path, results in zip(paths, found)], indent=2))
    else:
        for path, results in zip(paths, found):
            print("\n".join([shown_name(str(path)), *result_lines(results), ""]))

    if grid is not None:
        thumbnails = gallery.thumbnails(list({r.item.id: r.item for results in found for r in results}.values()))
        rows = [
            [Tile(to_pil(image), ["query", path.name], QUERY)]
            + [Tile(thumbnails[r.item.id], caption(r), NEUTRAL) for r in results]
            for path, image, results in zip(paths, images, found)
        ]
        title = f"nearest {len(found[0])} gallery images of each query (d = squared distance)"
        written = save_png(draw_grid(rows, title), grid)
        print(f"wrote {written}", file=sys.stderr if config.json else sys.stdout)
    return 0
