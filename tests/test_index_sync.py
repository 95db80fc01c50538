"""An index that syncs with its folders (issue 21, item 2): `--add` of images already indexed (same folder, file and
content) skips them and says how many; `--remove PATH` and `--prune` drop rows; every change is published whole, so
a kill in the middle leaves the old index readable."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import ENV, cli_refusal, full_precision_index, photo_tree, tiny_index, wait_for
from ranking import index
from ranking.retrieval.indexfolder import Index, read_thumbnail_bytes


@pytest.fixture(scope="module")
def built(mini_zip, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sync")
    photos = photo_tree(mini_zip, root / "photos", per_class=4)
    return {"root": root, "photos": photos, "index": tiny_index(root, photos), "mini_zip": mini_zip}


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def run_index(capsys, *argv: str | Path) -> str:
    capsys.readouterr()
    with full_precision_index():
        assert index.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def files_of(folder: Path) -> list[str]:
    return [Index.load(folder).items[n].file for n in range(len(Index.load(folder)))]


def test_adding_the_same_folder_again_adds_nothing_and_says_so(built, tmp_path, capsys):
    grown = copy_of(built["index"], tmp_path / "index")
    before = {p.name: p.read_bytes() for p in grown.iterdir()}
    out = run_index(capsys, "--add", built["photos"], "--index", grown)
    assert "added 0 images, skipped 40 already in the index (same file, same content)" in out
    assert len(Index.load(grown)) == 40
    assert {p.name: p.read_bytes() for p in grown.iterdir()} == before  # nothing rewritten but the same rows


def test_adding_a_grown_folder_embeds_only_the_new_and_changed_images(built, tmp_path, capsys):
    photos = copy_of(built["photos"], tmp_path / "photos")
    grown = tiny_index(tmp_path, photos, "grown")
    first = sorted(photos.glob("*/*.JPEG"))[0]
    (first.parent / "copy-of-first.JPEG").write_bytes(first.read_bytes())  # new file, known content: a new row
    changed = sorted(photos.glob("*/*.JPEG"))[5]
    changed.write_bytes(sorted(photos.glob("*/*.JPEG"))[30].read_bytes())  # same file, new content
    out = run_index(capsys, "--add", photos, "--index", grown)
    assert "added 2 images, skipped 39 already in the index" in out
    files = files_of(grown)
    assert len(files) == 42
    assert set(files[40:]) == {f"{first.parent.name}/copy-of-first.JPEG", changed.relative_to(photos).as_posix()}
    again = run_index(capsys, "--add", photos, "--index", grown)
    assert "added 0 images, skipped 41" in again and len(Index.load(grown)) == 42


def test_remove_drops_a_file_and_a_folder_and_keeps_every_other_row_whole(built, tmp_path, capsys):
    changed = copy_of(built["index"], tmp_path / "index")
    original = Index.load(built["index"])
    one = sorted(built["photos"].glob("*/*.JPEG"))[2]
    folder = sorted(built["photos"].iterdir())[3]
    out = run_index(capsys, "--remove", one, folder, "--index", changed)
    assert f"removed 5 rows; {changed} holds 35" in out
    after = Index.load(changed)
    gone = {one.relative_to(built["photos"]).as_posix()} | {
        p.relative_to(built["photos"]).as_posix() for p in folder.iterdir()
    }
    kept = [item for item in original.items if item.file not in gone]
    assert [item.file for item in after.items] == [item.file for item in kept]
    assert [item.id for item in after.items] == list(range(35))
    assert torch.equal(after.embeddings, original.embeddings[[item.id for item in kept]])
    old_thumbs = read_thumbnail_bytes(built["index"] / "thumbs.tar", kept)
    new_thumbs = read_thumbnail_bytes(changed / "thumbs.tar", list(after.items))
    assert [new_thumbs[n] for n in range(35)] == [old_thumbs[item.id] for item in kept]
    photo = sorted(built["photos"].glob("*/*.JPEG"))[20]
    assert after.search([photo], k=1)[0][0].item.file == photo.relative_to(built["photos"]).as_posix()


def test_prune_drops_the_rows_of_deleted_files(built, tmp_path, capsys):
    photos = copy_of(built["photos"], tmp_path / "photos")
    pruned = tiny_index(tmp_path, photos, "pruned")
    deleted = sorted(photos.glob("*/*.JPEG"))[::9]
    for path in deleted:
        path.unlink()
    out = run_index(capsys, "--prune", "--index", pruned)
    assert f"removed {len(deleted)} rows; {pruned} holds {40 - len(deleted)}" in out
    assert set(files_of(pruned)) == {p.relative_to(photos).as_posix() for p in photos.glob("*/*.JPEG")}
    shutil.rmtree(photos)  # a source folder gone whole (unmounted?) is not taken as every image deleted
    err = cli_refusal(capsys, "index", "--prune", "--index", str(pruned))
    assert f"{photos}: the source folder of {pruned}'s rows is gone" in err
    assert len(Index.load(pruned)) == 40 - len(deleted)


def test_removing_a_path_with_no_rows_is_one_line_and_changes_nothing(built, tmp_path, capsys):
    changed = copy_of(built["index"], tmp_path / "index")
    before = {p.name: p.read_bytes() for p in changed.iterdir()}
    err = cli_refusal(capsys, "index", "--remove", str(tmp_path / "elsewhere"), "--index", str(changed))
    assert err == f"ranking index: error: {tmp_path / 'elsewhere'}: no row of {changed} was indexed from there; " + (
        "nothing removed"
    )
    assert {p.name: p.read_bytes() for p in changed.iterdir()} == before


@pytest.mark.slow
def test_a_kill_during_an_update_leaves_the_old_index_readable(built, tmp_path, capsys):
    changed = copy_of(built["index"], tmp_path / "index")
    before = {p.name: p.read_bytes() for p in changed.iterdir()}
    more = photo_tree(built["mini_zip"], tmp_path / "more")  # 60 photos in another folder
    command = [sys.executable, "-m", "ranking", "index", "--add", str(more), "--index", str(changed)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(tmp_path.glob(".index.tmp-*")), 120, "the update's temporary folder", process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in changed.iterdir()} == before
    assert len(Index.load(changed)) == 40
    out = run_index(capsys, "--add", more, "--index", changed)  # the next update cleans up and completes
    assert not list(tmp_path.glob(".index.tmp-*"))
    assert "added 60 images, skipped 0" in out and len(Index.load(changed)) == 100
    assert json.loads((changed / "index.json").read_text())["count"] == 100
