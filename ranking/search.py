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
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from ranking.config import TrainConfig
from ranking.errors import RankingError
from ranking.report import (NEUTRAL, QUERY, SampleInfo, Tile, caption, draw_grid, read_embeddings, read_images,
                            resolve_shards, save_png, split_index)
from ranking.retrieval import nearest_neighbors


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


def load_index_model(eval_data: dict, eval_dir: Path) -> tuple[nn.Module, TrainConfig]:
    """The model the gallery was embedded with: the run's checkpoint at the evaluation's step."""
    from ranking.checkpoint import load_model

    run_dir = Path(eval_data.get("run_dir") or "")
    if not (run_dir / "config.yaml").is_file():  # moved since the evaluation: EVAL defaults to RUN/eval-<step>
        run_dir = eval_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise RankingError(f"{eval_dir / 'embeddings.pt'}: its run folder {eval_data.get('run_dir')!r} "
                           "(with config.yaml) is not found")
    step = int(eval_data["step"])
    checkpoint = run_dir / "checkpoints" / f"step-{step:07d}"
    model, config, loaded_step = load_model(str(checkpoint if checkpoint.is_dir() else run_dir))
    if loaded_step != step:
        raise RankingError(f"{run_dir}: the index {eval_dir} was embedded at step {step}, but that checkpoint is gone "
                           f"(found step {loaded_step}); rerun `ranking evaluate` for this checkpoint")
    return model, config


@torch.inference_mode()
def embed_images(model: nn.Module, config: TrainConfig, images: list[Image.Image], normalize: bool,
                 flip: bool = False, batch_size: int = 64) -> torch.Tensor:
    """[N, D] float32 embeddings on the CPU, through the eval transform, in full precision; ``flip`` as the index
    was embedded (``ranking evaluate --flip``)."""
    from ranking.models import embed_with_mirror, input_normalization
    from ranking.stream import eval_transform

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = eval_transform(config.image_size, *input_normalization(config.backbone))
    model = model.to(device).eval()
    batches = torch.stack([transform(image) for image in images]).split(batch_size)
    embeddings = torch.cat([embed_with_mirror(model, batch.to(device), flip).float().cpu() for batch in batches])
    return F.normalize(embeddings, dim=1) if normalize else embeddings


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
    if args.top < 1:
        raise RankingError(f"--top must be at least 1; got {args.top}")

    images = [load_image(path) for path in args.images]  # bad input fails before the model loads
    eval_data = read_embeddings(args.index)
    shards = resolve_shards(eval_data, args.index, args.shards)
    gallery_split = eval_data.get("gallery_split", "train")
    model, config = load_index_model(eval_data, args.index)
    queries = embed_images(model, config, images, normalize=bool(eval_data.get("normalized")),
                           flip=bool(eval_data.get("flip")))
    gallery = eval_data["gallery"]
    distances, indices = nearest_neighbors(queries, gallery["embeddings"].float(), args.top)
    index = split_index(shards, gallery_split, args.index)

    for path, row_distances, row_indices in zip(args.images, distances, indices):
        print("\n".join([f"{path}", *result_lines(row_distances, row_indices, gallery["ids"], index), ""]))

    if args.grid:
        shown = [[index[int(gallery["ids"][c])] for c in row] for row in indices.tolist()]
        gallery_images = read_images(shards, gallery_split, {info.id: info for row in shown for info in row}.values())
        rows = [[Tile(image, ["query", path.name], QUERY)]
                + [Tile(gallery_images[info.id], caption(info, d), NEUTRAL) for info, d in zip(infos, ds.tolist())]
                for path, image, infos, ds in zip(args.images, images, shown, distances)]
        title = f"nearest {indices.shape[1]} {gallery_split} images of each query (d = squared distance)"
        print(f"wrote {save_png(draw_grid(rows, title), args.grid)}")
    return 0
