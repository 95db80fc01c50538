"""The shard folder's contract (DESIGN.md "Shards"): its manifest, its file and sample names, and reading samples
back by id. ``ranking shards`` writes such folders; the stream, the trainer, the evaluation, the report and search
read them through this module only.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

from ranking.errors import RankingError
from ranking.files import read_json, write_atomically

FORMAT = "deep-ranking-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, sample_id: int) -> str:
    """A sample's ``__key__``: unique in the folder, without dots (webdataset splits extensions at the first dot)."""
    return f"{split}_{sample_id:07d}"


def key_id(key: str) -> int:
    """The integer id in a key ``{split}_{id:07d}``."""
    return int(key.rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------------------------------- manifest


def _check_manifest(manifest: Any, path: Path) -> None:
    def fail(problem: str) -> NoReturn:
        raise RankingError(f"{path}: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fail(f"not a {FORMAT} manifest")
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not all(isinstance(c, dict) and {"wnid", "words"} <= c.keys()
                                                for c in classes):
        fail("'classes' must be a list of {wnid, words}")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        fail(f"'splits' must have exactly {', '.join(SPLITS)}")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) and {"name", "count", "sha256"} <= s.keys()
                                                   for s in shards):
            fail(f"splits.{split}.shards must be a list of {{name, count, sha256}}")
        if sum(s["count"] for s in shards) != entry.get("count"):
            fail(f"splits.{split}: count {entry.get('count')} is not the sum of its shards' counts")


def load_manifest(directory: str | os.PathLike) -> dict:
    """The validated manifest.json of a shard folder."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "missing (not a shard folder, or `ranking shards` did not finish)")
    _check_manifest(manifest, path)
    return manifest


def split_counts(directory: str | os.PathLike, splits: Iterable[str]) -> dict[str, int]:
    """Sample count of each split from the manifest (read before any work, so a bad folder fails fast)."""
    splits = list(splits)
    manifest = load_manifest(directory)
    missing = [split for split in splits if split not in manifest["splits"]]
    if missing:
        raise RankingError(f"{directory}: no {', '.join(missing)} split in {MANIFEST}")
    return {split: manifest["splits"][split]["count"] for split in splits}


def shard_paths(directory: str | os.PathLike, split: str) -> list[str]:
    """The split's shard files in manifest order."""
    if split not in SPLITS:
        raise RankingError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    paths = [str(Path(directory) / s["name"]) for s in load_manifest(directory)["splits"][split]["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RankingError(f"{missing[0]}: shard listed in {MANIFEST} is missing ({len(missing)} missing)")
    return paths


# ---------------------------------------------------------------------------------------------------------- by id


@dataclass(frozen=True)
class SampleInfo:
    id: int
    label: int
    file: str
    wnid: str | None
    words: str | None
    shard: str  # file name inside the shards folder


def split_index(shards_dir: Path, split: str, cache_dir: Path | None = None) -> dict[int, SampleInfo]:
    """id -> SampleInfo for every sample of ``split``, from the samples' json; cached in ``cache_dir``.

    The cache names the shards it was built from (name and sha256 from the manifest) and is rebuilt when they change.
    """
    shard_list = load_manifest(shards_dir)["splits"][split]["shards"]
    cache = cache_dir / f"{split}-index.json" if cache_dir else None
    if cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("shards") == shard_list:
                return {s["id"]: SampleInfo(**s) for s in cached["samples"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a stale or foreign cache is rebuilt
    index = {info.id: info for shard in shard_list for info in _scan_shard(shards_dir / shard["name"])}
    if cache:
        samples = [asdict(index[i]) for i in sorted(index)]
        payload = json.dumps({"shards": shard_list, "samples": samples}).encode()
        try:
            write_atomically(cache, lambda f: f.write(payload))
        except OSError:
            pass  # a read-only index folder: scan again next time
    return index


def _scan_shard(path: Path) -> Iterable[SampleInfo]:
    """The json of every sample in one tar; tarfile seeks over the JPEG bytes instead of reading them."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        raise KeyError(member.name)
                    meta = json.load(extracted)
                    yield SampleInfo(id=int(meta["id"]), label=int(meta["label"]), file=str(meta["file"]),
                                     wnid=meta.get("wnid"), words=meta.get("words"), shard=path.name)
    except (OSError, tarfile.TarError) as e:
        raise RankingError(f"{path}: cannot read shard ({e})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RankingError(f"{path}: a sample's json is not in the shard format ({e})") from None


def read_images(shards_dir: Path, split: str, samples: Iterable[SampleInfo]) -> dict[int, Image.Image]:
    """id -> RGB image of each requested sample, opening each shard that holds one of them once."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for info in samples:
        by_shard[info.shard].append(info.id)
    images = {}
    for shard, ids in by_shard.items():
        path = shards_dir / shard
        try:
            with tarfile.open(path) as tar:
                for sample_id in ids:
                    member = tar.extractfile(f"{sample_key(split, sample_id)}.jpg")
                    if member is None:
                        raise KeyError(sample_key(split, sample_id))
                    with Image.open(io.BytesIO(member.read())) as image:
                        images[sample_id] = image.convert("RGB")
        except (OSError, tarfile.TarError, KeyError) as e:
            raise RankingError(f"{path}: cannot read a sample image ({e})") from None
    return images
