"""Archive -> shards -> read back with webdataset: exactly the source, ids per contract, resumable, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import webdataset as wds

from ranking import cli
from ranking.core.errors import RankingError
from ranking.data.archive import Archive
from ranking.folders.shardformat import load_manifest, shard_paths
from ranking.shards import main, verify_shards, write_shards

SPLITS = ("train", "val", "test")


def read_split(directory: Path, split: str) -> list[dict]:
    """Raw samples in file order, read by webdataset as a trainer would."""
    dataset = wds.WebDataset(
        shard_paths(directory, split), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    return list(dataset)


def check_shards_equal_source(directory: Path, source: Path) -> dict[str, list[dict]]:
    """Counts, keys, ids, labels, metadata and JPEG bytes of every sample equal the archive's."""
    manifest = load_manifest(directory)
    read = {split: read_split(directory, split) for split in SPLITS}
    with Archive(source) as archive:
        assert manifest["classes"] == [{"wnid": c.wnid, "words": c.words} for c in archive.classes]
        assert [c["wnid"] for c in manifest["classes"]] == sorted(c["wnid"] for c in manifest["classes"])
        for split in SPLITS:
            expected = archive.samples(split)
            samples = read[split]
            assert len(samples) == len(expected) == manifest["splits"][split]["count"]
            assert [s["__key__"] for s in samples if "." in s["__key__"]] == []
            by_id = {}
            for sample in samples:
                meta = json.loads(sample["json"])
                assert sample["__key__"] == f"{split}_{meta['id']:07d}"
                by_id[meta["id"]] = (sample, meta)
            assert sorted(by_id) == list(range(len(expected)))  # ids unique, 0..n-1
            for source_sample in expected:  # ids follow the split's files sorted by path
                sample, meta = by_id[source_sample.id]
                assert sample["jpg"] == archive.read(source_sample.file)
                assert int(sample["cls"]) == meta["label"] == source_sample.label
                assert meta["file"] == source_sample.file and meta["split"] == split
                if split == "test":
                    assert meta["label"] == -1 and meta["wnid"] is None and meta["words"] is None
                else:
                    assert manifest["classes"][meta["label"]] == {"wnid": meta["wnid"], "words": meta["words"]}
            ids = [json.loads(s["json"])["id"] for s in samples]
            if split == "train":
                assert ids != sorted(ids)  # shuffled
            else:
                assert ids == sorted(ids)  # canonical order
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            assert hashlib.sha256((directory / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    return read


def classes_per_shard(directory: Path, split: str = "train") -> list[int]:
    return [
        len({int(s["cls"]) for s in wds.WebDataset(path, shardshuffle=False, nodesplitter=None, workersplitter=None)})
        for path in shard_paths(directory, split)
    ]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.tar")}


# ------------------------------------------------------------------------------------------------ synthetic data


def test_synth_shards_equal_the_source(synth_shards, synth_zip):
    check_shards_equal_source(synth_shards, synth_zip)
    manifest = load_manifest(synth_shards)
    assert manifest["format"] == "deep-ranking-shards/1" and manifest["shard_size"] == 50
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [50, 50, 50, 50, 40]
    assert sorted(p.name for p in synth_shards.iterdir() if not p.name.startswith(".")) == sorted(
        [f"train-{i:06d}.tar" for i in range(5)]
        + ["val-000000.tar", "val-000001.tar", "test-000000.tar", "manifest.json"]
    )


def test_train_shards_mix_classes(synth_shards):
    assert all(n >= 5 for n in classes_per_shard(synth_shards))  # 6 classes; class-sorted shards would give 1-2


@pytest.mark.system  # a pool of packing processes
def test_ids_and_bytes_do_not_depend_on_shard_size_or_workers(synth_zip, synth_shards, tmp_path):
    def content(directory):
        return {
            split: sorted(
                (s["__key__"], s["cls"], s["json"], hashlib.sha256(s["jpg"]).hexdigest())
                for s in read_split(directory, split)
            )
            for split in SPLITS
        }

    other = tmp_path / "other"
    write_shards(synth_zip, other, shard_size=17, workers=2, seed=0)
    assert content(other) == content(synth_shards)
    assert len(load_manifest(other)["splits"]["train"]["shards"]) == 15
    again = tmp_path / "again"  # same arguments, other worker count: byte-identical shards
    write_shards(synth_zip, again, shard_size=50, workers=2, seed=0)
    assert load_manifest(again)["splits"] == load_manifest(synth_shards)["splits"]
    reseeded = write_shards(synth_zip, tmp_path / "seed1", shard_size=50, workers=1, seed=1)
    assert reseeded["splits"]["train"] != load_manifest(synth_shards)["splits"]["train"]
    assert reseeded["splits"]["val"] == load_manifest(synth_shards)["splits"]["val"]


def test_rerun_skips_finished_shards_and_rewrites_damaged_ones(synth_zip, tmp_path):
    out = tmp_path / "shards"
    first = write_shards(synth_zip, out, shard_size=50)
    before = snapshot(out)
    assert write_shards(synth_zip, out, shard_size=50) == first
    assert snapshot(out) == before  # nothing rewritten

    # A crash before the manifest existed: one shard damaged, one never renamed, a temporary left behind.
    (out / "manifest.json").unlink()
    (out / "train-000001.tar").write_bytes(b"torn")
    (out / "train-000003.tar").unlink()
    (out / ".val-000000.tar.tmp-999").write_bytes(b"partial")
    assert write_shards(synth_zip, out, shard_size=50) == first
    after = snapshot(out)
    rewritten = {name for name in before if after[name] != before[name]}
    assert rewritten == {"train-000001.tar", "train-000003.tar"}
    assert not list(out.glob(".*.tmp-*"))
    verify_shards(out)

    # A new shard size replaces the plan: no stale shard of the old one is left.
    write_shards(synth_zip, out, shard_size=120)
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    check_shards_equal_source(out, synth_zip)


def test_verify_detects_a_tampered_shard(synth_zip, tmp_path, capsys):
    out = tmp_path / "shards"
    write_shards(synth_zip, out, shard_size=100)
    assert main(["--verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RankingError, match=r"1 shard\(s\) fail verification: train-000001.tar sha256 mismatch"):
        verify_shards(out)
    (out / "val-000000.tar").unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", "--verify", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train-000001.tar sha256 mismatch" in error[0] and "val-000000.tar missing" in error[0]


def test_load_manifest_names_the_problem(tmp_path):
    with pytest.raises(RankingError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(RankingError, match="not a deep-ranking-shards/1 manifest"):
        load_manifest(tmp_path)


def test_cli_writes_shards(synth_zip, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [str(synth_zip), "--out", str(out), "--shard-size", "100", "--workers", "1", "--seed", "4", "--no-progress"]
        )
        == 0
    )
    assert "train 240 samples in 3 shard(s)" in capsys.readouterr().out
    assert load_manifest(out)["seed"] == 4
    check_shards_equal_source(out, synth_zip)


def test_cli_default_out_is_under_shards(synth_zip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(synth_zip), "--shard-size", "500", "--workers", "1", "--no-progress"]) == 0
    assert load_manifest(tmp_path / "shards" / "synth")["splits"]["train"]["count"] == 240


# ------------------------------------------------------------------------------------------------ the real mini zip


def val_annotations(zip_path: Path) -> dict[str, str]:
    with zipfile.ZipFile(zip_path) as z:
        text = z.read("tiny-imagenet-200/val/val_annotations.txt").decode()
    return {line.split("\t")[0]: line.split("\t")[1] for line in text.splitlines() if line.strip()}


def test_real_mini_zip(mini_zip, tmp_path):
    out = tmp_path / "mini"
    manifest = write_shards(mini_zip, out, shard_size=50, workers=1)
    read = check_shards_equal_source(out, mini_zip)
    assert [manifest["splits"][s]["count"] for s in SPLITS] == [200, 50, 20]
    assert all(n >= 8 for n in classes_per_shard(out))  # 10 classes
    annotations = val_annotations(mini_zip)
    labels = {
        json.loads(s["json"])["file"].split("/")[-1]: manifest["classes"][int(s["cls"])]["wnid"] for s in read["val"]
    }
    assert labels == annotations
    for sample in read["train"]:  # train labels follow the folder
        meta = json.loads(sample["json"])
        assert meta["file"].split("/")[1] == meta["wnid"] == manifest["classes"][int(sample["cls"])]["wnid"]


def test_extracted_folder_gives_the_same_shards(mini_zip, tmp_path):
    with zipfile.ZipFile(mini_zip) as z:
        z.extractall(tmp_path / "extracted")
    from_zip = write_shards(mini_zip, tmp_path / "a", shard_size=64)
    for source in (tmp_path / "extracted", tmp_path / "extracted" / "tiny-imagenet-200"):
        from_folder = write_shards(source, tmp_path / "b", shard_size=64)
        assert from_folder["splits"] == from_zip["splits"] and from_folder["classes"] == from_zip["classes"]
    check_shards_equal_source(tmp_path / "b", tmp_path / "extracted")


# ------------------------------------------------------------------------------------------------ bad input


def rewrite_zip(source: Path, target: Path, edit) -> Path:
    """Copy the zip member by member; `edit(name, data)` returns new bytes or None to drop the member."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            data = edit(name, src.read(name))
            if data is not None:
                dst.writestr(name, data)
    return target


def drop(member: str):
    return lambda name, data: None if name == member else data


def replace(member: str, new):
    return lambda name, data: new(data) if name == member else data


def corrupt_stored_member(source: Path, target: Path, member: str) -> Path:
    """Flip bytes inside a member's data so that its CRC no longer matches."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as z:
        info = z.getinfo(member)
    header = info.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_length + extra_length + info.compress_size // 2
    data[start : start + 8] = bytes(b ^ 0xFF for b in data[start : start + 8])
    target.write_bytes(bytes(data))
    return target


ROOT = "tiny-imagenet-200/"
TRAIN_JPEG = ROOT + "train/n90000003/images/n90000003_7.JPEG"
BAD_INPUTS = {
    "missing path": (lambda src, tmp: tmp / "nowhere.zip", r"nowhere.zip: no such file or folder"),
    "no wnids.txt": (
        lambda src, tmp: rewrite_zip(src, tmp / "bad.zip", drop(ROOT + "wnids.txt")),
        r"bad.zip: no tiny-imagenet-200/wnids.txt: not the official Tiny ImageNet layout",
    ),
    "no words.txt": (
        lambda src, tmp: rewrite_zip(src, tmp / "bad.zip", drop(ROOT + "words.txt")),
        r"bad.zip:tiny-imagenet-200/words.txt: missing",
    ),
    "truncated zip": (
        lambda src, tmp: (tmp / "bad.zip").write_bytes(src.read_bytes()[:200_000]) and tmp / "bad.zip",
        r"bad.zip: not a readable zip archive, truncated or corrupt\?",
    ),
    "corrupt member": (
        lambda src, tmp: corrupt_stored_member(src, tmp / "bad.zip", TRAIN_JPEG),
        r"bad.zip:tiny-imagenet-200/train/n90000003/images/n90000003_7.JPEG: corrupt zip member "
        r"\(Bad CRC-32",
    ),
    "val image without annotation": (
        lambda src, tmp: rewrite_zip(
            src, tmp / "bad.zip", replace(ROOT + "val/val_annotations.txt", lambda d: b"\n".join(d.splitlines()[1:]))
        ),
        r"bad.zip:tiny-imagenet-200/val/images/val_0.JPEG: val image without annotation in val/val_annotations.txt",
    ),
    "annotation without image": (
        lambda src, tmp: rewrite_zip(src, tmp / "bad.zip", drop(ROOT + "val/images/val_5.JPEG")),
        r"val_annotations.txt: line 6: annotation for val_5.JPEG, but there is no such image",
    ),
    "unknown wnid": (
        lambda src, tmp: rewrite_zip(
            src,
            tmp / "bad.zip",
            replace(
                ROOT + "val/val_annotations.txt", lambda d: d.replace(b"val_2.JPEG\tn9000000", b"val_2.JPEG\tn7777777")
            ),
        ),
        r"val_annotations.txt: line 3: val_2.JPEG is annotated with n7777777\d, which is not in wnids.txt",
    ),
    "JPEG that does not decode": (
        lambda src, tmp: rewrite_zip(src, tmp / "bad.zip", replace(TRAIN_JPEG, lambda d: d[:300])),
        r"bad.zip:tiny-imagenet-200/train/n90000003/images/n90000003_7.JPEG: cannot decode \(\w",
    ),
    "not a JPEG": (
        lambda src, tmp: rewrite_zip(src, tmp / "bad.zip", replace(TRAIN_JPEG, lambda d: b"GIF89a" + d)),
        r"n90000003_7.JPEG: cannot decode \(not an image file\)$",
    ),
}


MET_WHILE_PACKING = {"corrupt member", "JPEG that does not decode", "not a JPEG"}  # in the pool's processes


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=pytest.mark.system) if case in MET_WHILE_PACKING else case for case in BAD_INPUTS]
)
def test_bad_input_is_one_line_naming_the_file_and_leaves_no_result(case, synth_zip, tmp_path):
    make_source, message = BAD_INPUTS[case]
    source = make_source(synth_zip, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RankingError, match=message) as error:
        write_shards(source, out, shard_size=10, workers=2)  # several shards finish before the bad one is met
    assert "\n" not in str(error.value)
    assert not out.exists()  # created by the failed run, so removed with everything in it


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ranking shards: error: {tmp_path / 'missing.zip'}: no such file or folder "
        "(expected tiny-imagenet-200.zip or its extracted folder)"
    ]
    assert not (tmp_path / "out").exists()


