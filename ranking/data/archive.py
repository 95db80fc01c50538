"""Read a dataset without extracting or copying it: classes and samples. Three layouts (open_archive picks one):

- `tiny-imagenet`: the official `tiny-imagenet-200.zip` or its extracted folder (Archive), described below;
- `imagefolder`: a folder of class folders, `ROOT/<class>/**/*.jpg` as torchvision's ImageFolder (FolderDataset):
  class = folder name, class index = position in the sorted folder names; val images from a second such folder
  (`val_source`) or a seeded per-class fraction of ROOT's (`val_fraction`); no test split;
- `flat`: a folder of unlabelled images `ROOT/*.jpg` with no class folders (FolderDataset): a gallery only,
  written as the test split with label -1 (training needs labels).

In the folder layouts the images may be any format PIL reads (FOLDER_IMAGE_SUFFIXES); each one's header is read when
listed, and those that are not upright RGB JPEGs (PNG, WebP, grayscale or CMYK JPEG, a JPEG with an EXIF rotation:
every phone photo) are marked to be converted once, upright, to an RGB JPEG by the shard writer
(`FolderDataset.converted`).

The layout, inside a folder `tiny-imagenet-200/` (the folder may also be the source itself):

    wnids.txt                      one WordNet id per line: the classes
    words.txt                      wnid <TAB> words (may cover all of WordNet)
    train/<wnid>/images/*.JPEG     labelled by their folder
    val/images/*.JPEG              labelled by val/val_annotations.txt (file <TAB> wnid <TAB> box)
    test/images/*.JPEG             unlabelled

Stray files (`.DS_Store`, `__MACOSX/`, `*_boxes.txt`, directory entries) are ignored; CRLF line endings and a
missing final newline are fine. Everything else that does not fit is a RankingError naming the file.

No file is read whole on trust: a file (zip member or file on disk) over MAX_FILE_BYTES is refused, by its listed
size before reading and again while reading (a zip header may lie), so a zip bomb costs at most that much memory.
In a folder source every listed file must be a regular file (a symlink counts as what it points to): a FIFO, a
device or a dangling symlink is refused by name, never opened for a read that would block or never end.
"""

from __future__ import annotations

import os
import random
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from ranking.core.errors import RankingError
from ranking.core.files import file_kind, read_regular, shown_name
from ranking.folders.shardformat import SPLITS

ROOT_NAME = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg")
# torchvision's ImageFolder extensions
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_ANNOTATIONS = "val/val_annotations.txt"
# The largest file read: an image (Tiny ImageNet's are ~2 KB; a 16 MiB JPEG is a ~50-megapixel photo) or a text
# file (the official words.txt, all of WordNet, is 2.6 MB).
MAX_FILE_BYTES = 16 * 2**20


def _too_large(where: str, size: int | str) -> RankingError:
    return RankingError(
        f"{where}: {size} bytes, over the limit of {MAX_FILE_BYTES} bytes per file "
        f"(ranking.data.archive.MAX_FILE_BYTES)"
    )


@dataclass(frozen=True)
class ClassInfo:
    wnid: str
    words: str


@dataclass(frozen=True)
class Sample:
    split: str
    id: int  # position in the split's canonical order (its files sorted by path)
    file: str  # path relative to the tiny-imagenet-200/ folder (folder layouts: see FolderDataset)
    label: int  # class index, -1 for test
    size: int  # bytes, as listed by the source (part of the plan's fingerprint)


