"""The index as untrusted, shared state (issue 22): one writer at a time (a lock: two `--add`s never lose rows),
the project's own files read with the image guards (a FIFO, a device, a huge file), its integrity checked (the
recorded weights, finite rows, sizes in model.json, thumbnail offsets, `--add` into itself), and what a killed run
leaves removed by the next."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli_refusal, mini_jpegs, write_smoke_run
from ranking import index, search
from ranking.core.files import lock_file, sibling_lock_path
from ranking.retrieval.indexfolder import Index

PER_CLASS = 3


@pytest.fixture(scope="module")
def data(mini_zip, tmp_path_factory) -> dict:
    """Two flat folders of photos (3 classes each), a smoke run (random weights, no training) and an index of the
    first folder."""
    root = tmp_path_factory.mktemp("guards")
    photos = sorted(mini_jpegs(mini_zip).items())
    folders = {}
    for name, chosen in (("photos", photos[:3]), ("more", photos[3:6])):
        folder = root / name
        folder.mkdir()
        for wnid, files in chosen:
            for file, jpeg in files[:PER_CLASS]:
                (folder / f"{wnid}_{file}").write_bytes(jpeg)
        folders[name] = folder
    run = write_smoke_run(root / "run", str(root), image_size=32, embed_dim=16)
    built = root / "index"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        assert index.main(["--checkpoint", str(run), "--images", str(folders["photos"]), "--out", str(built)]) == 0
    return {"root": root, "run": run, "index": built, **folders}


def copy_index(data: dict, tmp_path: Path, name: str = "copy") -> Path:
    copy = tmp_path / name
    shutil.copytree(data["index"], copy)
    return copy


def rows(index_dir: Path) -> int:
    return json.loads((index_dir / "index.json").read_text())["count"]


def query(data: dict) -> Path:
    return sorted(data["photos"].iterdir())[0]


# ---------------------------------------------------------------------------------------------------------------
# finding 1: one writer at a time


def test_a_second_writer_of_an_index_is_refused_at_once(data, tmp_path, capsys):
    grown = copy_index(data, tmp_path)
    with lock_file(sibling_lock_path(grown), grown, "ranking index"):  # a first `--add`, still running
        line = cli_refusal(capsys, "index", "--add", str(data["more"]), "--index", str(grown))
        assert f"{grown}: in use by ranking index (pid {os.getpid()}" in line
        out = tmp_path / "new"
        line = cli_refusal(
            capsys, "index", "--checkpoint", str(data["run"]), "--images", str(data["more"]), "--out", str(grown)
        )
        assert "exists; choose a new folder" in line
    assert rows(grown) == rows(data["index"])
    assert not out.exists()


def index_command(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    return subprocess.Popen(
        [sys.executable, "-m", "ranking", "index", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_adds_never_lose_rows_and_two_builds_never_both_pass(data, tmp_path):
    """Real processes started together: each `--add` either lands or fails with one line naming the other; the
    index holds exactly the rows of those that landed. Of two builds to one --out, exactly one passes."""
    grown = copy_index(data, tmp_path)
    adds = [index_command("--add", str(folder), "--index", str(grown)) for folder in (data["more"], data["more"])]
    outcomes = [(process.wait(timeout=240), *process.communicate()) for process in adds]
    landed = [code == 0 for code, _, _ in outcomes]
    for code, _, err in outcomes:
        assert code == 0 or (code == 2 and err.count("\n") == 1 and "in use by ranking index" in err), err
    assert any(landed)
    assert rows(grown) == rows(data["index"]) + sum(landed) * len(list(data["more"].iterdir()))
    assert len((grown / "items.jsonl").read_text().splitlines()) == rows(grown)

    out = tmp_path / "built"
    builds = [
        index_command("--checkpoint", str(data["run"]), "--images", str(folder), "--out", str(out))
        for folder in (data["photos"], data["more"])
    ]
    outcomes = [(process.wait(timeout=240), *process.communicate()) for process in builds]
    assert sorted(code for code, _, _ in outcomes) == [0, 2], outcomes
    refused = next(err for code, _, err in outcomes if code == 2)
    assert refused.count("\n") == 1 and ("in use by ranking index" in refused or "exists" in refused), refused
    assert Index.load(out).embeddings.shape[0] == PER_CLASS * 3


# ---------------------------------------------------------------------------------------------------------------
# finding 6: the index's own files read like untrusted images


@pytest.mark.parametrize(
    "name", ["items.jsonl", "model.json", "index.json", "embeddings.safetensors", "model.safetensors"]
)
def test_a_fifo_in_an_index_is_refused_by_name_not_waited_on(name, data, tmp_path, capsys):
    damaged = copy_index(data, tmp_path)
    (damaged / name).unlink()
    os.mkfifo(damaged / name)  # opening it for reading would wait for a writer forever
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(damaged), "--device", "cpu")
    assert line == f"ranking search: error: {damaged / name}: a FIFO, not a regular file", line


def test_a_device_or_a_huge_items_file_does_not_eat_memory(data, tmp_path, capsys):
    damaged = copy_index(data, tmp_path)
    (damaged / "items.jsonl").unlink()
    (damaged / "items.jsonl").symlink_to("/dev/zero")
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(damaged), "--device", "cpu")
    assert f"{damaged / 'items.jsonl'}: a character device, not a regular file" in line
    (damaged / "items.jsonl").unlink()
    with open(damaged / "items.jsonl", "wb") as f:  # sparse: 1 GiB that takes no disk
        f.truncate(2**30)
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(damaged), "--device", "cpu")
    assert f"{damaged / 'items.jsonl'}: {2**30} bytes, over the limit of" in line


def test_a_fifo_checkpoint_manifest_is_refused_by_name(data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(data["run"], run, symlinks=True)
    manifest = run / "checkpoints" / "step-0000005" / "checkpoint.json"
    manifest.unlink()
    os.mkfifo(manifest)
    line = cli_refusal(
        capsys, "index", "--checkpoint", str(run), "--images", str(data["more"]), "--out", str(tmp_path / "out")
    )
    assert f"{manifest}: a FIFO, not a regular file" in line


# ---------------------------------------------------------------------------------------------------------------
# finding 8: integrity


def test_another_models_weights_in_an_index_are_refused(data, tmp_path, capsys):
    other_run = write_smoke_run(tmp_path / "other-run", str(tmp_path), image_size=32, embed_dim=16)
    other = tmp_path / "other"
    assert index.main(["--checkpoint", str(other_run), "--images", str(data["more"]), "--out", str(other)]) == 0
    swapped = copy_index(data, tmp_path)
    shutil.copyfile(other / "model.safetensors", swapped / "model.safetensors")  # same shapes, other weights
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(swapped), "--device", "cpu")
    assert f"{swapped / 'model.safetensors'}: not the weights model.json records" in line


def test_nan_rows_are_one_line(data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    damaged = copy_index(data, tmp_path)
    embeddings = load_file(str(damaged / "embeddings.safetensors"))["embeddings"]
    embeddings[2] = float("nan")
    save_file({"embeddings": embeddings}, str(damaged / "embeddings.safetensors"))
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(damaged), "--device", "cpu")
    assert f"{damaged}: embedding row 2 (and 0 more) is not finite" in line


def test_add_of_an_index_into_itself_is_refused(data, tmp_path, capsys):
    grown = copy_index(data, tmp_path)
    line = cli_refusal(capsys, "index", "--add", str(grown), "--index", str(grown))
    assert "adding it to itself would repeat every row" in line
    assert rows(grown) == rows(data["index"])


@pytest.mark.parametrize("key,value", [("image_size", 10**6), ("embed_dim", 10**9)])
def test_huge_sizes_in_model_json_are_one_line(key, value, data, tmp_path, capsys):
    damaged = copy_index(data, tmp_path)
    described = json.loads((damaged / "model.json").read_text())
    described["model"][key] = value
    (damaged / "model.json").write_text(json.dumps(described))
    line = cli_refusal(capsys, "search", str(query(data)), "--index", str(damaged), "--device", "cpu")
    assert "embed_dim must be in [1, 65536] and image_size in [1, 4096]" in line


def test_a_huge_thumbnail_offset_is_one_line(data, tmp_path, capsys):
    damaged = copy_index(data, tmp_path)
    lines = (damaged / "items.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    for item in items:
        item["thumb"] = [2**60, 2**40]
    (damaged / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    line = cli_refusal(
        capsys,
        "search",
        str(query(data)),
        "--index",
        str(damaged),
        "--device",
        "cpu",
        "--grid",
        str(tmp_path / "grid.png"),
    )
    assert "thumbnail at [1152921504606846976, 1099511627776] lies outside the file's" in line


def test_a_checkpoint_without_its_manifest_loads_with_a_warning(data, tmp_path, capsys):
    from ranking.retrieval.inference import EmbeddingModel

    run = tmp_path / "run"
    shutil.copytree(data["run"], run, symlinks=True)
    (run / "checkpoints" / "step-0000005" / "checkpoint.json").unlink()
    capsys.readouterr()
    EmbeddingModel.from_run(run)
    err = capsys.readouterr().err
    assert "no checkpoint.json, so its files are loaded unverified" in err


# ---------------------------------------------------------------------------------------------------------------
# finding 10: what a killed run leaves


@pytest.mark.system
def test_the_temporary_folder_of_a_killed_add_is_removed_by_the_next_run(data, tmp_path, capsys):
    grown = copy_index(data, tmp_path)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale = grown.with_name(f".{grown.name}.tmp-{killed.pid}")
    shutil.copytree(grown, stale)  # what `--add` had written when it was killed
    killed.kill()
    killed.wait()
    alive = grown.with_name(f".{grown.name}.tmp-{os.getpid()}-not-a-pid")
    alive.mkdir()
    capsys.readouterr()
    assert index.main(["--add", str(data["more"]), "--index", str(grown)]) == 0
    assert not stale.exists() and alive.exists()
    assert f"{grown}: removed {stale.name}, left by a ranking index that was killed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# finding 4: huge images are decoded reduced to what the model needs


def test_a_large_image_is_decoded_reduced_but_never_below_the_size_asked(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from ranking.data.decode import decode_image

    pixels = np.random.default_rng(0).integers(0, 255, (1203, 1601, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0112] = 6  # stored on its side: upright it is 1203 wide, 1601 high
    for fmt, options in (("JPEG", {"exif": exif.tobytes()}), ("PNG", {})):
        buffer = io.BytesIO()
        photo.save(buffer, fmt, **options)
        data = buffer.getvalue()
        upright = (3, 1601, 1203) if fmt == "JPEG" else (3, 1203, 1601)
        assert tuple(decode_image(data, "photo").shape) == upright
        for shorter_side, factor in ((32, 8), (75, 8), (76, 4), (150, 4), (151, 2), (300, 2), (301, 1)):
            reduced = decode_image(data, "photo", shorter_side)
            assert tuple(reduced.shape) == (3, *(-(-side // factor) for side in upright[1:])), (fmt, shorter_side)
            assert min(reduced.shape[1:]) >= 2 * shorter_side


def test_a_large_photo_indexed_and_searched_finds_itself(data, tmp_path, capsys, monkeypatch):
    """Indexing a folder and searching a query reduce a large photo the same way, so it is its own nearest row."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    photos = tmp_path / "large"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for n in range(3):
        tile = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(tile).resize((1600, 1200), Image.Resampling.BILINEAR).save(photos / f"big{n}.jpg")
    out = tmp_path / "index"
    assert index.main(["--checkpoint", str(data["run"]), "--images", str(photos), "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        search.main(
            [*map(str, sorted(photos.iterdir())), "--index", str(out), "--device", "cpu", "--top", "1", "--json"]
        )
        == 0
    )
    found = json.loads(capsys.readouterr().out)
    assert [entry["results"][0]["file"] for entry in found] == ["big0.jpg", "big1.jpg", "big2.jpg"]
    assert all(entry["results"][0]["distance"] < 1e-4 for entry in found)


