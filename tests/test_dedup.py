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
    out, grid, page = tmp_path / "groups.json", tmp_path / "groups.png", tmp_path / "groups.html"
    argv = ["--index", str(planted["index"]), "--threshold", THRESHOLD, "--json", "--out", str(out)]
    assert dedup.main([*argv, "--grid", str(grid), "--html", str(page)]) == 0
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
    html = page.read_text()
    assert html.count("<section>") == 4 and html.count('<img src="data:image/jpeg;base64,') == 9
    assert all(file in html for group in planted["groups"] for file in group)


def test_the_table_and_a_lower_threshold(planted, capsys):
    assert dedup.main(["--index", str(planted["index"]), "--threshold", THRESHOLD]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith("3 images, up to d=") and lines[-1].startswith("4 groups")
    # byte copies are at distance ~0 (float rounding), so a tiny threshold still groups them; re-encoded ones drop out
    assert dedup.main(["--index", str(planted["index"]), "--threshold", "2e-6", "--json"]) == 0
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


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_the_approximate_backends_give_the_exact_answers_on_a_small_index(planted, backend, capsys):
    """dedup and search take --backend; on 65 rows the candidates cover the index, so the answers are exact ones."""
    from ranking import search

    argv = ["--index", str(planted["index"]), "--threshold", THRESHOLD, "--json"]
    assert dedup.main(argv) == 0
    exact = json.loads(capsys.readouterr().out)
    assert dedup.main([*argv, "--backend", backend]) == 0
    approximate = json.loads(capsys.readouterr().out)
    assert [g["items"] for g in approximate["groups"]] == [g["items"] for g in exact["groups"]]
    # re-ranked exactly, as (a - b)^2 summed rather than through the norms: the same distances to float precision
    for a, b in zip(approximate["groups"], exact["groups"]):
        assert a["max_distance"] == pytest.approx(b["max_distance"], abs=1e-5)
    query = sorted((planted["root"] / "photos").glob("*/*.JPEG"))[7]
    found = []
    for name in ("exact", backend):
        assert (
            search.main([str(query), "--index", str(planted["index"]), "--top", "5", "--json", "--backend", name]) == 0
        )
        found.append(json.loads(capsys.readouterr().out)[0]["results"])
    assert [r["id"] for r in found[0]] == [r["id"] for r in found[1]]
    assert [r["distance"] for r in found[0]] == pytest.approx([r["distance"] for r in found[1]], abs=1e-5)
