"""`ranking shards SOURCE --out DIR`: repack a dataset into WebDataset shards; `ranking shards --verify DIR`.

SOURCE is Tiny ImageNet (zip or folder), class folders of images, or a folder of unlabelled images
(ranking.data.archive.open_archive); in the folder layouts images that are not upright RGB JPEGs (other formats, and
JPEGs with an EXIF rotation) are converted once, upright, to RGB JPEGs.

Output (DESIGN.md, "Shards"): `DIR/{train,val,test}-NNNNNN.tar` and `DIR/manifest.json`. A sample's id is its
position in its split's files sorted by path; train samples are written in a seeded permutation so every shard
mixes classes. Each shard is written under a temporary name, fsynced and renamed; `DIR/.journal.jsonl` records each
finished shard (its sha256 and a fingerprint of its planned content) so that a re-run, even after a crash, verifies
and skips finished shards. `manifest.json` is written last, atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from tqdm import tqdm

from ranking.core.errors import ConfigError, RankingError
from ranking.core.files import (
    LOCK,
    append_line,
    check_writable_folder,
    file_sha256,
    folder_lock,
    write_atomically,
    write_text_atomically,
)
from ranking.core.flags import at_least, parse
from ranking.data.archive import Archive, ClassInfo, FolderDataset, Sample, Source, open_archive, reopen_source
from ranking.data.decode import decode_image, decode_jpeg, read_header, to_pil
from ranking.folders.shardformat import FORMAT, MANIFEST, SPLITS, load_manifest, sample_key, shard_name, shortened

JOURNAL = ".journal.jsonl"
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")
JPEG_QUALITY = 95  # of the images converted to RGB JPEG (folder layouts: PNG, WebP, grayscale or CMYK JPEG, rotated)


@dataclass
class ShardsConfig:
    # the shards
    # tiny-imagenet-200.zip or its extracted folder, a folder of class folders of images (ImageFolder), or a folder
    # of unlabelled images (a gallery: the test split)
    source: str = field(default="", metadata={"positional": True})
    out: str = ""  # destination folder; default shards/<source name>
    shard_size: int = 1000  # samples per shard
    seed: int = 0  # train shuffle
    overwrite: bool = False  # replace the shards of another source in --out (or write into a non-shard folder)

    # class folders
    val_source: str = ""  # the val images, as class folders too
    val_fraction: float = 0.0  # or this seeded share of each class's images becomes val

    # checking
    verify: str = ""  # re-hash and re-count the shards of this folder against its manifest, and exit

    # run
    workers: int = 0  # packing processes; 0 = one per CPU core, up to 8
    progress: bool = True  # a progress bar on a terminal

    def validate(self) -> None:
        if self.source and self.verify:
            raise ConfigError("give either SOURCE or --verify DIR, not both")
        if not self.source and not self.verify:
            raise ConfigError("SOURCE is required (or --verify DIR)")
        for name, least in (("shard_size", 1), ("workers", 0), ("seed", 0)):
            at_least(name, getattr(self, name), least)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    samples: tuple[Sample, ...]
    fingerprint: str  # sha256 of what the shard will hold: a finished shard with another fingerprint is stale
    convert: frozenset[str] = frozenset()  # files to re-encode as RGB JPEG (folder layouts)


@dataclass(frozen=True)
class ShardResult:
    name: str
    count: int
    sha256: str


# ---------------------------------------------------------------------------------------------------------- plan


def plan_shards(archive: Archive | FolderDataset, shard_size: int, seed: int) -> list[ShardPlan]:
    """Every shard of every split, with its samples in write order. Ids do not depend on shard size or seed."""
    classes = json.dumps([dataclasses.astuple(c) for c in archive.classes])
    plans = []
    for split in SPLITS:
        samples = list(archive.samples(split))
        if split == "train":
            random.Random(seed).shuffle(samples)
        for index, start in enumerate(range(0, len(samples), shard_size)):
            chunk = tuple(samples[start : start + shard_size])
            convert = frozenset(s.file for s in chunk if s.file in archive.converted)
            content: list[Any] = [FORMAT, classes, [dataclasses.astuple(s) for s in chunk]]
            if convert:  # (absent from Tiny ImageNet's plans, whose fingerprints stay those of earlier versions)
                content.append([JPEG_QUALITY, sorted(convert)])
            fingerprint = hashlib.sha256(json.dumps(content).encode()).hexdigest()
            plans.append(ShardPlan(shard_name(split, index), chunk, fingerprint, convert))
    return plans


# ---------------------------------------------------------------------------------------------------------- write


def check_jpeg(data: bytes, where: str) -> None:
    """Decode the whole image: a JPEG the trainer cannot read (or one declaring too many pixels) must fail here,
    naming its file."""
    header = read_header(data, where)
    if header.format != "JPEG":
        raise RankingError(f"{where}: not a JPEG (a {header.format} image)")
    decode_jpeg(data, where)


def to_rgb_jpeg(data: bytes, where: str) -> bytes:
    """Decode any image (``decode.decode_image``: upright, transparency over white) and encode it once as an RGB
    JPEG at JPEG_QUALITY, with no EXIF left to rotate it again; RankingError naming the file if it does not decode."""
    buffer = io.BytesIO()
    to_pil(decode_image(data, where)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_sample(sample: Sample, jpeg: bytes, classes: list[ClassInfo], converted: bool = False) -> dict:
    info = classes[sample.label] if sample.label >= 0 else None
    meta = {
        "id": sample.id,
        "split": sample.split,
        "label": sample.label,
        "wnid": info and info.wnid,
        "words": info and info.words,
        "file": sample.file,
    }
    if converted:
        meta["converted"] = True
    return {
        "__key__": sample_key(sample.split, sample.id),
        "jpg": jpeg,
        "cls": str(sample.label).encode(),
        "json": json.dumps(meta).encode(),
    }


def write_shard(plan: ShardPlan, out: Path, source: Source, classes: list[ClassInfo]) -> ShardResult:
    """Write one shard atomically, hashed before it appears under its name. Byte-identical for the same plan."""

    def write(f: IO[bytes]) -> None:
        with wds.TarWriter(f, encoder=False, mtime=0, user="", group="") as writer:
            for sample in plan.samples:
                jpeg = source.read(sample.file)
                if sample.file in plan.convert:
                    jpeg = to_rgb_jpeg(jpeg, source.describe(sample.file))
                else:
                    check_jpeg(jpeg, source.describe(sample.file))
                writer.write(encode_sample(sample, jpeg, classes, sample.file in plan.convert))

    digest: list[str] = []
    write_atomically(out / plan.name, write, before_publish=lambda tmp: digest.append(file_sha256(tmp)))
    return ShardResult(plan.name, len(plan.samples), digest[0])


_worker: dict = {}  # each pool process opens the source once


def _open_worker_source(spec: tuple, classes: list[ClassInfo]) -> None:
    _worker.update(source=reopen_source(spec), classes=classes)


def _write_in_worker(task: tuple[ShardPlan, str]) -> ShardResult:
    plan, out = task
    return write_shard(plan, Path(out), _worker["source"], _worker["classes"])


def pack(archive: Archive | FolderDataset, plans: list[ShardPlan], out: Path, workers: int) -> Iterator[ShardResult]:
    """Write the shards, yielding each as it finishes (in any order with several workers)."""
    if workers <= 1 or len(plans) <= 1:
        for plan in plans:
            yield write_shard(plan, out, archive.source, archive.classes)
        return
    initargs = (archive.spec(), archive.classes)
    # an executor, not multiprocessing.Pool: a Pool whose worker dies (killed, out of memory) waits forever for its
    # result; the executor reports it (BrokenProcessPool)
    with ProcessPoolExecutor(min(workers, len(plans)), initializer=_open_worker_source, initargs=initargs) as pool:
        futures = [pool.submit(_write_in_worker, (plan, str(out))) for plan in plans]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise RankingError(
                f"{out}: a packing worker died (killed, or out of memory?); run `ranking shards` again"
            ) from None
        finally:
            for future in futures:
                future.cancel()  # the queued ones; those running finish, and what they wrote is cleaned up


# ---------------------------------------------------------------------------------------------------------- resume


def source_identity(archive: Archive | FolderDataset) -> dict:
    """What makes a re-run "the same source": its resolved path, or the same content (classes and every sample's
    split, file, label and size), so that the zip and its extracted folder are the same source."""
    listing: list[list[Any]] = [[dataclasses.astuple(c) for c in archive.classes]]
    listing += [[s.split, s.file, s.label, s.size] for split in SPLITS for s in archive.samples(split)]
    fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"path": str(archive.path.resolve()), "name": archive.path.name, "fingerprint": fingerprint}


def read_journal_source(out: Path) -> dict | None:
    """The source recorded by the journal's first line ({"source": {...}}); None in a journal without one."""
    try:
        with open(out / JOURNAL) as f:
            record = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    source = record.get("source") if isinstance(record, dict) else None
    return source if isinstance(source, dict) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_destination(out: Path, source: dict, plans: list[ShardPlan]) -> None:
    """Refuse to write into a folder that holds shards of another source, or other files, before touching it.

    Same source: the journal's recorded source (path or content fingerprint), else the manifest's
    `source_fingerprint`, else (folders written before these were recorded) the manifest's `source` name or a
    journal record of one of this run's planned shards. An empty folder, or one holding only temporaries, is free.
    """
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir() if not TEMPORARY.match(p.name) and p.name != LOCK}
    if not entries or (entries == {JOURNAL} and not read_journal(out)):  # empty, or a run that wrote no shard
        return
    hint = "give --overwrite to replace them, or choose another --out"
    recorded = read_journal_source(out)
    manifest = _read_json(out / MANIFEST)
    manifest = manifest if isinstance(manifest, dict) else {}
    if recorded is not None:
        if recorded.get("path") == source["path"] or recorded.get("fingerprint") == source["fingerprint"]:
            return
        raise RankingError(f"{out}: holds shards of another source ({recorded.get('path')}); {hint}")
    if isinstance(manifest.get("source_fingerprint"), str):
        if manifest["source_fingerprint"] == source["fingerprint"]:
            return
        raise RankingError(f"{out}: holds shards of another source ({manifest.get('source')}); {hint}")
    if manifest.get("format") == FORMAT:
        if manifest.get("source") == source["name"]:
            return
        raise RankingError(f"{out}: holds shards of another source ({manifest.get('source')}); {hint}")
    journal = read_journal(out)
    if journal:
        planned = {plan.name: plan.fingerprint for plan in plans}
        if any(planned.get(name) == record.get("plan") for name, record in journal.items()):
            return
        raise RankingError(f"{out}: holds shards of an unfinished run of another source or plan; {hint}")
    raise RankingError(
        f"{out}: is not empty and not a shard folder (no {MANIFEST} or {JOURNAL}); give --overwrite "
        "to write shards into it anyway (other files are left alone), or choose an empty or new folder"
    )


