"""Search your own images: class folders and a flat folder (the mini zip's JPEGs plus a PNG with transparency, a CMYK
JPEG and a grayscale JPEG) go through shards -> train (smoke config) -> index -> search; the index folder is
self-contained, `--add` equals indexing everything at once, the Python API is what the CLI uses, and bad input is
one line that changes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ranking
from harness import cli_refusal, launch, mini_jpegs, odd_images, train_flags, write_smoke_run
from ranking import index, search, train
from ranking.core.errors import RankingError
from ranking.retrieval import indexfolder
from ranking.retrieval.indexfolder import Index
from ranking.shards import write_shards

ODD = ("odd.png", "cmyk.jpg", "gray.jpeg")


@pytest.fixture(scope="module", autouse=True)
def full_precision():
    """These tests compare embeddings exactly (a photo finds itself at distance ~0, as `ranking search` embeds queries
    in fp32; one process equals two ranks), so the index runs in fp32 wherever the device would pick bf16, set the
    Accelerate way; test_precision.py checks that the index follows the precision rule."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        yield


@pytest.fixture(scope="module")
def data(mini_zip, tmp_path_factory) -> dict:
    """A class-folder tree (10 classes x 4 photos, the odd images in the first class), a flat folder (3 classes' photos
    and the odd images), their shards, and a smoke run trained for a few steps on the tree's shards."""
    root = tmp_path_factory.mktemp("index")
    tree, flat = root / "tree", root / "flat"
    for n, (wnid, files) in enumerate(sorted(mini_jpegs(mini_zip).items())):
        extra = odd_images(files[0][1]) if n == 0 else {}
        for name, data in [*files[:4], *extra.items()]:
            (tree / wnid).mkdir(parents=True, exist_ok=True)
            (tree / wnid / name).write_bytes(data)
            if n < 3:
                flat.mkdir(exist_ok=True)
                (flat / f"{wnid}_{name}").write_bytes(data)
    write_shards(tree, root / "shards-tree", shard_size=16, seed=0)
    write_shards(flat, root / "shards-flat", shard_size=8, seed=0)
    run = root / "run"
    flags = train_flags(
        root / "shards-tree",
        run,
        steps=3,
        **{"classes-per-batch": 4, "samples-per-class": 2, "checkpoint-every": 3, "warmup-steps": 1},
    )
    assert train.main(flags + ["--no-wandb"]) == 0
    indexes = root / "indexes"
    assert (
        index.main(["--checkpoint", str(run), "--images", str(root / "shards-tree"), "--out", str(indexes / "tree")])
        == 0
    )
    assert (
        index.main(["--checkpoint", str(run), "--images", str(root / "shards-flat"), "--out", str(indexes / "flat")])
        == 0
    )
    return {"root": root, "tree": tree, "flat": flat, "run": run, "indexes": indexes}


def run_search(capsys, *argv: str) -> str:
    capsys.readouterr()  # drop what came before
    assert search.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def search_json(capsys, *argv: str) -> list[dict]:
    return json.loads(run_search(capsys, *argv, "--json"))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


def test_tree_index_finds_each_photo_first_with_its_class(data, capsys):
    first = sorted(data["tree"].iterdir())[0]
    queries = [first / name for name in (*ODD, sorted(p.name for p in first.glob("*.JPEG"))[1])]
    found = search_json(capsys, *queries, "--index", data["indexes"] / "tree", "--top", "3")
    meta = json.loads((data["indexes"] / "tree" / "index.json").read_text())
    assert meta["count"] == 10 * 4 + 3 and meta["classes"] == sorted(p.name for p in data["tree"].iterdir())
    made_from = f"{first.name}/{sorted(p.name for p in first.glob('*.JPEG'))[0]}"  # the odd images' photo
    for query, result in zip(queries, found):
        assert result["query"] == str(query)
        top = result["results"][0]
        # a converted odd image and the photo it was made from are near-duplicates (distances ~1e-3 apart), and which
        # comes first depends on JPEG decoders' rounding: either may, the image itself is in the first two
        own = f"{first.name}/{query.name}"
        assert top["file"] == own or (query.suffix != ".JPEG" and top["file"] == made_from)
        assert own in [r["file"] for r in result["results"][:2]]
        assert top["class"] == first.name and top["label"] == 0
        assert top["rank"] == 1 and set(top) == {"rank", "distance", "id", "label", "class", "words", "file"}
        distances = [r["distance"] for r in result["results"]]
        assert distances == sorted(distances)
        # an RGB JPEG is stored unchanged: the same pixels, the same embedding; the others were converted once
        assert top["distance"] < (1e-5 if query.suffix == ".JPEG" else 0.05)