class Source:
    """Files of the layout by their path relative to the tiny-imagenet-200/ folder, in a zip or on disk."""

    path: Path

    def files(self) -> dict[str, int]:
        """Every regular file: relative path -> size in bytes."""
        raise NotImplementedError

    def read(self, file: str) -> bytes:
        raise NotImplementedError

    def describe(self, file: str) -> str:
        """How to name the file in an error message."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _is_stray(parts: tuple[str, ...]) -> bool:
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


class ZipSource(Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise RankingError(f"{path}: not a readable zip archive, truncated or corrupt? ({e})") from None
        names = [info.filename for info in self.zip.infolist()]
        self.prefix = _find_root(path, names)
        self.sizes = {
            info.filename[len(self.prefix) :]: info.file_size
            for info in self.zip.infolist()
            if not info.is_dir()
            and info.filename.startswith(self.prefix)
            and not _is_stray(PurePosixPath(info.filename).parts)
        }

    def files(self) -> dict[str, int]:
        return self.sizes

    def read(self, file: str) -> bytes:
        try:
            info = self.zip.getinfo(self.prefix + file)
        except KeyError:
            raise RankingError(f"{self.describe(file)}: no such member") from None
        if info.file_size > MAX_FILE_BYTES:
            raise _too_large(self.describe(file), f"{info.file_size} uncompressed")
        try:
            with self.zip.open(info) as member:
                data = member.read(MAX_FILE_BYTES + 1)  # never more, whatever the header says
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise RankingError(f"{self.describe(file)}: corrupt zip member ({e})") from None
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(self.describe(file), f"more than {MAX_FILE_BYTES} uncompressed")
        return data

    def describe(self, file: str) -> str:
        return f"{self.path}:{self.prefix}{file}"

    def close(self) -> None:
        self.zip.close()


class FolderSource(Source):
    def __init__(self, path: Path):
        self.path = path
        roots = [p for p in (path, path / ROOT_NAME) if (p / "wnids.txt").is_file()]
        if not roots:
            raise RankingError(f"{path}: no {ROOT_NAME}/wnids.txt: not the official Tiny ImageNet layout")
        self.root = roots[0]
        self.sizes = {}
        for directory, subdirs, names in os.walk(self.root):
            subdirs[:] = sorted(d for d in subdirs if not _is_stray((d,)))
            relative = Path(directory).relative_to(self.root)
            for name in names:
                if not _is_stray((name,)):
                    full = Path(directory, name)
                    self.sizes[(relative / name).as_posix()] = _regular_file_size(full)

    def files(self) -> dict[str, int]:
        return self.sizes

    def read(self, file: str) -> bytes:
        return read_regular_file(self.root / file)

    def describe(self, file: str) -> str:
        return str(self.root / file)


def _regular_file_size(path: Path) -> int:
    """The size of a regular file (after symlinks); anything else is a RankingError naming it."""
    try:
        info = path.stat()
    except OSError as e:
        raise RankingError(
            f"{path}: cannot read ({e.strerror}{', a dangling symlink' if path.is_symlink() else ''})"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        via = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise RankingError(f"{path}: {file_kind(info.st_mode)}{via}, not a regular file; remove it from the source")
    return info.st_size


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES (``files.read_regular``: opened without blocking and
    checked on the open file, so a FIFO or device put in its place after the listing is refused, not waited on)."""
    try:
        return read_regular(path, MAX_FILE_BYTES, "ranking.data.archive.MAX_FILE_BYTES", "; remove it from the source")
    except FileNotFoundError:
        raise RankingError(f"{path}: cannot read (No such file or directory)") from None


def _find_root(source: Path, names: list[str]) -> str:
    """The folder prefix holding wnids.txt: '' or 'something/' (the official zip has 'tiny-imagenet-200/')."""
    roots = sorted(
        name[: -len("wnids.txt")]
        for name in names
        if PurePosixPath(name).name == "wnids.txt" and name.count("/") <= 1 and not _is_stray(PurePosixPath(name).parts)
    )
    if not roots:
        raise RankingError(f"{source}: no {ROOT_NAME}/wnids.txt: not the official Tiny ImageNet layout")
    if len(roots) > 1:
        raise RankingError(
            f"{source}: several wnids.txt ({', '.join(r + 'wnids.txt' for r in roots)}); "
            "expected one Tiny ImageNet folder"
        )
    return roots[0]


def open_source(path: str | os.PathLike) -> Source:
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return ZipSource(path)
    raise RankingError(f"{path}: no such file or folder (expected tiny-imagenet-200.zip or its extracted folder)")


