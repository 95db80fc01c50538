"""`ranking index`: a portable, self-contained index of your own images (DESIGN.md "Index folder").

    ranking index --checkpoint RUN --images DIR [DIR ...] --out INDEX        # one process
    accelerate launch -m ranking.index --checkpoint RUN --images DIR --out INDEX   # sharded over ranks
    ranking index --add DIR [DIR ...] --index INDEX                           # append, embedding only DIR
    ranking index --remove PATH [PATH ...] --index INDEX                      # drop the rows of files or folders
    ranking index --prune --index INDEX                                       # drop rows whose image file is gone

DIR is a shards folder (its train split, else test; or --split) or a folder of images: class folders (ImageFolder),
a flat folder, or Tiny ImageNet. INDEX holds the model (safetensors and its config), the embeddings, what each row
is and a thumbnail of each image: `ranking search IMAGE --index INDEX` needs nothing else. `--add` takes another
index folder of the same model too (merged without re-embedding). `--add` skips the images the index already holds
(the same source folder, file and content) and says how many; `--add DIR --prune` syncs a folder both ways.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ranking import cli
from ranking.core import distributed, precision
from ranking.core.config import Precision, Split
from ranking.core.errors import ConfigError, RankingError
from ranking.core.flags import above, at_least, parse
from ranking.retrieval import indexfolder
from ranking.retrieval.indexfolder import Index
from ranking.retrieval.inference import EmbeddingModel


@dataclass
class IndexConfig:
    # a new index
    # run folder (its latest checkpoint) or a checkpoint folder; with --add, checked against the index's model
    checkpoint: str = ""
    images: list[str] = field(default_factory=list)  # shards folders or folders of images
    out: str = ""  # the index folder to write (must not exist)

    # syncing
    # images (or index folders of the same model) to append to --index; images already in it are skipped
    add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # image files or folders whose rows --index drops
    prune: bool = False  # drop the rows whose image file is gone from its (still present) source folder
    index: str = ""  # the index folder --add, --remove and --prune change

    # embedding
    split: Split | None = None  # the split of a shards folder (unset: train, else test)
    flip: bool = False  # embed each image as the mean of its and its mirror image's embeddings
    batch_size: int = 64  # images per forward pass, per rank
    workers: int = 0  # DataLoader workers of a shards folder
    # unset: Accelerate decides, else bf16 where the device has it (as `ranking evaluate`); a value here wins
    mixed_precision: Precision | None = None
    collective_timeout_s: float = 300.0  # a rank waiting this long on another (frozen) rank ends the run

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        at_least("--workers", self.workers, 0)
        above("--collective-timeout-s", self.collective_timeout_s, 0)
        if (self.remove or self.prune) and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise ConfigError("--remove and --prune run in one process (ranking index, not accelerate launch)")
        if self.changes_index:
            if self.images or self.out:
                raise ConfigError(
                    "--add, --remove and --prune change --index; --images and --out build a new index (not both)"
                )
            if not self.index:
                flag = "--add" if self.add else "--remove" if self.remove else "--prune"
                raise ConfigError(
                    f"{flag} needs --index INDEX, the index folder to {'append to' if self.add else 'change'}"
                )
        else:
            if not self.images or not self.out or not self.checkpoint:
                raise ConfigError("give --checkpoint RUN --images DIR --out INDEX (or --add DIR --index INDEX)")
            if self.index:
                raise ConfigError("--index names the index that --add, --remove or --prune change; a new one is --out")

    @property
    def changes_index(self) -> bool:
        return bool(self.add or self.remove or self.prune)


def main(argv: list[str] | None = None) -> int:
    config = parse(IndexConfig, argv, "ranking index", __doc__)
    out = Path(config.index if config.changes_index else config.out)
    with contextlib.ExitStack() as held:
        if distributed.launched_rank() == 0:  # the one writer: two runs on one index serialise, the second fails
            held.enter_context(indexfolder.writing(out, new=not config.changes_index))
            if config.remove or config.prune:
                remove_rows(config, out)
        elif not config.changes_index and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RankingError(f"{out}: exists; choose a new folder, or append with --add ... --index {out}")
        return index(config, out) if config.add or not config.changes_index else 0


def remove_rows(config: IndexConfig, out: Path) -> None:
    """--remove and --prune (rank 0, under the index's lock): the index without those rows, published whole."""
    base = Index.load(out, device="cpu")
    removed: set[int] = set()
    for path in config.remove:
        found = indexfolder.rows_under(base, [Path(path)])
        if not found:
            raise RankingError(f"{path}: no row of {out} was indexed from there; nothing removed")
        removed |= set(found)
    if config.prune:
        removed |= set(indexfolder.rows_gone(base))
    if removed:
        indexfolder.write_subset(out, base, sorted(removed))
    print(f"removed {len(removed)} rows; {out} holds {len(base) - len(removed)}", flush=True)


def index(config: IndexConfig, out: Path) -> int:
    """Embed and write (``main`` holds the index's lock)."""
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    paths = [Path(p) for p in config.add or config.images]
    for path in paths:
        if config.add and path.exists() and out.exists() and path.resolve() == out.resolve():
            raise RankingError(f"{path}: is the index --add appends to; adding it to itself would repeat every row")
    base: Index | None = Index.load(out, device="cpu") if config.add else None
    merged = [Index.load(p, device="cpu") for p in paths if indexfolder.is_index(p)]
    sources = [indexfolder.open_images(p, config.split) for p in paths if not indexfolder.is_index(p)]
    skipped = indexfolder.skip_indexed(base, sources) if base is not None else 0
    if base is not None:  # the index's own model embeds what is added
        model = base.model
        if checkpoint is not None:
            indexfolder.check_same_model(base, EmbeddingModel.from_run(checkpoint, flip=base.model.flip), checkpoint)
        for other in merged:
            indexfolder.check_same_model(base, other.model, other.path or "")
    else:
        if merged:
            raise RankingError(
                f"{merged[0].path}: an index folder; a new index is built from images (append it with --add)"
            )
        assert checkpoint is not None  # validate() asks for it
        model = EmbeddingModel.from_run(checkpoint, flip=config.flip, device="cpu")

    from accelerate import Accelerator

    chosen = precision.for_inference(precision.resolve(config.mixed_precision))
    accelerator = Accelerator(
        mixed_precision=chosen.value, kwargs_handlers=[distributed.process_group_kwargs(config.collective_timeout_s)]
    )
    model.to(accelerator.device)
    try:
        embedded = indexfolder.embed_sources(model, sources, accelerator, config.batch_size, config.workers)
    except RuntimeError as e:
        raise distributed.timed_out(e, config.collective_timeout_s, "run `ranking index` again") from None
    if accelerator.is_main_process:
        model.to("cpu")
        indexfolder.write_index(out, model, sources, embedded, base=base, merged=merged)
        added = sum(len(s.entries) for s in sources) + sum(len(m) for m in merged)
        total = added + (len(base) if base is not None else 0)
        also = f", skipped {skipped} already in the index (same file, same content)" if base is not None else ""
        print(
            f"{'added' if base is not None else 'indexed'} {added} images{also} ({model.dim}-d, "
            f"{accelerator.num_processes} process(es), {chosen.describe()}); {out} holds {total}",
            flush=True,
        )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.index")
