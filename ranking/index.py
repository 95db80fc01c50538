"""`ranking index`: a portable, self-contained index of your own images (DESIGN.md "Index folder").

    ranking index --checkpoint RUN --images DIR [DIR ...] --out INDEX        # one process
    accelerate launch -m ranking.index --checkpoint RUN --images DIR --out INDEX   # sharded over ranks
    ranking index --add DIR [DIR ...] --index INDEX                           # append, embedding only DIR

DIR is a shards folder (its train split, else test; or --split) or a folder of images: class folders (ImageFolder),
a flat folder, or Tiny ImageNet. INDEX holds the model (safetensors and its config), the embeddings, what each row
is and a thumbnail of each image: `ranking search IMAGE --index INDEX` needs nothing else. `--add` takes another
index folder of the same model too (merged without re-embedding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ranking import cli
from ranking.core.errors import RankingError
from ranking.core.flags import at_least
from ranking.retrieval import indexfolder
from ranking.retrieval.indexfolder import Index
from ranking.retrieval.inference import EmbeddingModel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ranking index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run folder (its latest checkpoint) or a checkpoint folder; with --add, checked against "
                             "the index's model")
    parser.add_argument("--images", type=Path, nargs="+", default=[], help="shards folders or folders of images")
    parser.add_argument("--out", type=Path, default=None, help="the index folder to write (must not exist)")
    parser.add_argument("--add", type=Path, nargs="+", default=[],
                        help="images (or index folders of the same model) to append to --index")
    parser.add_argument("--index", type=Path, default=None, help="the index folder --add appends to")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                        help="the split of a shards folder (default: train, else test)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                        help="embed each image as the mean of its and its mirror image's embeddings")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of a shards folder")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    args = parser.parse_args(argv)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--workers", args.workers, 0)
    if args.add:
        if args.images or args.out:
            raise RankingError("--add appends to --index; --images and --out build a new index (not both)")
        if args.index is None:
            raise RankingError("--add needs --index INDEX, the index folder to append to")
    else:
        if not args.images or args.out is None or args.checkpoint is None:
            raise RankingError("give --checkpoint RUN --images DIR --out INDEX (or --add DIR --index INDEX)")
        if args.index is not None:
            raise RankingError("--index names the index that --add appends to; a new index is --out")
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise RankingError(f"{args.out}: exists; choose a new folder, or append with --add ... --index {args.out}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base: Index | None = Index.load(args.index, device="cpu") if args.add else None
    paths = args.add or args.images
    merged = [Index.load(p, device="cpu") for p in paths if indexfolder.is_index(p)]
    sources = [indexfolder.open_images(p, args.split) for p in paths if not indexfolder.is_index(p)]
    if base is not None:  # the index's own model embeds what is added
        model = base.model
        if args.checkpoint is not None:
            indexfolder.check_same_model(base, EmbeddingModel.from_run(args.checkpoint, flip=base.model.flip),
                                         args.checkpoint)
        for other in merged:
            indexfolder.check_same_model(base, other.model, other.path or "")
    else:
        if merged:
            raise RankingError(f"{merged[0].path}: an index folder; a new index is built from images "
                               "(append it with --add)")
        model = EmbeddingModel.from_run(args.checkpoint, flip=args.flip, device="cpu")

    from accelerate import Accelerator

    mixed = "bf16" if args.mixed_precision == "fp16" and not _has_cuda() else args.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed)
    model.to(accelerator.device)
    embedded = indexfolder.embed_sources(model, sources, accelerator, args.batch_size, args.workers)
    if accelerator.is_main_process:
        model.to("cpu")
        out = args.index if base is not None else args.out
        indexfolder.write_index(out, model, sources, embedded, base=base, merged=merged)
        added = sum(len(s.entries) for s in sources) + sum(len(m) for m in merged)
        total = added + (len(base) if base is not None else 0)
        print(f"{'added' if base is not None else 'indexed'} {added} images ({model.dim}-d, "
              f"{accelerator.num_processes} process(es)); {out} holds {total}", flush=True)
    accelerator.end_training()
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.index")