def start_journal(out: Path, source: dict, keep: bool) -> None:
    """Record the source as the journal's first line before any shard is written; keep the finished shards'
    records of a re-run of the same source, drop them when overwriting another source's."""
    kept = "".join(json.dumps(record) + "\n" for record in read_journal(out).values()) if keep else ""
    write_text_atomically(out / JOURNAL, json.dumps({"source": source}) + "\n" + kept)


def read_journal(out: Path) -> dict[str, dict]:
    """Finished shards by name (the last record wins); a line torn by a crash is ignored."""
    records: dict[str, dict] = {}
    try:
        lines = (out / JOURNAL).read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
            records[record["name"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    return records


def journal_line(plan: ShardPlan, result: ShardResult) -> str:
    return json.dumps({**dataclasses.asdict(result), "plan": plan.fingerprint}) + "\n"


def append_journal(out: Path, line: str) -> None:
    append_line(out / JOURNAL, line)


def finished_shards(out: Path, plans: list[ShardPlan]) -> dict[str, ShardResult]:
    """Shards already on disk with the planned content, checked by sha256 against the journal."""
    journal, finished = read_journal(out), {}
    for plan in plans:
        record = journal.get(plan.name)
        path = out / plan.name
        if (
            record
            and record.get("plan") == plan.fingerprint
            and path.is_file()
            and file_sha256(path) == record.get("sha256")
        ):
            finished[plan.name] = ShardResult(plan.name, record["count"], record["sha256"])
    return finished


def remove_leftovers(out: Path, plans: list[ShardPlan]) -> None:
    """Temporary files of an interrupted run, and shards of an earlier plan (another shard size or source)."""
    planned = {plan.name for plan in plans}
    for path in out.iterdir():
        if TEMPORARY.match(path.name) or (SHARD_NAME.match(path.name) and path.name not in planned):
            path.unlink()


def discard(out: Path, todo: list[ShardPlan], remove_folder: bool) -> None:
    """After bad input, leave nothing that looks like a result of this run. Pool workers may have renamed
    shards the parent has not heard of yet, so every shard this run was to write goes."""
    for plan in todo:
        (out / plan.name).unlink(missing_ok=True)
    if remove_folder:
        (out / JOURNAL).unlink(missing_ok=True)
        remove_leftovers(out, todo)
        (out / LOCK).unlink(missing_ok=True)
        out.rmdir()


# ---------------------------------------------------------------------------------------------------------- main API


def build_manifest(
    archive: Archive | FolderDataset,
    plans: list[ShardPlan],
    results: dict[str, ShardResult],
    seed: int,
    shard_size: int,
) -> dict:
    fingerprint = source_identity(archive)["fingerprint"]
    splits: dict[str, dict[str, Any]] = {
        split: {"count": len(archive.samples(split)), "shards": []} for split in SPLITS
    }
    for plan in plans:
        split = plan.name.split("-")[0]
        splits[split]["shards"].append(dataclasses.asdict(results[plan.name]))
    manifest = {
        "format": FORMAT,
        "source": archive.path.name,
        "source_fingerprint": fingerprint,
        "seed": seed,
        "shard_size": shard_size,
        "classes": [dataclasses.asdict(c) for c in archive.classes],
        "splits": splits,
    }
    if archive.layout != "tiny-imagenet":  # (Tiny ImageNet's manifests stay as they were)
        manifest["layout"] = archive.layout
        for split, entry in splits.items():
            entry["converted"] = sum(s.file in archive.converted for s in archive.samples(split))
    return manifest


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 1000,
    workers: int = 1,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    val_source: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
) -> dict:
    """Repack the archive into shards under `out`; finished shards of an earlier run are verified and kept.

    Bad input raises RankingError before anything is written (layout, annotations) or while packing (an
    unreadable member or JPEG); then the shards this run wrote are removed and no manifest.json exists.
    A folder holding shards of another source, or other files, is refused unless `overwrite` (check_destination).
    `source` is Tiny ImageNet (zip or folder), class folders (with `val_source` or `val_fraction`, split by `seed`)
    or a folder of images (ranking.data.archive.open_archive).
    """
    ShardsConfig(source=str(source), out=str(out), shard_size=shard_size, workers=workers, seed=seed).validate()
    out = Path(out)
    with open_archive(source, val_source, val_fraction, seed) as archive, contextlib.ExitStack() as held:
        plans = plan_shards(archive, shard_size, seed)
        if out.exists() and not out.is_dir():
            raise RankingError(f"{out}: exists and is not a folder")
        check_writable_folder(out, "--out")  # under a file, read-only: one line before any work
        identity = source_identity(archive)
        try:
            check_destination(out, identity, plans)
            same_source = True
        except RankingError:
            if not overwrite:
                raise
            same_source = False
        created = not out.exists()
        held.enter_context(folder_lock(out, "ranking shards"))  # creates out; a second writer fails at once
        todo: list[ShardPlan] = []  # what discard removes: never the finished shards of an earlier run
        bar = None
        try:
            start_journal(out, identity, keep=same_source)
            remove_leftovers(out, plans)
            results = finished_shards(out, plans)
            todo = [plan for plan in plans if plan.name not in results]
            if todo:
                (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the manifest is back

            bar = tqdm(
                total=sum(len(plan.samples) for plan in plans),
                unit="img",
                desc=f"shards {out.name}",
                initial=sum(result.count for result in results.values()),
                file=sys.stderr,
                disable=not progress,
                dynamic_ncols=True,
            )
            plan_of = {plan.name: plan for plan in todo}
            for result in pack(archive, todo, out, workers or min(8, os.cpu_count() or 1)):
                append_journal(out, journal_line(plan_of[result.name], result))
                results[result.name] = result
                bar.update(result.count)
        except RankingError:
            discard(out, todo, remove_folder=created)
            raise
        except OSError as e:  # a full disk: the shards of this run go, finished shards of earlier runs stay
            discard(out, todo, remove_folder=created)
            raise RankingError(f"{out}: cannot write shards ({e.strerror or e})") from None
        finally:
            if bar is not None:
                bar.close()
            if out.is_dir():
                remove_leftovers(out, plans)  # temporaries of pool workers stopped mid-shard

        manifest = build_manifest(archive, plans, results, seed, shard_size)
        try:
            write_text_atomically(
                out / JOURNAL,
                json.dumps({"source": identity})
                + "\n"
                + "".join(journal_line(plan, results[plan.name]) for plan in plans),
            )
            write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except OSError as e:  # the shards are complete and kept: a rerun with room only writes these two files
            raise RankingError(
                f"{out}: cannot write {MANIFEST} ({e.strerror or e}); free some space and run "
                "`ranking shards` again (the finished shards are kept)"
            ) from None
    return manifest


def check_shard_samples(path: Path, split: str, expected: int, num_classes: int, ids: set[int]) -> list[str]:
    """Open one shard: its samples' count, keys and labels against the manifest; adds the ids it holds to `ids`.
    Problems come back as text naming the shard."""
    name, found, problems = path.name, 0, []
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})
                extracted = tar.extractfile(member) if extension == "cls" else None
                if extracted is not None:
                    samples[key]["cls"] = extracted.read(32)
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"{name} is not a readable tar ({e})"]
    for key, fields in samples.items():
        found += 1
        prefix, _, digits = key.rpartition("_")
        if prefix != split or not digits.isdigit():
            problems.append(f"{name} holds sample {shortened(key)}, not a {split}_NNNNNNN key")
            continue
        sample_id = int(digits)
        if sample_id in ids:
            problems.append(f"{name} holds sample {key} twice or also another shard does")
        ids.add(sample_id)
        try:
            label = int(fields.get("cls", b"").decode())
        except ValueError:
            problems.append(f"{name}: sample {key} has no integer label")
            continue
        if split == "test" and label != -1:
            problems.append(f"{name}: test sample {key} has label {label}; test samples are unlabelled (-1)")
        elif split != "test" and not 0 <= label < num_classes:
            problems.append(f"{name}: sample {key} has label {label}, outside the {num_classes} classes")
    if found != expected:
        problems.append(f"{name} holds {found} samples, the manifest says {expected}")
    return problems[:3]


