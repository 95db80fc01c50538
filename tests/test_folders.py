"""Other datasets in: class folders (ImageFolder) and a folder of unlabelled images become shards like Tiny ImageNet's.

The trees are built from the real mini zip's JPEGs plus a PNG with transparency, a CMYK JPEG and a grayscale JPEG.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageChops, ImageStat

from harness import PER_CLASS, mini_jpegs, odd_images
from ranking import cli
from ranking.core.errors import RankingError
from ranking.data.stream import eval_samples, train_samples
from ranking.folders.shardformat import load_manifest, shard_paths
from ranking.shards import JPEG_QUALITY, main, verify_shards, write_shards

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tree(mini_zip, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """ROOT/<wnid>/*: the real JPEGs, plus the odd images in the first class. Returns (ROOT, relative path ->
    bytes as written)."""
    root = tmp_path_factory.mktemp("folders") / "photos"
    written = {}
    for index, (wnid, files) in enumerate(sorted(mini_jpegs(mini_zip).items())):
        extra = odd_images(files[0][1]) if index == 0 else {}
        for name, data in [*files, *extra.items()]:
            path = root / wnid / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written[f"{wnid}/{name}"] = data
    (root / ".DS_Store").write_bytes(b"junk")
    (root / sorted(written)[0].split("/")[0] / "notes.txt").write_text("not an image")
    return root, written


def read_split(directory: Path, split: str) -> list[dict]:
    return list(
        wds.WebDataset(
            shard_paths(directory, split), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
    )


def is_rgb_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "JPEG" and image.mode == "RGB"


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel value (0-255) of two RGB images of the same size."""
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


@pytest.mark.system  # a pool of packing processes, each reopening the folder
def test_class_folders_become_labelled_shards(tree, tmp_path):
    root, written = tree
    out = tmp_path / "shards"
    manifest = write_shards(root, out, shard_size=16, workers=2, seed=3, val_fraction=0.25)
    wnids = sorted({f.split("/")[0] for f in written})
    assert manifest["layout"] == "imagefolder" and manifest["source"] == "photos"
    assert manifest["classes"] == [{"wnid": w, "words": w} for w in wnids]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == len(written) == 63
    assert manifest["splits"]["val"]["count"] == 9 * round(0.25 * PER_CLASS) + round(0.25 * (PER_CLASS + 3))
    assert manifest["splits"]["test"] == {"count": 0, "shards": [], "converted": 0}
    originals_not_rgb = {f for f, data in written.items() if not is_rgb_jpeg(data)}
    assert {"odd.png", "cmyk.jpg", "gray.jpeg"} <= {f.split("/")[1] for f in originals_not_rgb}
    assert sum(manifest["splits"][s]["converted"] for s in SPLITS) == len(originals_not_rgb)
    verify_shards(out)

    seen = set()
    for split in ("train", "val"):
        for sample in read_split(out, split):
            meta = json.loads(sample["json"])
            seen.add(meta["file"])
            assert meta["wnid"] == meta["file"].split("/")[0] == manifest["classes"][int(sample["cls"])]["wnid"]
            assert is_rgb_jpeg(sample["jpg"])  # every stored image decodes as an RGB JPEG
            if meta["file"] in originals_not_rgb:
                assert meta["converted"] is True and sample["jpg"] != written[meta["file"]]
            else:
                assert "converted" not in meta and sample["jpg"] == written[meta["file"]]  # original bytes
        ids = sorted(json.loads(s["json"])["id"] for s in read_split(out, split))
        assert ids == list(range(manifest["splits"][split]["count"]))
    assert seen == set(written)

    stored = {json.loads(s["json"])["file"]: s["jpg"] for s in read_split(out, "train") + read_split(out, "val")}
    original = Image.open(io.BytesIO(written[f"{wnids[0]}/odd.png"]))  # RGBA, half transparent
    over_white = Image.alpha_composite(Image.new("RGBA", original.size, "white"), original).convert("RGB")
    png = Image.open(io.BytesIO(stored[f"{wnids[0]}/odd.png"]))
    assert png.size == original.size
    assert mean_difference(png, over_white) < 4 < mean_difference(png, original.convert("RGB"))
    for name in ("cmyk.jpg", "gray.jpeg"):
        source = Image.open(io.BytesIO(written[f"{wnids[0]}/{name}"])).convert("RGB")
        assert mean_difference(Image.open(io.BytesIO(stored[f"{wnids[0]}/{name}"])), source) < 4
    assert JPEG_QUALITY == 95


def test_val_split_is_reproducible_by_seed(tree, tmp_path):
    root, _ = tree

    def val_files(seed: int, name: str) -> set[str]:
        write_shards(root, tmp_path / name, shard_size=100, seed=seed, val_fraction=0.3)
        return {json.loads(s["json"])["file"] for s in read_split(tmp_path / name, "val")}

    first = val_files(1, "a")
    assert val_files(1, "b") == first
    assert val_files(2, "c") != first
    per_class = {}
    for file in first:
        per_class[file.split("/")[0]] = per_class.get(file.split("/")[0], 0) + 1
    assert len(per_class) == 10  # stratified: every class has val images


def test_separate_val_folder(tree, mini_zip, tmp_path):
    root, written = tree
    val_root = tmp_path / "val"
    with zipfile.ZipFile(mini_zip) as z:
        wnids = sorted({f.split("/")[0] for f in written})
        for wnid in wnids[:3]:  # val need not hold every class
            name = f"tiny-imagenet-200/train/{wnid}/images/{wnid}_19.JPEG"
            (val_root / wnid).mkdir(parents=True)
            (val_root / wnid / "v.JPEG").write_bytes(z.read(name))
    out = tmp_path / "shards"
    assert (
        main(
            [
                str(root),
                "--out",
                str(out),
                "--val-source",
                str(val_root),
                "--shard-size",
                "40",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = load_manifest(out)
    assert [manifest["splits"][s]["count"] for s in SPLITS] == [63, 3, 0]
    val = [json.loads(s["json"]) for s in read_split(out, "val")]
    assert [(m["file"], m["wnid"]) for m in val] == [(f"val/{w}/v.JPEG", w) for w in wnids[:3]]
    assert {json.loads(s["json"])["file"].split("/")[0] for s in read_split(out, "train")} == {"train"}

    (val_root / "n00000000").mkdir()
    (val_root / "n00000000" / "x.jpg").write_bytes(written[sorted(written)[-1]])
    with pytest.raises(RankingError) as error:
        write_shards(root, tmp_path / "other", val_source=val_root)
    assert str(error.value) == f"{val_root / 'n00000000'}: class 'n00000000' has no folder in {root}"


def test_flat_folder_is_a_gallery_in_the_test_split(tree, tmp_path):
    _, written = tree
    flat = tmp_path / "gallery"
    flat.mkdir()
    for name, data in written.items():
        (flat / name.replace("/", "_")).write_bytes(data)
    out = tmp_path / "shards"
    manifest = write_shards(flat, out, shard_size=25)
    assert manifest["layout"] == "flat" and manifest["classes"] == []
    assert [manifest["splits"][s]["count"] for s in SPLITS] == [0, 0, len(written)]
    samples = read_split(out, "test")
    assert {int(s["cls"]) for s in samples} == {-1}
    assert all(json.loads(s["json"])["wnid"] is None for s in samples)
    verify_shards(out)
    images = list(eval_samples(str(out), "test", rank=0, world_size=1))
    assert sorted(i for _, _, i in images) == list(range(len(written)))
    with pytest.raises(RankingError, match="no train shards"):
        next(iter(train_samples(str(out), 32, [0.5] * 3, [0.5] * 3, shuffle_buffer=10, seed=0)))
    with pytest.raises(RankingError, match="a folder of unlabelled images has no val split"):
        write_shards(flat, tmp_path / "x", val_fraction=0.2)


def test_stream_reads_class_folder_shards(tree, tmp_path):
    """Evaluation and training read them unchanged: decoded RGB tensors (uint8 at the stored size for evaluation),
    labels from the manifest's classes."""
    root, _ = tree
    out = tmp_path / "shards"
    manifest = write_shards(root, out, shard_size=20, val_fraction=0.2)
    val = list(eval_samples(str(out), "val", rank=0, world_size=1))
    assert len(val) == manifest["splits"]["val"]["count"]
    assert all(image.shape[0] == 3 and image.dtype == torch.uint8 and 0 <= label < 10 for image, label, _ in val)
    stream = iter(train_samples(str(out), 32, [0.5] * 3, [0.5] * 3, shuffle_buffer=10, seed=0))
    batch = [next(stream) for _ in range(70)]  # more than the split: resampled
    assert {label for _, label, _ in batch} <= set(range(10)) and batch[0][0].shape == (3, 32, 32)


def test_rerun_skips_finished_shards(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "shards"
    first = write_shards(root, out, shard_size=16, val_fraction=0.25)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "manifest.json").unlink()
    assert write_shards(root, out, shard_size=16, val_fraction=0.25) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_folder_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", str(empty), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith(f"ranking shards: error: {empty}: no images (expected ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["listing", pytest.param("packing", marks=pytest.mark.system)])  # packing: a pool
def test_unreadable_image_is_one_line_naming_the_file(where, tree, tmp_path):
    _, written = tree
    copy = tmp_path / "copy"
    for name, data in written.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    bad = copy / sorted(written)[5]
    if where == "listing":  # PIL cannot even identify it
        bad.write_bytes(b"this is not an image")
        message = f"{bad}: cannot decode (not an image file)"
    else:  # a truncated PNG: identified from its header, fails when decoded
        bad = bad.with_suffix(".png")
        bad.write_bytes(written[f"{sorted(written)[0].split('/')[0]}/odd.png"][:200])
        message = f"{bad}: cannot decode ("
    out = tmp_path / "out"
    with pytest.raises(RankingError) as error:
        write_shards(copy, out, shard_size=8, workers=2)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not out.exists()


def test_images_beside_class_folders_are_ambiguous(tree, tmp_path):
    _, written = tree
    mixed = tmp_path / "mixed"
    (mixed / "cat").mkdir(parents=True)
    (mixed / "cat" / "a.jpg").write_bytes(written[sorted(written)[0]])
    (mixed / "loose.jpg").write_bytes(written[sorted(written)[1]])
    with pytest.raises(RankingError) as error:
        write_shards(mixed, tmp_path / "out")
    assert str(error.value) == f"{mixed}: holds both images (loose.jpg) and class folders (cat/); expected one layout"


def test_tiny_imagenet_folder_missing_wnids_is_not_taken_for_class_folders(mini_zip, tmp_path):
    with zipfile.ZipFile(mini_zip) as z:
        z.extractall(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").unlink()
    with pytest.raises(RankingError, match="no tiny-imagenet-200/wnids.txt: not the official Tiny ImageNet layout"):
        write_shards(tmp_path / "tiny-imagenet-200", tmp_path / "out")
    with pytest.raises(RankingError, match="a val folder or val fraction only applies to class folders"):
        write_shards(mini_zip, tmp_path / "out", val_fraction=0.1)