def test_flat_folder_index_has_no_labels_and_the_table_names_files(data, capsys):
    query = next(data["flat"].glob("*_cmyk.jpg"))
    out = run_search(capsys, query, "--index", data["indexes"] / "flat", "--top", "2").splitlines()
    assert out[0] == str(query) and out[1].split() == ["rank", "distance", "file", "wnid", "words"]
    rank, distance, file, wnid, words = out[2].split()
    made_from = query.name.replace("cmyk.jpg", sorted(p.name for p in data["tree"].glob(f"{query.name[:9]}/*.JPEG"))[0])
    # the CMYK image or the photo it was made from, near-duplicates (see the tree test); the query in the first two
    assert (rank, wnid, words) == ("1", "-", "-") and file in (query.name, made_from) and float(distance) < 0.05
    assert query.name in (file, out[3].split()[2])
    found = search_json(capsys, query, "--index", data["indexes"] / "flat", "--top", "30")
    assert len(found[0]["results"]) == 3 * 4 + 3  # k clipped to the gallery
    assert {r["label"] for r in found[0]["results"]} == {-1}


def test_a_folder_of_images_indexes_like_its_shards(data, tmp_path, capsys):
    """The flat folder embedded straight from disk (no shards) gives the same rows as its shards."""
    out = tmp_path / "direct"
    assert index.main(["--checkpoint", str(data["run"]), "--images", str(data["flat"]), "--out", str(out)]) == 0
    direct, via_shards = Index.load(out), Index.load(data["indexes"] / "flat")
    assert [i.file for i in direct.items] == [i.file for i in via_shards.items]
    same_bytes = [n for n, item in enumerate(direct.items) if item.file.endswith(".JPEG")]
    assert torch.allclose(direct.embeddings[same_bytes], via_shards.embeddings[same_bytes], atol=1e-5)
    assert (direct.embeddings - via_shards.embeddings).norm(dim=1).max() < 0.2  # converted ones: close


def everything(data: dict, out: Path) -> list[str]:
    """`ranking index` flags for both image sources of the fixture (the flat shards and the photo tree) into out."""
    return [
        "--checkpoint",
        str(data["run"]),
        "--images",
        str(data["root"] / "shards-flat"),
        str(data["tree"]),
        "--out",
        str(out),
    ]


def test_add_equals_indexing_everything_at_once(data, tmp_path, capsys):
    both = tmp_path / "both"
    assert index.main(everything(data, both)) == 0
    grown = tmp_path / "grown"
    shutil.copytree(data["indexes"] / "flat", grown)
    before = Index.load(grown).embeddings.clone()
    shards = data["root"] / "shards-flat"
    shards.rename(shards.with_name("moved-away"))  # what is there is not read again
    try:
        assert index.main(["--add", str(data["tree"]), "--index", str(grown)]) == 0
    finally:
        shards.with_name("moved-away").rename(shards)
    a, b = Index.load(grown), Index.load(both)
    assert torch.equal(a.embeddings[: len(before)], before)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert (grown / "items.jsonl").read_text() == (both / "items.jsonl").read_text()
    assert (grown / "thumbs.tar").read_bytes() == (both / "thumbs.tar").read_bytes()
    meta_a, meta_b = (json.loads((f / "index.json").read_text()) for f in (grown, both))
    assert meta_a == meta_b and meta_a["count"] == 15 + 43 and len(meta_a["sources"]) == 2
    queries = sorted(data["tree"].glob("*/*.JPEG"))[::7]
    assert search_json(capsys, *queries, "--index", grown, "--top", "5") == search_json(
        capsys, *queries, "--index", both, "--top", "5"
    )