def verify_shards(directory: str | os.PathLike) -> dict:
    """Check a shard folder end to end; returns the manifest, raises RankingError naming bad shards.

    Every manifest value is checked (load_manifest), every shard re-hashed against it, then opened:
    its sample count, keys and labels must match the manifest and the split's ids must be exactly 0..count-1.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems = []
    for split in SPLITS:
        ids: set[int] = set()
        readable = True
        for shard in manifest["splits"][split]["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                problems.append(f"{shard['name']} missing")
            elif file_sha256(path) != shard["sha256"]:
                problems.append(f"{shard['name']} sha256 mismatch")
            else:
                found = check_shard_samples(path, split, shard["count"], len(manifest["classes"]), ids)
                problems += found
                readable = readable and not found
                continue
            readable = False
        count = manifest["splits"][split]["count"]
        if readable and ids != set(range(count)):
            outside = sorted(ids - set(range(count)))
            problems.append(
                f"{split} shards hold ids outside 0..{count - 1}, e.g. {outside[0]}"
                if outside
                else f"{split} shards lack ids of 0..{count - 1}, e.g. {min(set(range(count)) - ids)}"
            )
    if problems:
        raise RankingError(f"{directory}: {len(problems)} shard(s) fail verification: {', '.join(problems)}")
    return manifest


def summary(manifest: dict) -> str:
    return ", ".join(
        f"{split} {entry['count']} samples in {len(entry['shards'])} shard(s)"
        for split, entry in manifest["splits"].items()
    )


def main(argv: list[str] | None = None) -> int:
    config = parse(ShardsConfig, argv, "ranking shards", __doc__.splitlines()[0])
    if config.verify:
        manifest = verify_shards(config.verify)
        print(f"{config.verify}: OK, {summary(manifest)}")
        return 0
    out = config.out or str(Path("shards") / Path(config.source).name.removesuffix(".zip"))
    manifest = write_shards(
        config.source,
        out,
        config.shard_size,
        config.workers,
        config.seed,
        config.progress,
        config.overwrite,
        config.val_source or None,
        config.val_fraction,
    )
    print(f"{out}: {summary(manifest)}")
    return 0