# ---------------------------------------------------------------------------------------------------------------
# finding 7: a frozen rank of a sharded index ends the launch after --collective-timeout-s

FROZEN_RANK = """
import os, sys, time
from ranking import cli, index
from ranking.retrieval import indexfolder

embed_sources = indexfolder.embed_sources

def frozen(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        time.sleep(120)  # a rank on a hung file system
    return embed_sources(*args, **kwargs)

indexfolder.embed_sources = frozen
cli.run_stage(index.main, sys.argv[1:], "ranking.index")
"""


def test_a_frozen_rank_of_a_sharded_index_ends_it_after_the_collective_timeout(data, tmp_path):
    import time

    from harness import launch

    script = tmp_path / "frozen_rank.py"
    script.write_text(FROZEN_RANK)
    started = time.monotonic()
    result = launch(
        [
            "--checkpoint",
            str(data["run"]),
            "--images",
            str(data["photos"]),
            "--out",
            str(tmp_path / "index"),
            "--collective-timeout-s",
            "5",
        ],
        script=str(script),
        timeout=110,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 100  # not the frozen rank's 120 s, nor torch's 30 minutes
    assert (
        "a collective waited more than 5 s (--collective-timeout-s) for another rank, which is frozen or gone; "
        "run `ranking index` again"
    ) in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "index").exists()


