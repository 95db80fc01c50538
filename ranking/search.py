"""`ranking search IMAGE... --index EVAL_DIR --top N [--grid out.png]`: the nearest gallery images of any images.

Each image (any size, grayscale or colour, any format PIL reads) is embedded with the model the index was built with
(the run's checkpoint at the evaluation's step, the eval transform) and compared, by squared Euclidean distance, with
the gallery embeddings in EVAL_DIR/embeddings.pt. Prints, for each image, one line per result: rank, distance, source
file, wnid and words (read from the shards; the index is cached in EVAL_DIR as ``<split>-index.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn

from ranking import evalfolder, runfolder
from ranking.config import TrainConfig, at_least
from ranking.embed import embed_images
from ranking.errors import RankingError
from ranking.evalfolder import EvalIndex
from ranking.grids import NEUTRAL, QUERY, Tile, caption, draw_grid, save_png
from ranking.models import load_trained
from ranking.retrieval import nearest_neighbors
from ranking.shardformat import SampleInfo, read_images, split_index


def load_image(path: Path) -> Image.Image:
    """An RGB image from any file PIL can read, upright (EXIF orientation applied); RankingError otherwise."""
    if not path.is_file():
        raise RankingError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = "not an image file" if isinstance(e, Image.UnidentifiedImageError) else f"cannot decode ({e})"
        raise RankingError(f"{path}: {reason}") from None


def load_index_model(index: EvalIndex, eval_dir: Path) -> tuple[nn.Module, TrainConfig]:
    """The model the gallery was embedded with: the run's checkpoint at the evaluation's step."""
    run_dir = Path(index.run_dir)
    if not runfolder.config_path(run_dir).is_file():  # moved since the evaluation: EVAL defaults to RUN/eval-<step>
        run_dir = eval_dir.parent
    if not runfolder.config_path(run_dir).is_file():
        raise RankingError(f"{eval_dir / evalfolder.EMBEDDINGS}: its run folder {index.run_dir!r} "
                           "(with config.yaml) is not found")
    checkpoint = runfolder.checkpoint_dir(run_dir, index.step)
    model, config, loaded_step = load_trained(checkpoint if checkpoint.is_dir() else run_dir)
    if loaded_step != index.step:
        raise RankingError(f"{run_dir}: the index {eval_dir} was embedded at step {index.step}, but that checkpoint "
                           f"is gone (found step {loaded_step}); rerun `ranking evaluate` for this checkpoint")
    return model, config


def result_lines(distances: torch.Tensor, indices: torch.Tensor, gallery_ids: torch.Tensor,
                 index: dict[int, SampleInfo]) -> list[str]:
    """A header and one aligned line per result: rank, distance, source file, wnid, words."""
    infos = [index[int(gallery_ids[column])] for column in indices.tolist()]
    file_width = max(len("file"), *(len(info.file) for info in infos))
    lines = [f"{'rank':>4}  {'distance':>8}  {'file':<{file_width}}  {'wnid':<9}  words"]
    for rank, (distance, info) in enumerate(zip(distances.tolist(), infos), 1):
        wnid, words = info.wnid or "-", info.words or "-"
        lines.append(f"{rank:>4}  {distance:8.4f}  {info.file:<{file_width}}  {wnid:<9}  {words}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ranking search", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="query image files (any size, grayscale or colour)")
    parser.add_argument("--index", type=Path, required=True, help="an evaluation folder (holds embeddings.pt)")
    parser.add_argument("--top", type=int, default=10, help="results per image")
    parser.add_argument("--grid", type=Path, default=None, help="also draw the queries and their results (PNG)")
    parser.add_argument("--shards", default=None, help="shards folder, if it moved since the evaluation")
    args = parser.parse_args(argv)
    at_least("--top", args.top, 1)

    images = [load_image(path) for path in args.images]  # bad input fails before the model loads
    eval_index = EvalIndex.load(args.index)
    shards = eval_index.shards_dir(args.index, args.shards)
    gallery_split = eval_index.gallery_split
    model, config = load_index_model(eval_index, args.index)
    queries = embed_images(model, config, images, normalize=eval_index.normalized, flip=eval_index.flip)
    gallery = eval_index.gallery
    distances, indices = nearest_neighbors(queries, gallery.embeddings.float(), args.top)
    index = split_index(shards, gallery_split, args.index)

    for path, row_distances, row_indices in zip(args.images, distances, indices):
        print("\n".join([f"{path}", *result_lines(row_distances, row_indices, gallery.ids, index), ""]))

    if args.grid:
        shown = [[index[int(gallery.ids[c])] for c in row] for row in indices.tolist()]
        gallery_images = read_images(shards, gallery_split, {info.id: info for row in shown for info in row}.values())
        rows = [[Tile(image, ["query", path.name], QUERY)]
                + [Tile(gallery_images[info.id], caption(info, d), NEUTRAL) for info, d in zip(infos, ds.tolist())]
                for path, image, infos, ds in zip(args.images, images, shown, distances)]
        title = f"nearest {indices.shape[1]} {gallery_split} images of each query (d = squared distance)"
        print(f"wrote {save_png(draw_grid(rows, title), args.grid)}")
    return 0
