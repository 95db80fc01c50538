"""`ranking dedup` (issue 21, item 3): on the mini zip's real photos with planted duplicates (a byte copy, a
re-encoded copy, a resized copy, a photo copied twice), the groups closer than the threshold are exactly the planted
ones, as JSON, as a picture and in the table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from harness import cli_refusal, encoded, photo_tree, tiny_index
from ranking import dedup
from ranking.reporting import grids

THRESHOLD = "0.005"  # planted copies sit below 0.001 and distinct photos above 0.018 for any random smoke network


@pytest.fixture(scope="module")
def planted(mini_zip, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dedup")
    photos = photo_tree(mini_zip, root / "photos")
    originals = sorted(photos.glob("*/*.JPEG"))
    a, b, c, d = originals[3], originals[10], originals[25], originals[41]
    other = originals[50].parent  # copies land in another class's folder, under other names
    shutil.copy(a, other / "copy-of-a.JPEG")
    with Image.open(b) as image:
        (other / "b-reencoded.jpg").write_bytes(encoded(image.convert("RGB"), "JPEG", quality=70))
    with Image.open(c) as image:
        (other / "c-larger.png").write_bytes(encoded(image.convert("RGB").resize((96, 96)), "PNG"))
    shutil.copy(d, photos / originals[0].parent.name / "d1.JPEG")
    shutil.copy(d, other / "d2.JPEG")

    def name(path: Path) -> str:
        return path.relative_to(photos).as_posix()

    groups = [
        {name(d), f"{originals[0].parent.name}/d1.JPEG", f"{other.name}/d2.JPEG"},
        {name(a), f"{other.name}/copy-of-a.JPEG"},
        {name(b), f"{other.name}/b-reencoded.jpg"},
        {name(c), f"{other.name}/c-larger.png"},
    ]
    return {"root": root, "index": tiny_index(root, photos), "groups": groups}


def test_dedup_finds_the_planted_duplicates_and_nothing_else(planted, tmp_path, capsys):
    out, grid = tmp_path / "groups.json", tmp_path / "groups.png"
    argv = ["--index", str(planted["index"]), "--threshold", THRESHOLD, "--json", "--out", str(out)]
    assert dedup.main([*argv, "--grid", str(grid)]) == 0
    printed = capsys.readouterr()
    found = json.loads(printed.out)
    assert found == json.loads(out.read_text())
    assert found["rows"] == 60 + 5 and found["threshold"] == float(THRESHOLD)
    groups = [{item["file"] for item in group["items"]} for group in found["groups"]]
    assert groups[0] == planted["groups"][0]  # the largest first
    assert sorted(map(sorted, groups)) == sorted(map(sorted, planted["groups"]))
    assert all(group["max_distance"] < float(THRESHOLD) for group in found["groups"])
    assert "4 groups (9 of 65 images) closer than 0.005" in printed.err
    with Image.open(grid) as image:
        assert image.size == grids.grid_size(rows=4, columns=3)


def test_the_table_and_a_lower_threshold(planted, capsys):
    assert dedup.main(["--index", str(planted["index"]), "--threshold", THRESHOLD]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith("3 images, up to d=") and lines[-1].startswith("4 groups")
    # byte copies are at distance 0, so any positive threshold still groups them; the re-encoded ones drop out
    assert dedup.main(["--index", str(planted["index"]), "--threshold", "1e-9", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)["groups"]
    assert [group["size"] for group in exact] == [3, 2]
    assert all(len({item["sha256"] for item in group["items"]}) == 1 for group in exact)  # the same bytes


def test_bad_thresholds_and_folders_are_one_line(planted, tmp_path, capsys):
    assert "--threshold must be greater than 0; got 0.0" in cli_refusal(
        capsys, "dedup", "--index", str(planted["index"]), "--threshold", "0"
    )
    assert "--threshold must be a finite number" in cli_refusal(
        capsys, "dedup", "--index", str(planted["index"]), "--threshold", "nan"
    )
    assert f"{tmp_path}: not an index folder" in cli_refusal(
        capsys, "dedup", "--index", str(tmp_path), "--threshold", "1"
    )
