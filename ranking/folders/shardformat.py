"""The shard folder's contract (DESIGN.md "Shards"): its manifest, its file and sample names, and reading samples
back by id. ``ranking shards`` writes such folders; the stream, the trainer, the evaluation, the report and search
read them through this module only.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

from PIL import Image

from ranking.core.config import UNLABELLED_SPLIT
from ranking.core.errors import RankingError
from ranking.core.files import file_sha256, read_json, write_atomically

FORMAT = "deep-ranking-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
T = TypeVar("T")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, sample_id: int) -> str:
    """A sample's ``__key__``: unique in the folder, without dots (webdataset splits extensions at the first dot)."""
    return f"{split}_{sample_id:07d}"


def key_id(key: str) -> int:
    """The integer id in a key ``{split}_{id:07d}``."""
    return int(key.rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------------------------------- manifest


def shortened(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_manifest(manifest: Any, path: Path) -> None:
    """The types and cross-checks of every manifest value, each failure a RankingError naming the field: run on
    the parsed JSON before anything indexes into it, so a hand-edited manifest never gives a traceback."""

    def fail(problem: str) -> NoReturn:
        raise RankingError(f"{path}: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fail(f"not a {FORMAT} manifest")
    for key, least in (("seed", 0), ("shard_size", 1)):
        if key in manifest and not _is_count(manifest[key], least):
            fail(f"'{key}' must be a whole number of at least {least}, got {shortened(manifest[key])}")
    for key in ("source", "source_fingerprint", "layout"):
        if key in manifest and not isinstance(manifest[key], str):
            fail(f"'{key}' must be a string, got {shortened(manifest[key])}")
    classes = manifest.get("classes")
    if not isinstance(classes, list):
        fail(f"'classes' must be a list of {{wnid, words}}, got {shortened(classes)}")
    seen: set[str] = set()
    for index, entry in enumerate(classes):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("wnid"), str)
            and entry["wnid"]
            and isinstance(entry.get("words"), str)
        ):
            fail(f"classes[{index}] must be {{wnid: non-empty string, words: string}}, got {shortened(entry)}")
        if entry["wnid"] in seen:
            fail(f"classes[{index}]: {entry['wnid']} is listed twice")
        seen.add(entry["wnid"])
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        fail(f"'splits' must have exactly {', '.join(SPLITS)}")
    for split in SPLITS:
        entry = splits[split]
        if not isinstance(entry, dict):
            fail(f"splits.{split} must be {{count, shards}}, got {shortened(entry)}")
        if not _is_count(entry.get("count")):
            fail(f"splits.{split}.count must be a whole number, got {shortened(entry.get('count'))}")
        shards = entry.get("shards")
        if not isinstance(shards, list):
            fail(f"splits.{split}.shards must be a list of {{name, count, sha256}}, got {shortened(shards)}")
        for index, shard in enumerate(shards):
            where = f"splits.{split}.shards[{index}]"
            if not isinstance(shard, dict):
                fail(f"{where} must be {{name, count, sha256}}, got {shortened(shard)}")
            if shard.get("name") != shard_name(split, index):  # also keeps paths inside the folder
                fail(f"{where}.name must be {shard_name(split, index)!r}, got {shortened(shard.get('name'))}")
            if not _is_count(shard.get("count"), 1):
                fail(f"{where}.count must be a whole number of at least 1, got {shortened(shard.get('count'))}")
            if not (isinstance(shard.get("sha256"), str) and SHA256_HEX.match(shard["sha256"])):
                fail(f"{where}.sha256 must be 64 lowercase hex digits, got {shortened(shard.get('sha256'))}")
        if "converted" in entry and not (_is_count(entry["converted"]) and entry["converted"] <= entry["count"]):
            fail(
                f"splits.{split}.converted must be a whole number up to the count, got {shortened(entry['converted'])}"
            )
        total = sum(shard["count"] for shard in shards)
        if total != entry["count"]:
            fail(f"splits.{split}: count {entry['count']} is not the sum of its shards' counts ({total})")
    labelled = [split for split in ("train", "val") if splits[split]["count"]]
    if labelled and not classes:
        fail(f"'classes' is empty, but the {labelled[0]} split holds labelled samples")


def load_manifest(directory: str | os.PathLike) -> dict:
    """The validated manifest.json of a shard folder."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "missing (not a shard folder, or `ranking shards` did not finish)")
    _check_manifest(manifest, path)
    return manifest


def manifest_digest(directory: str | os.PathLike) -> str:
    """The sha256 of the manifest: it names every shard's sha256, so it identifies the whole shard set."""
    return file_sha256(Path(directory) / MANIFEST)


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


def shard_counts(directory: str | os.PathLike, split: str) -> dict[str, int]:
    """Path (as ``shard_paths`` names it) -> the sample count the manifest lists for that shard."""
    return {str(Path(directory) / s["name"]): s["count"] for s in load_manifest(directory)["splits"][split]["shards"]}


def class_counts(directory: str | os.PathLike, split: str, cache_dir: Path | None = None) -> dict[int, int]:
    """label -> number of samples of ``split``, from every sample's ``cls`` member (tarfile seeks over the JPEGs).

    Cached in ``cache_dir`` as ``.{split}-class-counts.json``, keyed like ``split_index`` by the manifest's shard list
    (names and sha256), so a changed shard is counted again.
    """
    shard_list = load_manifest(directory)["splits"][split]["shards"]

    def count() -> dict[int, int]:
        counts: Counter[int] = Counter()
        for shard in shard_list:
            path = Path(directory) / shard["name"]
            try:
                for member in _members(path, ".cls"):
                    counts[int(member.read(32))] += 1
            except (OSError, tarfile.TarError) as e:
                raise RankingError(f"{path}: cannot read shard ({e})") from None
            except ValueError as e:
                raise RankingError(f"{path}: a sample's cls is not a class index ({e})") from None
        return dict(counts)

    return _cached(
        cache_dir / f".{split}-class-counts.json" if cache_dir else None,
        shard_list,
        "counts",
        count,
        lambda counts: {str(k): v for k, v in sorted(counts.items())},
        lambda stored: {int(label): int(n) for label, n in stored.items()},
    )


def check_labels(directory: str | os.PathLike, splits: Iterable[str]) -> None:
    """Every sample of the labelled ``splits`` has a label among the manifest's classes, from the class counts the
    trainer's feasibility check reads anyway (cached): a manifest edited to list 3 of 8 classes trained and evaluated
    with exit 0. ``ranking shards --verify`` checks every sample; this is its cheap half."""
    manifest = load_manifest(directory)
    classes = len(manifest["classes"])
    for split in splits:
        if split == UNLABELLED_SPLIT or split not in manifest["splits"]:
            continue
        outside = {
            label: n for label, n in class_counts(directory, split, Path(directory)).items() if not 0 <= label < classes
        }
        if outside:
            labels = ", ".join(str(label) for label in sorted(outside)[:5]) + (", ..." if len(outside) > 5 else "")
            raise RankingError(
                f"{Path(directory) / MANIFEST}: lists {classes} classes, but {sum(outside.values())} "
                f"{split} samples have labels outside them ({labels}): the manifest and the shards "
                "disagree (`ranking shards --verify` checks every sample)"
            )


def _cached(
    cache: Path | None,
    shard_list: list,
    key: str,
    compute: Callable[[], T],
    to_json: Callable[[T], Any],
    from_json: Callable[[Any], T],
) -> T:
    """``compute()``, cached in the JSON file ``cache`` as ``{"shards": the manifest's shard list, key: value}``:
    changed shards (names and sha256) are read again; a stale or foreign cache is computed again, an unwritable one
    ignored."""
    if cache and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("shards") == shard_list:
                return from_json(cached[key])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass
    value = compute()
    if cache:
        payload = json.dumps({"shards": shard_list, key: to_json(value)}).encode()
        try:
            write_atomically(cache, lambda f: f.write(payload))
        except OSError:
            pass  # a read-only folder: compute again next time
    return value


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

    def scan() -> dict[int, SampleInfo]:
        return {info.id: info for shard in shard_list for info in _scan_shard(shards_dir / shard["name"])}

    return _cached(
        cache_dir / f"{split}-index.json" if cache_dir else None,
        shard_list,
        "samples",
        scan,
        lambda index: [asdict(index[i]) for i in sorted(index)],
        lambda stored: {s["id"]: SampleInfo(**s) for s in stored},
    )


def _members(path: Path, suffix: str) -> Iterator[IO[bytes]]:
    """The members of one tar whose names end with ``suffix``; tarfile seeks over the others (the JPEG bytes)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(suffix):
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise ValueError(f"{member.name} is not a file")
                yield extracted


def _scan_shard(path: Path) -> Iterable[SampleInfo]:
    """The json of every sample in one tar; tarfile seeks over the JPEG bytes instead of reading them."""
    try:
        for member in _members(path, ".json"):
            meta = json.load(member)
            yield SampleInfo(
                id=int(meta["id"]),
                label=int(meta["label"]),
                file=str(meta["file"]),
                wnid=meta.get("wnid"),
                words=meta.get("words"),
                shard=path.name,
            )
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