def _text_rows(source: Source, file: str) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of the non-blank lines; CRLF and a missing final newline are fine."""
    if file not in source.files():
        raise RankingError(f"{source.describe(file)}: missing (not the official Tiny ImageNet layout)")
    try:
        text = source.read(file).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RankingError(f"{source.describe(file)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [
        (n, [field.strip() for field in line.split("\t")])
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def _is_image(file: str) -> bool:
    return file.lower().endswith(IMAGE_SUFFIXES)


S = TypeVar("S", bound="SampleSource")


class SampleSource:
    """What `ranking shards` packs: classes, each split's samples, and their bytes; a context manager that closes
    its source (an Archive of Tiny ImageNet, or a FolderDataset of class folders or plain images)."""

    source: Source
    _samples: dict[str, list[Sample]]

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def samples(self, split: str) -> list[Sample]:
        return self._samples[split]

    def read(self, file: str) -> bytes:
        return self.source.read(file)

    def describe(self, file: str) -> str:
        return self.source.describe(file)


class Archive(SampleSource):
    """The classes (index = position of the wnid in sorted(wnids.txt)) and the samples of each split."""

    layout = "tiny-imagenet"
    converted: frozenset[str] = frozenset()  # Tiny ImageNet's JPEGs are kept as they are, grayscale ones too

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = open_source(path)
        try:
            self.classes = self._read_classes()
            self.label_of = {c.wnid: index for index, c in enumerate(self.classes)}
            self._samples = {split: self._list(split) for split in SPLITS}
        except BaseException:
            self.source.close()
            raise

    def spec(self) -> tuple:
        """What a pool worker needs to reopen the source (see reopen_source)."""
        return ("tiny", str(self.path))

    def _read_classes(self) -> list[ClassInfo]:
        wnids: list[str] = []
        for line, fields in _text_rows(self.source, "wnids.txt"):
            if fields[0] in wnids:
                raise RankingError(f"{self.describe('wnids.txt')}: line {line}: {fields[0]} is listed twice")
            wnids.append(fields[0])
        words = {fields[0]: fields[1] for _, fields in _text_rows(self.source, "words.txt") if len(fields) > 1}
        if not wnids:
            raise RankingError(f"{self.describe('wnids.txt')}: lists no classes")
        missing = [w for w in wnids if w not in words]
        if missing:
            raise RankingError(
                f"{self.describe('words.txt')}: no words for {len(missing)} class(es) of wnids.txt, e.g. {missing[0]}"
            )
        return [ClassInfo(wnid, words[wnid]) for wnid in sorted(wnids)]

    def _list(self, split: str) -> list[Sample]:
        files = self.source.files()
        if split == "train":
            labelled = self._train_labels(files)
        elif split == "val":
            labelled = self._val_labels(files)
        else:
            labelled = {f: -1 for f in files if f.startswith("test/images/") and _is_image(f)}
        if not labelled and split != "test":
            raise RankingError(f"{self.describe(split + '/')}: no images (not the official Tiny ImageNet layout)")
        return [Sample(split, i, f, labelled[f], files[f]) for i, f in enumerate(sorted(labelled))]

    def _train_labels(self, files: dict[str, int]) -> dict[str, int]:
        labels = {}
        for file in files:
            parts = file.split("/")
            if parts[0] != "train" or not _is_image(file):
                continue
            if len(parts) != 4 or parts[2] != "images":
                raise RankingError(f"{self.describe(file)}: train images belong in train/<wnid>/images/")
            if parts[1] not in self.label_of:
                raise RankingError(f"{self.describe(file)}: class {parts[1]} is not listed in wnids.txt")
            labels[file] = self.label_of[parts[1]]
        empty = sorted(set(self.label_of) - {f.split("/")[1] for f in labels})
        if labels and empty:
            raise RankingError(f"{self.describe('train/' + empty[0] + '/images/')}: no train images for this class")
        return labels

    def _val_labels(self, files: dict[str, int]) -> dict[str, int]:
        images = {f for f in files if f.startswith("val/") and _is_image(f)}
        stray = sorted(f for f in images if not f.startswith("val/images/") or f.count("/") != 2)
        if stray:
            raise RankingError(f"{self.describe(stray[0])}: val images belong in val/images/")
        labels = {}
        for line, fields in _text_rows(self.source, VAL_ANNOTATIONS):
            where = f"{self.describe(VAL_ANNOTATIONS)}: line {line}"
            if len(fields) < 2:
                raise RankingError(f"{where}: expected 'file<TAB>wnid<TAB>box', got {chr(9).join(fields)!r}")
            file, wnid = "val/images/" + fields[0], fields[1]
            if wnid not in self.label_of:
                raise RankingError(f"{where}: {fields[0]} is annotated with {wnid}, which is not in wnids.txt")
            if file in labels:
                raise RankingError(f"{where}: {fields[0]} is annotated twice")
            if file not in images:
                raise RankingError(f"{where}: annotation for {fields[0]}, but there is no such image")
            labels[file] = self.label_of[wnid]
        unannotated = sorted(images - set(labels))
        if unannotated:
            raise RankingError(
                f"{self.describe(unannotated[0])}: val image without annotation in "
                f"{VAL_ANNOTATIONS} ({len(unannotated)} such image(s))"
            )
        return labels


class FolderTreeSource(Source):
    """Regular files under one or more folders, each mounted at a prefix ('' or 'train/', 'val/')."""

    def __init__(self, roots: list[tuple[str, Path]]):
        self.roots = [(prefix, Path(root)) for prefix, root in roots]
        self.path = self.roots[0][1]

    def _locate(self, file: str) -> Path:
        for prefix, root in self.roots:
            if file.startswith(prefix):
                return root / file[len(prefix) :]
        raise RankingError(f"{file}: under none of {', '.join(str(root) for _, root in self.roots)}")

    def read(self, file: str) -> bytes:
        return read_regular_file(self._locate(file))

    def describe(self, file: str) -> str:
        return str(self._locate(file))


def list_images(root: Path) -> dict[str, int]:
    """Image files under root (any depth, stray files skipped): path relative to root -> size. Files with an
    image suffix must be regular files (after symlinks); other files are ignored, as ImageFolder does."""
    images = {}
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _is_stray((d,)))
        relative = Path(directory).relative_to(root)
        for name in names:
            if not _is_stray((name,)) and name.lower().endswith(FOLDER_IMAGE_SUFFIXES):
                images[(relative / name).as_posix()] = _regular_file_size(Path(directory, name))
    return images


def needs_conversion(path: Path) -> bool:
    """Whether the image must be re-encoded to be stored: anything but an RGB JPEG without an EXIF rotation (read
    from its header only; RankingError if it is no image or declares too many pixels)."""
    from ranking.data.decode import read_header  # torch and its decoders, only for folder sources

    header = read_header(path, str(path))
    return not (header.format == "JPEG" and header.mode == "RGB" and header.orientation == 1)


class FolderDataset(SampleSource):
    """The `imagefolder` and `flat` layouts, with Archive's interface (classes, samples, read, describe, close).

    A sample's `file` is its path relative to the source folder; with `val_source`, `train/...` is relative to the
    source and `val/...` to the val folder. Class wnid and words are both the folder name.
    """

    source: FolderTreeSource

    def __init__(
        self,
        path: str | os.PathLike,
        val_source: str | os.PathLike | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
    ):
        self.path = Path(path)
        if not 0.0 <= val_fraction < 1.0:
            raise RankingError(f"val_fraction must be at least 0 and below 1; got {val_fraction}")
        if val_source and val_fraction:
            raise RankingError("give either a val folder or a val fraction, not both")
        images = list_images(self.path)
        if not images:
            raise RankingError(
                f"{self.path}: no images (expected tiny-imagenet-200, class folders of images, "
                f"or a folder of images; image suffixes: {' '.join(FOLDER_IMAGE_SUFFIXES)})"
            )
        top = sorted(f for f in images if "/" not in f)
        nested = sorted(f for f in images if "/" in f)
        if top and nested:
            raise RankingError(
                f"{self.path}: holds both images ({top[0]}) and class folders "
                f"({nested[0].split('/')[0]}/); expected one layout"
            )
        self._samples: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        self.sizes: dict[str, int] = {}
        if top:
            if val_source or val_fraction:
                raise RankingError(
                    f"{self.path}: a folder of unlabelled images has no val split; val images need class folders"
                )
            self.layout = "flat"
            self.classes: list[ClassInfo] = []
            self.source = FolderTreeSource([("", self.path)])
            self.sizes = images
            self._add("test", {f: -1 for f in images})
        else:
            self.layout = "imagefolder"
            names = sorted({f.split("/")[0] for f in nested})
            for name in names:
                if shown_name(name) != name:  # stored as text in every shard and manifest: UTF-8, one line
                    raise RankingError(
                        f"{self.path / shown_name(name)}: a class folder name that is not printable "
                        "UTF-8 text (shown with \\xNN for its other bytes); rename it"
                    )
            self.classes = [ClassInfo(name, name) for name in names]
            self.label_of = {c.wnid: index for index, c in enumerate(self.classes)}
            train = {f: self.label_of[f.split("/")[0]] for f in nested}
            if val_source:
                val_root = Path(val_source)
                if not val_root.is_dir():
                    raise RankingError(f"{val_root}: no such folder (the val images, as class folders)")
                val = self._val_folder(val_root)
                self.source = FolderTreeSource([("train/", self.path), ("val/", val_root)])
                self.sizes = {"train/" + f: n for f, n in images.items()}
                self.sizes.update({"val/" + f: n for f, n in val.items()})
                train = {"train/" + f: label for f, label in train.items()}
                val_labels = {"val/" + f: self.label_of[f.split("/")[0]] for f in val}
            else:
                self.source = FolderTreeSource([("", self.path)])
                self.sizes = images
                val_labels = self._split_off(train, val_fraction, seed)
                train = {f: label for f, label in train.items() if f not in val_labels}
            self._add("train", train)
            self._add("val", val_labels)
        self.converted = frozenset(f for f in self.sizes if needs_conversion(Path(self.source.describe(f))))

    def _add(self, split: str, labelled: dict[str, int]) -> None:
        self._samples[split] = [Sample(split, i, f, labelled[f], self.sizes[f]) for i, f in enumerate(sorted(labelled))]

    def _val_folder(self, root: Path) -> dict[str, int]:
        images = list_images(root)
        if not images:
            raise RankingError(f"{root}: no images (expected class folders of val images)")
        for file in sorted(images):
            if "/" not in file:
                raise RankingError(f"{root / file}: val images belong in class folders, as in {self.path}")
            if file.split("/")[0] not in self.label_of:
                raise RankingError(
                    f"{root / file.split('/')[0]}: class {file.split('/')[0]!r} has no folder in {self.path}"
                )
        return images

    def _split_off(self, train: dict[str, int], fraction: float, seed: int) -> dict[str, int]:
        """A seeded share of each class's images (rounded; every class keeps at least one train image)."""
        val: dict[str, int] = {}
        for label, info in enumerate(self.classes):
            files = sorted(f for f, lab in train.items() if lab == label)
            take = min(round(fraction * len(files)), len(files) - 1)
            chosen = random.Random(f"{seed}/{info.wnid}").sample(files, take)
            val.update({f: label for f in chosen})
        return val

    def spec(self) -> tuple:
        """What a pool worker needs to reopen the source (see reopen_source)."""
        return ("folders", tuple((prefix, str(root)) for prefix, root in self.source.roots))