def test_moved_index_works_with_the_run_deleted(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(data["run"], run, symlinks=True)
    built = tmp_path / "a" / "index"
    assert (
        index.main(["--checkpoint", str(run), "--images", str(data["root"] / "shards-tree"), "--out", str(built)]) == 0
    )
    queries = sorted(data["tree"].glob("*/*.JPEG"))[:3]
    expected = search_json(capsys, *queries, "--index", built, "--top", "4")
    from_run = ranking.load(run).embed(queries)
    shutil.rmtree(run)
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    built.rename(moved)
    assert search_json(capsys, *queries, "--index", moved, "--top", "4", "--device", "cpu") == expected
    assert torch.equal(ranking.load(moved).embed(queries), from_run)
    grid = tmp_path / "grid.png"
    run_search(capsys, *queries, "--index", moved, "--top", "4", "--grid", grid)
    with Image.open(grid) as image:
        from ranking.reporting import grids

        assert image.size == grids.grid_size(rows=3, columns=5)


def test_the_model_identity_is_stored_the_same_way_in_the_run_the_index_and_an_export(data, tmp_path):
    import yaml
    from safetensors import safe_open

    from ranking import export
    from ranking.learning.models import ModelSpec

    in_config = yaml.safe_load((data["run"] / "config.yaml").read_text())
    in_index = json.loads((data["indexes"] / "tree" / "model.json").read_text())
    exported = tmp_path / "model.safetensors"
    assert export.main([str(data["indexes"] / "tree"), "--format", "safetensors", "--out", str(exported)]) == 0
    with safe_open(str(exported), "pt") as f:
        in_export = json.loads(f.metadata()["model.json"])
    spec = ModelSpec.of_run(data["run"])
    assert in_config["schema"] == 2 and in_index["format"] == in_export["format"] == "deep-ranking-model/2"
    assert in_config["model"] == in_index["model"] == in_export["model"] == spec.to_dict()
    assert (spec.backbone, spec.embed_dim, spec.image_size) == ("resnet18", 32, 32)


def test_an_index_written_before_the_model_identity_searches_as_it_did(data, tmp_path, capsys):
    """model.json's format 1 held the run's whole TrainConfig and the preprocessing: mapped, not refused."""
    import yaml

    old = tmp_path / "old"
    shutil.copytree(data["indexes"] / "tree", old)
    current = json.loads((old / "model.json").read_text())
    train_config = yaml.safe_load((data["run"] / "config.yaml").read_text())
    del train_config["schema"], train_config["model"], train_config["stored_size"]
    spec = current["model"]
    legacy = {
        "format": "deep-ranking-model/1",
        "config": {**train_config, "pretrained": False, "gone": 1},
        "embed_dim": spec["embed_dim"],
        "normalize": spec["normalize"],
        "flip": False,
        "preprocessing": {key: spec[key] for key in ("image_size", "mean", "std", "resize")}
        | {"layout": "NCHW float32 RGB", "range": "[0, 1] before normalisation"},
        "source": current["source"],
    }
    (old / "model.json").write_text(json.dumps(legacy, indent=2))
    queries = sorted(data["tree"].glob("*/*.JPEG"))[:3]
    expected = search_json(capsys, *queries, "--index", data["indexes"] / "tree", "--top", "4")
    assert search_json(capsys, *queries, "--index", old, "--top", "4") == expected
    assert ranking.load(old).spec.to_dict() == spec
    (old / "model.json").write_text(json.dumps({**legacy, "config": {**legacy["config"], "embed_dim": None}}))
    err = cli_refusal(capsys, *["search", str(queries[0]), "--index", str(old)])
    assert f"{old / 'model.json'}: config: embed_dim must be an integer, got None" in err


# ---------------------------------------------------------------------------------------------------------------
# the Python API


def test_python_api_is_what_the_cli_uses(data, capsys):
    path = sorted(data["tree"].glob("*/*.JPEG"))[5]
    model = ranking.load(data["run"])
    with Image.open(path) as image:
        pil = image.convert("RGB")
    pixels = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)  # uint8 [3, H, W]
    vectors = model.embed([path, pil, pixels, str(path)])
    assert vectors.shape == (4, 32) and vectors.dtype == torch.float32
    assert all(torch.equal(vectors[0], v) for v in vectors[1:])
    assert torch.allclose(model.embed(pixels[None].repeat(2, 1, 1, 1)), vectors[:2], atol=1e-6)  # uint8 [N,3,H,W]
    gallery = ranking.Index.load(data["indexes"] / "tree")
    results = gallery.search([path], k=3)
    cli_results = search_json(capsys, path, "--index", data["indexes"] / "tree", "--top", "3")[0]["results"]
    assert [r.to_dict() for r in results[0]] == cli_results
    with pytest.raises(RankingError, match="a tensor must be uint8"):
        model.embed(pixels.float())