# ---------------------------------------------------------------------------------------------------------------
# finding 11: odd names


def odd_named_photos(folder: Path, names: list[bytes]) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    paths = []
    for n, name in enumerate(names):
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
        Image.fromarray(np.random.default_rng(n).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, "PNG")
        paths.append(path)
    return paths


def test_a_class_folder_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    source = tmp_path / "classes"
    odd_named_photos(source, [b"good"])  # a file here; the class folders below
    (source / "good").unlink()
    odd_named_photos(source / "good", [b"a.png", b"b.png"])
    odd_named_photos(Path(os.fsdecode(os.fsencode(source) + b"/caf\xe9")), [b"a.png", b"b.png"])
    line = cli_refusal(capsys, "shards", str(source), "--out", str(tmp_path / "shards"), "--no-progress")
    assert line.endswith(
        f"{source}/caf\\xe9: a class folder name that is not printable UTF-8 text (shown with "
        "\\xNN for its other bytes); rename it"
    ), line
    assert not (tmp_path / "shards").exists()


def test_odd_file_names_keep_the_search_table_and_its_json_readable(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    photos = odd_named_photos(tmp_path / "odd", [b"line\nbreak.png", b"bad\xff.png", b"plain.png"])
    out = tmp_path / "index"
    assert index.main(["--checkpoint", str(data["run"]), "--images", str(tmp_path / "odd"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert search.main([str(photos[0]), "--index", str(out), "--device", "cpu", "--top", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 1 + 3 + 1  # the query, the header, one line per result, a blank line
    assert table[0] == f"{tmp_path}/odd/line\\nbreak.png"
    assert {line.split()[2] for line in table[2:5]} == {"line\\nbreak.png", "bad\\xff.png", "plain.png"}

    assert search.main([*map(str, photos[:2]), "--index", str(out), "--device", "cpu", "--top", "3", "--json"]) == 0
    text = capsys.readouterr().out
    text.encode("utf-8")  # no lone surrogates: any strict JSON reader takes it
    found = json.loads(text)
    assert [entry["query"] for entry in found] == [f"{tmp_path}/odd/line\nbreak.png", f"{tmp_path}/odd/bad\\xff.png"]
    assert {r["file"] for r in found[1]["results"]} == {"line\nbreak.png", "bad\\xff.png", "plain.png"}