def test_stray_files_are_ignored(synth_zip, tmp_path):
    """__MACOSX resource forks and dot files next to the images do not become samples."""
    source = rewrite_zip(synth_zip, tmp_path / "strays.zip", lambda name, data: data)
    with zipfile.ZipFile(source, "a") as z:
        z.writestr("__MACOSX/tiny-imagenet-200/train/._n90000000", b"junk")
        z.writestr(ROOT + "val/images/._val_0.JPEG", b"junk")
        z.writestr(ROOT + "train/n90000000/images/.DS_Store", b"junk")
    with Archive(source) as archive, Archive(synth_zip) as clean:
        for split in SPLITS:
            assert archive.samples(split) == clean.samples(split)


def test_a_second_writer_of_a_shard_folder_fails_at_once(synth_zip, synth_shards, tmp_path):
    """Two `ranking shards` into one --out would interleave shards and journal: the second fails, changing nothing."""
    from ranking.core.files import LOCK, folder_lock

    out = tmp_path / "out"
    shutil.copytree(synth_shards, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK}
    with folder_lock(out, "ranking shards"):  # the first writer, as write_shards holds it
        with pytest.raises(RankingError, match=rf"{out}: in use by ranking shards \(pid {os.getpid()} on "):
            write_shards(synth_zip, out, shard_size=50, workers=1, seed=0)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK} == before
    write_shards(synth_zip, out, shard_size=50, workers=1, seed=0)  # free again: a re-run of the same source