def test_import_ranking_stays_light():
    code = "import sys, ranking; print('torch' in sys.modules, callable(ranking.load), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "True"]


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing changed


def test_empty_folder_is_one_line(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    out = tmp_path / "out"
    err = cli_refusal(capsys, *["index", "--checkpoint", str(data["run"]), "--images", str(empty), "--out", str(out)])
    assert f"{empty}: no images" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [empty]


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_unreadable_image_is_one_line_and_leaves_the_index_as_it_was(damage, data, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(data["flat"], photos)
    bad = photos / "bad.png"
    png = next(photos.glob("*odd.png")).read_bytes()
    bad.write_bytes(b"this is not an image" if damage == "not an image" else png[:300])
    grown = tmp_path / "grown"
    shutil.copytree(data["indexes"] / "flat", grown)
    before = folder_bytes(grown)
    err = cli_refusal(capsys, *["index", "--add", str(photos), "--index", str(grown)])
    assert str(bad) in err
    assert folder_bytes(grown) == before and sorted(p.name for p in tmp_path.iterdir()) == ["grown", "photos"]
    out = tmp_path / "new"
    cli_refusal(capsys, *["index", "--checkpoint", str(data["run"]), "--images", str(photos), "--out", str(out)])
    assert not out.exists()


def test_mixed_embedding_dims_on_add_are_one_line(data, tmp_path, capsys):
    other_run = write_smoke_run(tmp_path / "other-run", str(data["root"] / "shards-tree"), embed_dim=8, image_size=32)
    other = tmp_path / "other"
    assert index.main(["--checkpoint", str(other_run), "--images", str(data["flat"]), "--out", str(other)]) == 0
    grown = tmp_path / "grown"
    shutil.copytree(data["indexes"] / "flat", grown)
    before = folder_bytes(grown)
    err = cli_refusal(capsys, *["index", "--add", str(other), "--index", str(grown)])
    assert f"{other}: makes 8-d embeddings, but the index {grown} holds 32-d ones" in err
    err = cli_refusal(
        capsys, *["index", "--add", str(data["flat"]), "--index", str(grown), "--checkpoint", str(other_run)]
    )
    assert "mixed embedding dimensions" in err
    same_dim = write_smoke_run(tmp_path / "same-dim", str(data["root"] / "shards-tree"), embed_dim=32, image_size=32)
    err = cli_refusal(
        capsys, *["index", "--add", str(data["flat"]), "--index", str(grown), "--checkpoint", str(same_dim)]
    )
    assert "a different model" in err
    assert folder_bytes(grown) == before


def test_damaged_index_and_wrong_flags_are_one_line(data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data["indexes"] / "flat", broken)
    meta = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**meta, "count": meta["count"] + 1}))
    query = sorted(data["flat"].iterdir())[0]
    err = cli_refusal(capsys, *["search", str(query), "--index", str(broken)])
    assert "embeddings.safetensors: expected float32 embeddings [16, 32]" in err
    err = cli_refusal(
        capsys,
        *[
            "index",
            "--checkpoint",
            str(data["run"]),
            "--images",
            str(data["flat"]),
            "--out",
            str(data["indexes"] / "flat"),
        ],
    )
    assert "exists; choose a new folder, or append with --add" in err
    err = cli_refusal(capsys, *["index", "--add", str(data["flat"])])
    assert "--add needs --index INDEX" in err
    if not torch.cuda.is_available():
        err = cli_refusal(
            capsys, *["search", str(query), "--index", str(data["indexes"] / "flat"), "--device", "cuda:0"]
        )
        assert "no CUDA device here" in err
    assert indexfolder.is_index(data["indexes"] / "flat")


def test_two_ranks_write_the_index_one_process_writes(data, tmp_path):
    """`accelerate launch -m ranking.index` on 2 gloo ranks: each embeds its share, rank 0 writes the same index."""
    out = tmp_path / "ddp"
    result = launch(everything(data, out), module="ranking.index")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    one = tmp_path / "one"
    assert index.main(everything(data, one)) == 0
    assert (out / "items.jsonl").read_text() == (one / "items.jsonl").read_text()
    assert torch.allclose(Index.load(out).embeddings, Index.load(one).embeddings, atol=1e-6)
