"""A subset of the 40-class Tiny ImageNet zip small enough to carry to a GPU machine: ~300 train images per class,
all val images of those classes, a few test images, in the official layout (``ranking shards`` reads it as is).

    python bench/make_gpu_subset.py [--source ../shared/data/tiny-imagenet-40cls.zip] [--train-per-class 300]
                                    [--out bench/data/tiny-imagenet-gpu-subset.zip]

Train images are taken by their index in the file name (``<wnid>_<i>.JPEG``, i < train-per-class), so the subset is
the same on every run; ``*_boxes.txt`` and ``words.txt`` are filtered to what the subset holds. The zip is written
under a temporary name and renamed; it fails if it would exceed ``--max-mib`` (the machine takes 64 MiB of carried
files in all, wheels included).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from pathlib import Path

ROOT = "tiny-imagenet-200/"
HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "shared" / "data" / "tiny-imagenet-40cls.zip"
FIXED_DATE = (2020, 1, 1, 0, 0, 0)
TRAIN_IMAGE = re.compile(r"train/(n\d+)/images/\1_(\d+)\.JPEG$")


def subset_members(source: zipfile.ZipFile, train_per_class: int, test_count: int) -> list[tuple[str, bytes]]:
    names = source.namelist()
    wnids = source.read(ROOT + "wnids.txt").decode().split()
    classes = set(wnids)
    words = [
        line for line in source.read(ROOT + "words.txt").decode().splitlines() if line.split("\t", 1)[0] in classes
    ]
    members = [
        (ROOT + "wnids.txt", "\n".join(wnids).encode() + b"\n"),
        (ROOT + "words.txt", "\n".join(words).encode() + b"\n"),
    ]
    kept_train = set()
    for name in sorted(names):
        match = TRAIN_IMAGE.search(name)
        if match and match.group(1) in classes and int(match.group(2)) < train_per_class:
            kept_train.add(name.rsplit("/", 1)[1])
            members.append((name, source.read(name)))
    for wnid in wnids:  # boxes of the kept images only (ranking ignores them; the layout has them)
        boxes = f"{ROOT}train/{wnid}/{wnid}_boxes.txt"
        if boxes in names:
            lines = [line for line in source.read(boxes).decode().splitlines() if line.split("\t", 1)[0] in kept_train]
            members.append((boxes, "\n".join(lines).encode() + b"\n"))
    members.append((ROOT + "val/val_annotations.txt", source.read(ROOT + "val/val_annotations.txt")))
    members += [
        (name, source.read(name))
        for name in sorted(names)
        if name.startswith(ROOT + "val/images/") and name.endswith(".JPEG")
    ]
    tests = sorted(name for name in names if name.startswith(ROOT + "test/images/") and name.endswith(".JPEG"))
    members += [(name, source.read(name)) for name in tests[:test_count]]
    return members


def write_zip(members: list[tuple[str, bytes]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
                info.external_attr = 0o100644 << 16
                archive.writestr(info, data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=HERE / "data" / "tiny-imagenet-gpu-subset.zip")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test", type=int, default=100, help="test images (unlabelled; unused by the check)")
    parser.add_argument("--max-mib", type=float, default=40.0)
    args = parser.parse_args()
    with zipfile.ZipFile(args.source) as source:
        members = subset_members(source, args.train_per_class, args.test)
    size = sum(len(data) for _, data in members) / 2**20
    if size > args.max_mib:
        print(f"make_gpu_subset: {size:.1f} MiB of files exceeds --max-mib {args.max_mib:g}", file=sys.stderr)
        return 2
    write_zip(members, args.out)
    train = sum("/train/" in name and name.endswith(".JPEG") for name, _ in members)
    val = sum("/val/images/" in name for name, _ in members)
    print(f"{args.out}: {train} train, {val} val images, {args.out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