def is_tiny_imagenet(path: Path) -> bool:
    """A zip, or a folder with any of Tiny ImageNet's own files (so one missing wnids.txt is named as missing
    rather than its train/ val/ test/ folders taken for classes)."""
    marks = ("wnids.txt", "words.txt", VAL_ANNOTATIONS)
    return path.is_file() or any((p / mark).is_file() for p in (path, path / ROOT_NAME) for mark in marks)


def open_archive(
    path: str | os.PathLike, val_source: str | os.PathLike | None = None, val_fraction: float = 0.0, seed: int = 0
) -> Archive | FolderDataset:
    """The dataset at `path` in whichever layout it has: a zip or a folder with wnids.txt is Tiny ImageNet, any other
    folder class folders (imagefolder) or a folder of images (flat)."""
    path = Path(path)
    if path.is_dir() and not is_tiny_imagenet(path):
        return FolderDataset(path, val_source, val_fraction, seed)
    if val_source or val_fraction:
        raise RankingError(
            f"{path}: is Tiny ImageNet, which has its own val split; a val folder or val fraction "
            "only applies to class folders"
        )
    return Archive(path)


def reopen_source(spec: tuple) -> Source:
    kind, where = spec
    return open_source(where) if kind == "tiny" else FolderTreeSource([(p, Path(r)) for p, r in where])
