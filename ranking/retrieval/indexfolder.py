"""The portable index (DESIGN.md "Index folder"): a gallery's embeddings with the model that made them, what each row
is, and thumbnails to draw results, in one folder that works wherever it is copied, without the run or the images.

    INDEX/index.json              format, count, dim, classes, sources, the model's identity
    INDEX/model.safetensors       the embedding network's weights
    INDEX/model.json              its identity (ModelSpec: network and preprocessing), flip and source
    INDEX/embeddings.safetensors  "embeddings": float32 [count, dim], row i = item i
    INDEX/items.jsonl             one JSON object per row: id, label, class, words, file, source, thumb
    INDEX/thumbs.tar              a THUMB_SIZE px JPEG per row, ``{id:07d}.jpg``; ``thumb`` = [offset, size] in it

    Index.load(INDEX).search(images, k)    the k nearest rows of each image (PIL images, paths or uint8 tensors)
    build(out, model, sources)             embed image sources (sharded over ranks) and write a new index
    add(index_dir, sources)                embed only the new images and append them (or merge another index)

An image source (``open_images``) is a shards folder (one split) or anything ``ranking.data.archive.open_archive``
reads: class folders, a folder of images, Tiny ImageNet. A folder is written under a temporary name and renamed into
place, so a failed build or add leaves the index as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from PIL import Image

from ranking.core.config import SearchBackendName
from ranking.core.errors import RankingError
from ranking.core.files import (
    check_writable_folder,
    lock_file,
    open_regular,
    publish_folder,
    read_json,
    read_regular,
    remove_stale_temporaries,
    sibling_lock_path,
    temporary_name,
    write_atomically,
    write_text_atomically,
)
from ranking.data.decode import decode_image, to_pil
from ranking.learning.models import MAX_EMBED_DIM
from ranking.retrieval.backends import APPROXIMATE_ABOVE, Backend, build_backend, choose_backend
from ranking.retrieval.inference import MODEL_JSON, MODEL_WEIGHTS, EmbeddingModel, ImageLike
from ranking.retrieval.metrics import EmbeddingSet

if TYPE_CHECKING:
    from accelerate import Accelerator

FORMAT = "deep-ranking-index/1"
MAX_SAFETENSORS_HEADER = 2**20
INDEX_JSON = "index.json"
EMBEDDINGS = "embeddings.safetensors"
ITEMS = "items.jsonl"
THUMBS = "thumbs.tar"
THUMB_SIZE = 64  # pixels of a thumbnail's longer side
THUMB_QUALITY = 85
MAX_ITEM_BYTES = 64 * 2**10  # one line of items.jsonl: its size is bounded by index.json's count times this


@dataclass(frozen=True)
class Item:
    """One gallery row: its id (row in an index; sample id in an evaluation folder), label (-1: none; an index's
    labels are positions in its ``classes``), class name (wnid) and words, file (relative to its source), source."""

    id: int
    label: int
    wnid: str | None
    words: str | None
    file: str
    source: int = 0
    thumb: tuple[int, int] | None = None  # (offset, size) of its JPEG in thumbs.tar
    sha256: str | None = None  # of the image file's bytes (None: indexed before digests were kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "class": self.wnid,
            "words": self.words,
            "file": self.file,
            "source": self.source,
            "thumb": list(self.thumb) if self.thumb else None,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Item:
        thumb = data.get("thumb")
        return cls(
            id=int(data["id"]),
            label=int(data["label"]),
            wnid=data.get("class"),
            words=data.get("words"),
            file=str(data["file"]),
            source=int(data.get("source", 0)),
            thumb=(int(thumb[0]), int(thumb[1])) if thumb else None,
            sha256=str(data["sha256"]) if data.get("sha256") else None,
        )


@dataclass(frozen=True)
class Result:
    rank: int  # 1 = nearest
    distance: float  # squared Euclidean
    item: Item

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "distance": self.distance,
            "id": self.item.id,
            "label": self.item.label,
            "class": self.item.wnid,
            "words": self.item.words,
            "file": self.item.file,
        }


class LazyItems(Sequence[Item]):
    """items.jsonl, parsed one line when it is asked for: a search reads k rows of a 100k gallery, not all."""

    def __init__(self, path: Path, lines: list[bytes]):
        self.path = path
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[Item]:
        return (self[row] for row in range(len(self)))

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        row %= len(self)
        try:
            item = Item.from_dict(json.loads(self.lines[row]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise RankingError(f"{self.path}: line {row + 1} is not an item ({e})") from None
        if item.id != row:
            raise RankingError(f"{self.path}: line {row + 1} holds id {item.id}, expected {row}")
        return item


ThumbnailReader = Callable[[Sequence[Item]], dict[int, Image.Image]]


class Index:
    """A searchable gallery: the model, float32 embeddings [N, D] (one tensor, on the model's device) and N items."""

    def __init__(
        self,
        model: EmbeddingModel,
        embeddings: torch.Tensor,
        items: Sequence[Item],
        *,
        classes: Sequence[str] = (),
        sources: Sequence[dict] = (),
        path: Path | None = None,
        thumbnails: ThumbnailReader | None = None,
    ):
        if embeddings.dim() != 2 or embeddings.shape[0] != len(items):
            raise ValueError(f"{tuple(embeddings.shape)} embeddings for {len(items)} items")
        finite = torch.isfinite(embeddings).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise RankingError(
                f"{path if path is not None else 'the gallery'}: embedding row {row} (and "
                f"{int((~finite).sum()) - 1} more) is not finite (NaN or inf): a damaged gallery, "
                "whose distances would be meaningless; rebuild it"
            )
        self.model = model
        self.embeddings = embeddings.float().contiguous().to(model.device)
        self.items = items
        self.classes = list(classes)
        self.sources = list(sources)
        self.path = path
        self._thumbnails = thumbnails
        self._backend: Backend | None = None  # built on the first search (exact) or by use_backend

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to(self, device: str | torch.device | None) -> Index:
        self.model.to(device)
        self.embeddings = self.embeddings.to(self.model.device)
        self._backend = None
        return self

    def use_backend(self, name: SearchBackendName | None = None, approximate_above: int = APPROXIMATE_ABOVE) -> Backend:
        """Search with ``name`` (``retrieval.backends``: exact, ivf, hnsw), or else exact up to ``approximate_above``
        rows and ivf above; an approximate backend is built here (seconds for a million rows)."""
        self._backend = choose_backend(name, self.embeddings, approximate_above)
        return self._backend

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = build_backend("exact", self.embeddings)
        return self._backend

    # -------------------------------------------------------------------------------------------------- search

    def search(self, images: ImageLike | Iterable[ImageLike], k: int = 10) -> list[list[Result]]:
        """The ``k`` nearest gallery rows of each image, nearest first (images: PIL, paths or uint8 tensors)."""
        return self.search_embeddings(self.model.embed(images), k)

    def search_embeddings(self, queries: torch.Tensor, k: int = 10) -> list[list[Result]]:
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise RankingError(f"queries of shape {list(queries.shape)}; this index holds {self.dim}-d embeddings")
        distances, rows = self.backend.search(queries.to(self.embeddings.device).float(), k)
        return [
            [
                Result(rank, distance, self.items[row])
                for rank, (distance, row) in enumerate(zip(ds.tolist(), rs.tolist()), 1)
            ]
            for ds, rs in zip(distances.cpu(), rows.cpu())
        ]

    def thumbnails(self, items: Sequence[Item]) -> dict[int, Image.Image]:
        """id -> RGB image of each item, to draw results (an index's thumbnails, an evaluation's shard images)."""
        if self._thumbnails is None:
            raise RankingError(f"{self.path}: holds no thumbnails")
        return self._thumbnails(items)

    # -------------------------------------------------------------------------------------------------- folder

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Index:
        """An index folder, checked: its files agree on the count and the dimension, the model rebuilds."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = Path(path)
        meta = read_index_json(path)
        count, dim = meta["count"], meta["dim"]
        try:  # read like any untrusted file: regular, and no larger than index.json's count and dim allow
            stored = load(
                read_regular(
                    path / EMBEDDINGS, count * dim * 4 + MAX_SAFETENSORS_HEADER, f"{count} x {dim} float32 and a header"
                )
            )
        except FileNotFoundError:
            raise RankingError(f"{path / EMBEDDINGS}: missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise RankingError(f"{path / EMBEDDINGS}: not a readable safetensors file ({e})") from None
        embeddings = stored.get("embeddings")
        if embeddings is None or embeddings.dtype != torch.float32 or list(embeddings.shape) != [count, dim]:
            found = "none" if embeddings is None else f"{str(embeddings.dtype)[6:]} {list(embeddings.shape)}"
            raise RankingError(
                f"{path / EMBEDDINGS}: expected float32 embeddings [{count}, {dim}] as {INDEX_JSON} says; found {found}"
            )
        try:
            lines = read_regular(
                path / ITEMS,
                max(count, 1) * MAX_ITEM_BYTES,
                f"{count} items of ranking.retrieval.indexfolder.MAX_ITEM_BYTES",
            ).splitlines()
        except FileNotFoundError:
            raise RankingError(f"{path / ITEMS}: missing") from None
        if len(lines) != count:
            raise RankingError(f"{path / ITEMS}: {len(lines)} items, but {INDEX_JSON} says {count}")
        model = EmbeddingModel.from_folder(path, device)
        if model.dim != dim:
            raise RankingError(
                f"{path / MODEL_JSON}: the model makes {model.dim}-d embeddings, but the index holds {dim}-d ones"
            )
        return cls(
            model,
            embeddings,
            LazyItems(path / ITEMS, lines),
            classes=meta["classes"],
            sources=meta["sources"],
            path=path,
            thumbnails=lambda items: read_thumbnails(path / THUMBS, items),
        )


def is_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` claims to be an index folder (it has an INDEX_JSON of any kind: ``read_index_json`` then
    says what is wrong with it, a FIFO say, rather than the folder being taken for something else)."""
    return os.path.lexists(Path(path) / INDEX_JSON)


def read_index_json(path: Path) -> dict:
    meta = read_json(path / INDEX_JSON, "not found (not an index folder written by `ranking index`)")
    where = path / INDEX_JSON
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RankingError(f"{where}: not a {FORMAT} index")
    for key, kind in (("count", int), ("dim", int), ("classes", list), ("sources", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise RankingError(f"{where}: {key!r} must be a {kind.__name__}")
    if meta["count"] < 0 or not 1 <= meta["dim"] <= MAX_EMBED_DIM:
        raise RankingError(
            f"{where}: count {meta['count']} and dim {meta['dim']} are not an index's (dim at most {MAX_EMBED_DIM})"
        )
    return meta


def read_thumbnails(tar_path: Path, items: Sequence[Item]) -> dict[int, Image.Image]:
    """Each item's thumbnail, read at its recorded offset (no scan of the tar)."""
    encoded = read_thumbnail_bytes(tar_path, items)
    return {id: to_pil(decode_image(data, f"{tar_path}: thumbnail {id}")) for id, data in encoded.items()}


def read_thumbnail_bytes(tar_path: Path, items: Sequence[Item], opened: IO[bytes] | None = None) -> dict[int, bytes]:
    """Each item's thumbnail JPEG as stored, read at its recorded offset, within the file (no scan of the tar);
    from ``opened``, the file already open, when given (a server keeps its index's, which a sync may replace)."""
    found = {}
    try:
        with contextlib.ExitStack() as stack:
            f = opened if opened is not None else stack.enter_context(open_regular(tar_path))
            size = os.fstat(f.fileno()).st_size
            for item in items:
                if item.thumb is None:
                    raise RankingError(f"{tar_path}: item {item.id} has no thumbnail")
                offset, length = item.thumb
                if not (0 <= offset and 0 < length <= MAX_ITEM_BYTES * 16 and offset + length <= size):
                    raise RankingError(
                        f"{tar_path}: item {item.id}'s thumbnail at [{offset}, {length}] lies outside "
                        f"the file's {size} bytes (a damaged items.jsonl)"
                    )
                found[item.id] = os.pread(f.fileno(), length, offset)
    except FileNotFoundError:
        raise RankingError(f"{tar_path}: missing") from None
    except OSError as e:
        raise RankingError(f"{tar_path}: cannot read ({e.strerror})") from None
    return found


# ---------------------------------------------------------------------------------------------------------- sources


class ImageSource:
    """Images to index: ``entries`` (label, class name, words, file) in id order, a sharded ``embed`` and
    ``images()`` (position in ``entries``, RGB image) for the thumbnails; ``digests()`` the sha256 of each entry's
    image file, and ``keep(positions)`` narrows the source to those entries (what ``--add`` has not indexed yet)."""

    path: Path
    kind: str
    split: str | None = None
    entries: list[tuple[int, str | None, str | None, str]]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "kind": self.kind, "split": self.split, "count": len(self.entries)}

    @property
    def ids(self) -> list[int]:
        """The ids ``embed`` returns for ``entries``, in order."""
        return list(range(len(self.entries)))

    def digests(self) -> list[str | None]:
        return [None] * len(self.entries)

    def keep(self, positions: Sequence[int]) -> None:
        raise NotImplementedError

    def embed(self, model: EmbeddingModel, accelerator: Accelerator, batch_size: int, workers: int) -> EmbeddingSet:
        raise NotImplementedError

    def images(self) -> Iterator[tuple[int, Image.Image]]:
        raise NotImplementedError


class ShardsSource(ImageSource):
    """One split of a shards folder, embedded through the evaluation's stream (``embed.embed_split``)."""

    kind = "shards"

    def __init__(self, path: Path, split: str | None):
        from ranking.folders.shardformat import split_counts, split_index

        counts = split_counts(path, ["train", "val", "test"])
        self.path = path
        self.split = split or ("train" if counts["train"] else "test")
        if not counts[self.split]:
            raise RankingError(f"{path}: no {self.split} images to index (choose another --split)")
        infos = split_index(path, self.split)
        if sorted(infos) != list(range(counts[self.split])):
            raise RankingError(
                f"{path}: the {self.split} shards hold {len(infos)} distinct ids, manifest.json says "
                f"{counts[self.split]}"
            )
        self.entries = [(infos[i].label, infos[i].wnid, infos[i].words, infos[i].file) for i in sorted(infos)]
        self.sample_ids = sorted(infos)
        self.everything = len(self.sample_ids)
        self._digests: list[str | None] | None = None

    @property
    def ids(self) -> list[int]:
        return list(self.sample_ids)

    def embed(self, model: EmbeddingModel, accelerator: Accelerator, batch_size: int, workers: int) -> EmbeddingSet:
        from ranking.retrieval.embed import embed_split

        return embed_split(
            model.net,
            accelerator,
            str(self.path),
            str(self.split),
            spec=model.spec,
            batch_size=batch_size,
            workers=workers,
            flip=model.flip,
            only_ids=frozenset(self.sample_ids) if len(self.sample_ids) < self.everything else None,
        )

    def _jpegs(self) -> Iterator[tuple[int, str, bytes]]:
        """(position in entries, where, JPEG bytes) of each kept sample, read from the shards in their order."""
        from ranking.folders.shardformat import key_id, shard_paths

        position = {sample_id: n for n, sample_id in enumerate(self.sample_ids)}
        for shard in shard_paths(self.path, str(self.split)):
            try:
                with tarfile.open(shard) as tar:
                    for member in tar:
                        if member.name.endswith(".jpg") and key_id(member.name[:-4]) in position:
                            extracted = tar.extractfile(member)
                            data = extracted.read() if extracted else b""
                            yield position[key_id(member.name[:-4])], f"{shard}: {member.name}", data
            except (OSError, tarfile.TarError) as e:
                raise RankingError(f"{shard}: cannot read shard ({e})") from None

    def digests(self) -> list[str | None]:
        if self._digests is None:
            found: list[str | None] = [None] * len(self.entries)
            for n, _, data in self._jpegs():
                found[n] = hashlib.sha256(data).hexdigest()
            self._digests = found
        return self._digests

    def keep(self, positions: Sequence[int]) -> None:
        digests = self.digests()
        self.entries = [self.entries[n] for n in positions]
        self.sample_ids = [self.sample_ids[n] for n in positions]
        self._digests = [digests[n] for n in positions]

    def images(self) -> Iterator[tuple[int, Image.Image]]:
        for n, where, data in self._jpegs():
            yield n, to_pil(decode_image(data, where))


class _FolderSamples(torch.utils.data.IterableDataset):
    """This rank's share (position % world_size == rank) of a folder's images, decoded to uint8."""

    def __init__(self, source: FolderSource, rank: int, world_size: int, shorter_side: int):
        self.source, self.rank, self.world_size, self.shorter_side = source, rank, world_size, shorter_side

    def __iter__(self):
        for position, (label, _, _, _) in enumerate(self.source.entries):
            if position % self.world_size == self.rank:
                yield self.source.image(position, self.shorter_side), label, position


class FolderSource(ImageSource):
    """Class folders, a flat folder of images or Tiny ImageNet, read by ``ranking.data.archive`` (its size limits and
    checks): every image of every split, train then val then test, each in the archive's order."""

    def __init__(self, path: Path):
        from ranking.data.archive import open_archive

        self.path = path
        self.dataset = open_archive(path)
        self.kind = self.dataset.layout
        samples = [s for split in ("train", "val", "test") for s in self.dataset.samples(split)]
        if not samples:
            raise RankingError(f"{path}: no images to index")
        classes = self.dataset.classes
        self.entries = [
            (
                s.label,
                classes[s.label].wnid if s.label >= 0 else None,
                classes[s.label].words if s.label >= 0 else None,
                s.file,
            )
            for s in samples
        ]
        self._digests: list[str | None] | None = None

    def digests(self) -> list[str | None]:
        if self._digests is None:
            self._digests = [hashlib.sha256(self.dataset.read(entry[3])).hexdigest() for entry in self.entries]
        return self._digests

    def keep(self, positions: Sequence[int]) -> None:
        digests = self.digests()
        self.entries = [self.entries[n] for n in positions]
        self._digests = [digests[n] for n in positions]

    def image(self, position: int, shorter_side: int | None = None) -> torch.Tensor:
        """uint8 ``[3, H, W]``, upright RGB (``ranking.data.decode``), as a query file of it is decoded: a large
        image reduced on decoding to no less than ``shorter_side`` (the model's image size, or a thumbnail's)."""
        file = self.entries[position][3]
        return decode_image(self.dataset.read(file), self.dataset.describe(file), shorter_side)

    def embed(self, model: EmbeddingModel, accelerator: Accelerator, batch_size: int, workers: int) -> EmbeddingSet:
        from torch.utils.data import DataLoader

        from ranking.data.augment import EvalResize, collate_samples
        from ranking.retrieval.embed import embed_loader

        spec = model.spec
        samples = _FolderSamples(self, accelerator.process_index, accelerator.num_processes, spec.image_size)
        loader = DataLoader(
            samples,
            batch_size=batch_size,
            num_workers=0,  # an open zip does not go to workers
            collate_fn=collate_samples,
        )
        return embed_loader(
            model.net,
            accelerator,
            loader,
            model.dim,
            model.normalize,
            model.flip,
            resize=EvalResize(spec.image_size, spec.mean, spec.std),
        )

    def images(self) -> Iterator[tuple[int, Image.Image]]:
        for position in range(len(self.entries)):
            yield position, to_pil(self.image(position, THUMB_SIZE))


def open_images(path: str | os.PathLike, split: str | None = None) -> ImageSource:
    """A shards folder (its ``split``, default train, else test) or a folder / zip that ``open_archive`` reads."""
    from ranking.folders.shardformat import MANIFEST

    path = Path(path)
    if not path.exists():
        raise RankingError(f"{path}: no such folder or file (expected a shards folder or a folder of images)")
    if (path / MANIFEST).is_file():
        return ShardsSource(path, split)
    if split:
        raise RankingError(f"{path}: --split chooses a split of a shards folder; this is a folder of images")
    return FolderSource(path)


# ---------------------------------------------------------------------------------------------------------- writing


def embed_sources(
    model: EmbeddingModel,
    sources: Sequence[ImageSource],
    accelerator: Accelerator,
    batch_size: int = 64,
    workers: int = 0,
) -> list[torch.Tensor]:
    """Every source's embeddings [n, D] on the CPU, rows in id order, on every rank (a collective)."""
    found = []
    for source in sources:
        if not source.entries:  # every image already in the index
            found.append(torch.zeros(0, model.dim))
            continue
        embedded = source.embed(model, accelerator, batch_size, workers)
        if embedded.ids.tolist() != source.ids:
            raise RankingError(f"{source.path}: embedded {len(embedded.ids)} distinct images of {len(source.entries)}")
        found.append(embedded.embeddings.float().cpu())
    return found


def thumbnail_jpeg(image: Image.Image, size: int = THUMB_SIZE) -> bytes:
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return buffer.getvalue()


def check_same_model(index: Index, model: EmbeddingModel, where: str | os.PathLike) -> None:
    """Rows of one index must come from one model: the same dimension and the same weights."""
    if model.dim != index.dim:
        raise RankingError(
            f"{where}: makes {model.dim}-d embeddings, but the index {index.path} holds "
            f"{index.dim}-d ones; mixed embedding dimensions cannot be searched together "
            "(build a new index)"
        )
    if model.weights_sha256 != index.model.weights_sha256:
        raise RankingError(
            f"{where}: a different model (weights sha256 {model.weights_sha256[:12]}) than the "
            f"index {index.path} was built with ({index.model.weights_sha256[:12]}); its embeddings "
            "would not be comparable (build a new index)"
        )


# ---------------------------------------------------------------------------------------------------------- syncing


def source_key(source: dict[str, Any]) -> tuple[str, str | None]:
    """What makes two sources the same: the resolved path and the split."""
    return str(source.get("path")), source.get("split")


def skip_indexed(base: Index, sources: Sequence[ImageSource]) -> int:
    """Narrow each source to the images ``base`` does not hold yet: an image is held when a row has the same source
    (resolved path and split), the same file and the same content (sha256; rows indexed before digests were kept:
    the same file). Returns how many were skipped."""
    held: set[tuple[tuple[str, str | None], str, str | None]] = set()
    for item in base.items:
        if 0 <= item.source < len(base.sources):
            held.add((source_key(base.sources[item.source]), item.file, item.sha256))
    skipped = 0
    for source in sources:
        key = source_key(source.describe())
        digests = source.digests()
        kept = [
            n
            for n, (entry, digest) in enumerate(zip(source.entries, digests))
            if (key, entry[3], digest) not in held and (key, entry[3], None) not in held
        ]
        skipped += len(source.entries) - len(kept)
        if len(kept) < len(source.entries):
            source.keep(kept)
    return skipped


def item_location(index: Index, item: Item) -> Path | None:
    """Where a row's image was read from (its source folder / its file), or None if its source is not a folder of
    files (shards, a zip)."""
    if not 0 <= item.source < len(index.sources):
        return None
    source = index.sources[item.source]
    if source.get("kind") == "shards" or not isinstance(source.get("path"), str):
        return None
    root = Path(source["path"])
    return None if root.suffix.lower() == ".zip" else root / item.file


def rows_under(index: Index, paths: Sequence[Path]) -> list[int]:
    """Rows whose image is one of ``paths`` or lies under one (resolved), or whose source is one of them."""
    targets = [Path(os.path.abspath(p)) for p in paths]
    resolved = [p.resolve() for p in targets]
    found = []
    for item in index.items:
        source = index.sources[item.source] if 0 <= item.source < len(index.sources) else {}
        root = Path(str(source.get("path", "")))
        location = root / item.file
        for target in (*targets, *resolved):
            if target == location or target in location.parents or target == root:
                found.append(item.id)
                break
    return found


def rows_gone(index: Index) -> list[int]:
    """Rows whose image file is no longer in its source folder (sources that are folders of files; a source folder
    that is gone whole is refused, as it may only be unmounted: remove its rows by name)."""
    gone, missing_roots = [], set()
    for item in index.items:
        location = item_location(index, item)
        if location is None:
            continue
        root = Path(index.sources[item.source]["path"])
        if not root.is_dir():
            missing_roots.add(str(root))
        elif not location.is_file():
            gone.append(item.id)
    if missing_roots:
        first = sorted(missing_roots)[0]
        raise RankingError(
            f"{first}: the source folder of {index.path}'s rows is gone (unmounted?); --prune removes the rows "
            f"of images missing from a folder that is there; remove these with --remove {first}"
        )
    return gone


def write_subset(out: Path, base: Index, removed: Sequence[int]) -> Path:
    """Write ``base`` without the rows ``removed`` as the index folder ``out`` (rows renumbered in order, thumbnails
    repacked), published like every write: a crash leaves the index as it was."""
    out = Path(out)
    tmp = temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    gone = set(removed)
    kept = [item for item in base.items if item.id not in gone]
    try:
        assert base.path is not None
        tmp.mkdir(parents=True)
        for name in (MODEL_WEIGHTS, MODEL_JSON):
            with open_regular(base.path / name) as source_file, open(tmp / name, "wb") as copy:
                shutil.copyfileobj(source_file, copy)
        thumbs = read_thumbnail_bytes(base.path / THUMBS, [item for item in kept if item.thumb is not None])
        lines = []
        with tarfile.open(tmp / THUMBS, "w") as tar:
            for row, item in enumerate(kept):
                thumb = _add_thumbnail_bytes(tar, row, thumbs[item.id]) if item.id in thumbs else None
                moved = Item(row, item.label, item.wnid, item.words, item.file, item.source, thumb, item.sha256)
                lines.append(json.dumps(moved.to_dict()).encode())
        rows = torch.tensor([item.id for item in kept], dtype=torch.long)
        _write_rows(tmp, base.model, base.embeddings.cpu()[rows], lines, base.classes, base.sources)
        publish_folder(tmp, out)
    except OSError as e:
        raise RankingError(f"{out}: cannot write the index ({e.strerror or e}); it is left as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _add_thumbnail_bytes(tar: tarfile.TarFile, row: int, data: bytes) -> tuple[int, int]:
    """Append one thumbnail JPEG as ``{row:07d}.jpg``; its (offset, size) in the tar."""
    info = tarfile.TarInfo(f"{row:07d}.jpg")
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))  # after its header
    tar.addfile(info, io.BytesIO(data))
    return offset, len(data)


def _write_rows(
    tmp: Path,
    model: EmbeddingModel,
    embeddings: torch.Tensor,
    lines: Sequence[bytes],
    classes: Sequence[str],
    sources: Sequence[dict],
) -> None:
    """The embeddings, items and index.json of an index folder being written in ``tmp``."""
    from safetensors.torch import save

    write_atomically(
        tmp / EMBEDDINGS,
        lambda f: f.write(save({"embeddings": embeddings.contiguous()}, metadata={"format": FORMAT})),
    )
    write_atomically(tmp / ITEMS, lambda f: f.write(b"".join(line + b"\n" for line in lines)))
    meta = {
        "format": FORMAT,
        "count": len(lines),
        "dim": model.dim,
        "normalized": model.normalize,
        "flip": model.flip,
        "thumb_size": THUMB_SIZE,
        "classes": list(classes),
        "sources": list(sources),
        "model": model.source,
    }
    write_text_atomically(tmp / INDEX_JSON, json.dumps(meta, indent=2) + "\n")


@contextlib.contextmanager
def writing(out: Path, new: bool) -> Iterator[None]:
    """Hold the lock of the index folder ``out`` (``.OUT.lock`` beside it, as the folder itself is replaced whole)
    while one ``ranking index`` builds (``new``) or grows it: a second run on it fails at once with one line, so two
    ``--add``s cannot both pass and one lose the other's rows. Under the lock, temporary folders of killed runs are
    removed, and a new index's ``out`` must not exist."""
    flag = "--out" if new else "--index"
    if new and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankingError(f"{out}: exists; choose a new folder, or append with --add ... --index {out}")
    if not new and not is_index(out):
        read_index_json(out)  # the one line saying why it is not an index
    check_writable_folder(out.parent, f"{flag}'s folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(sibling_lock_path(out), out, "ranking index", remove=True):
        for stale in remove_stale_temporaries(out):
            print(f"{out}: removed {stale.name}, left by a ranking index that was killed", file=sys.stderr)
        if new and out.exists() and (not out.is_dir() or any(out.iterdir())):  # written while we waited
            raise RankingError(f"{out}: exists; choose a new folder, or append with --add ... --index {out}")
        yield


def write_index(
    out: Path,
    model: EmbeddingModel,
    sources: Sequence[ImageSource],
    embedded: Sequence[torch.Tensor],
    base: Index | None = None,
    merged: Sequence[Index] = (),
) -> Path:
    """Write ``base`` (if any) + the ``merged`` indexes' rows + the sources' rows as the index folder ``out``.

    Built under a temporary name beside ``out`` (``base``'s files copied, not re-embedded), then published in its
    place (``files.publish_folder``): an index being grown stays readable until the new one is there.
    """
    out = Path(out)
    tmp = temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_index(tmp, out, model, sources, embedded, base, merged)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: the index stays as it was
        raise RankingError(f"{out}: cannot write the index ({e.strerror or e}); it is left as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_index(
    tmp: Path,
    out: Path,
    model: EmbeddingModel,
    sources: Sequence[ImageSource],
    embedded: Sequence[torch.Tensor],
    base: Index | None,
    merged: Sequence[Index],
) -> None:

    tmp.mkdir(parents=True)
    classes = list(base.classes) if base else []
    lines: list[bytes] = list(base.items.lines) if base and isinstance(base.items, LazyItems) else []
    if base is not None and not isinstance(base.items, LazyItems):
        lines = [json.dumps(item.to_dict()).encode() for item in base.items]
    parts = [base.embeddings.cpu()] if base else []
    described = list(base.sources) if base else []
    if base is not None and base.path is not None:
        for name in (MODEL_WEIGHTS, MODEL_JSON, THUMBS):
            with open_regular(base.path / name) as source_file, open(tmp / name, "wb") as copy:
                shutil.copyfileobj(source_file, copy)
    else:
        model.save(tmp)

    def label_of(name: str | None) -> int:
        if name is None:
            return -1
        if name not in classes:
            classes.append(name)
        return classes.index(name)

    with tarfile.open(tmp / THUMBS, "a" if (tmp / THUMBS).exists() else "w") as tar:

        def add_thumbnail(row: int, image: Image.Image) -> tuple[int, int]:
            return _add_thumbnail_bytes(tar, row, thumbnail_jpeg(image))

        for other in merged:  # rows of another index of the same model, thumbnails copied
            first = len(lines)
            source_offset = len(described)
            described += other.sources
            thumbs = other.thumbnails(list(other.items))
            for item in other.items:
                row = first + item.id
                entry = Item(
                    row,
                    label_of(item.wnid),
                    item.wnid,
                    item.words,
                    item.file,
                    source_offset + item.source,
                    add_thumbnail(row, thumbs[item.id]),
                    item.sha256,
                )
                lines.append(json.dumps(entry.to_dict()).encode())
            parts.append(other.embeddings.cpu())
        for source, embeddings in zip(sources, embedded):
            if not source.entries:  # everything it holds was in the index already
                continue
            first = len(lines)
            described.append({**source.describe(), "first_id": first})
            thumbs_at: dict[int, tuple[int, int]] = {}
            if source.entries:
                for position, image in source.images():
                    thumbs_at[position] = add_thumbnail(first + position, image)
            digests = source.digests()
            for position, (_, wnid, words, file) in enumerate(source.entries):
                entry = Item(
                    first + position,
                    label_of(wnid),
                    wnid,
                    words,
                    file,
                    len(described) - 1,
                    thumbs_at.get(position),
                    digests[position],
                )
                lines.append(json.dumps(entry.to_dict()).encode())
            parts.append(embeddings)
    all_embeddings = torch.cat(parts) if parts else torch.zeros(0, model.dim)
    _write_rows(tmp, model, all_embeddings, lines, classes, described)
    publish_folder(tmp, out)
