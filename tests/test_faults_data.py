"""Issue 15, data side: hostile or mistaken input to `ranking shards` fails fast with one line and loses nothing.

Resource exhaustion in the reader (zip bombs, FIFOs, devices), a shard folder of another source, and manifests
whose values or counts do not match their shards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from ranking import cli
from ranking.core.errors import RankingError
from ranking.data.archive import MAX_FILE_BYTES, Archive, open_source
from ranking.data.decode import MAX_IMAGE_PIXELS
from ranking.shards import main, verify_shards, write_shards

ROOT = "tiny-imagenet-200/"
TRAIN_JPEG = ROOT + "train/n90000003/images/n90000003_7.JPEG"
BOMB_BYTES = 256 * 2**20  # 16x the limit; compresses to ~250 KB


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def copy_zip_with_bomb(source: Path, target: Path, member: str, size: int = BOMB_BYTES) -> Path:
    """The zip with `member`'s content replaced by `size` zero bytes, streamed (the test never holds them)."""
    block = bytes(1 << 20)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for name in src.namelist():
            if name != member:
                dst.writestr(name, src.read(name))
                continue
            with dst.open(name, "w") as f:
                for _ in range(size // len(block)):
                    f.write(block)
    return target


def patch_uncompressed_size(path: Path, member: str, size: int) -> None:
    """Make the local and central headers of `member` claim `size` uncompressed bytes (a lying header)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        central = z.start_dir
    struct.pack_into("<I", data, info.header_offset + 22, size)
    at = central
    while data[at : at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_len].decode() == member:
            struct.pack_into("<I", data, at + 24, size)
        at += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


def extract(zip_path: Path, target: Path) -> Path:
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(target)
    return target / "tiny-imagenet-200"


def peak_python_memory(call) -> tuple[BaseException | None, int]:
    """Run `call()`; the exception it raised and the peak bytes Python allocated meanwhile (bytes objects count)."""
    tracemalloc.start()
    try:
        call()
        raised = None
    except BaseException as e:  # noqa: BLE001 - handed back to the test
        raised = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


# ------------------------------------------------------------------------------------------------ 9: resources


@pytest.mark.timeout(60)
def test_zip_bomb_member_is_refused_by_its_header_without_inflating_it(synth_zip, tmp_path):
    bomb = copy_zip_with_bomb(synth_zip, tmp_path / "bomb.zip", TRAIN_JPEG)
    assert bomb.stat().st_size < 2 * 2**20
    out = tmp_path / "out"
    raised, peak = peak_python_memory(lambda: write_shards(bomb, out, shard_size=50, workers=1))
    assert isinstance(raised, RankingError), raised
    assert str(raised) == (
        f"{bomb}:{TRAIN_JPEG}: {BOMB_BYTES} uncompressed bytes, over the limit of {MAX_FILE_BYTES} "
        f"bytes per file (ranking.data.archive.MAX_FILE_BYTES)"
    )
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # reading the member whole took 256 MiB
    assert not out.exists()


@pytest.mark.timeout(60)
def test_zip_member_with_a_lying_size_is_read_no_further_than_the_limit(synth_zip, tmp_path):
    """The header says 1000 bytes, the data inflates to 256 MiB: the reader stops at the limit, whatever it says."""
    bomb = copy_zip_with_bomb(synth_zip, tmp_path / "bomb.zip", ROOT + "wnids.txt")
    patch_uncompressed_size(bomb, ROOT + "wnids.txt", 1000)
    raised, peak = peak_python_memory(lambda: Archive(bomb))
    assert isinstance(raised, RankingError), raised
    assert str(raised).startswith(f"{bomb}:{ROOT}wnids.txt: ") and "\n" not in str(raised)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.timeout(60)
def test_zip_member_over_the_limit_without_a_size_in_its_header_is_cut_at_the_limit(synth_zip, tmp_path):
    """A header claiming more than the limit is refused before reading; one claiming it exactly is read up to
    the limit + 1 and refused there."""
    bomb = copy_zip_with_bomb(synth_zip, tmp_path / "bomb.zip", ROOT + "words.txt", size=MAX_FILE_BYTES + 2**20)
    patch_uncompressed_size(bomb, ROOT + "words.txt", MAX_FILE_BYTES)
    raised, peak = peak_python_memory(lambda: Archive(bomb))
    assert isinstance(raised, RankingError), raised
    assert str(raised).startswith(f"{bomb}:{ROOT}words.txt: ")
    assert peak < 3 * MAX_FILE_BYTES


def test_huge_declared_image_is_refused_before_decoding(synth_zip, tmp_path):
    """A few KB of JPEG that declares 12000x12000 pixels would decode to 412 MiB."""
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "JPEG", quality=10)
    folder = extract(synth_zip, tmp_path / "src")
    (folder / TRAIN_JPEG.removeprefix(ROOT)).write_bytes(buffer.getvalue())
    with pytest.raises(RankingError) as error:
        write_shards(folder, tmp_path / "out", shard_size=50)
    assert one_line(error).endswith(
        f"n90000003_7.JPEG: {side}x{side} pixels, over the limit of {MAX_IMAGE_PIXELS} "
        "(ranking.data.decode.MAX_IMAGE_PIXELS)"
    )


@pytest.mark.timeout(30)
def test_fifo_named_like_an_image_is_refused_not_waited_on(synth_zip, tmp_path):
    folder = extract(synth_zip, tmp_path / "src")
    fifo = folder / "train/n90000001/images/x.JPEG"
    os.mkfifo(fifo)
    with pytest.raises(RankingError) as error:
        write_shards(folder, tmp_path / "out", shard_size=50)
    assert one_line(error) == f"{fifo}: a FIFO, not a regular file; remove it from the source"
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_symlink_to_a_device_is_refused_not_read_forever(synth_zip, tmp_path):
    folder = extract(synth_zip, tmp_path / "src")
    link = folder / "test/images/zero.JPEG"
    link.symlink_to("/dev/zero")
    with pytest.raises(RankingError) as error:
        write_shards(folder, tmp_path / "out", shard_size=50)
    assert one_line(error) == (
        f"{link}: a character device (a symlink to /dev/zero), not a regular file; remove it from the source"
    )


def test_dangling_symlink_is_one_line_not_a_traceback(synth_zip, tmp_path):
    folder = extract(synth_zip, tmp_path / "src")
    link = folder / "val/images/gone.JPEG"
    link.symlink_to(tmp_path / "nowhere.JPEG")
    with pytest.raises(RankingError) as error:
        Archive(folder)
    assert one_line(error) == f"{link}: cannot read (No such file or directory, a dangling symlink)"


@pytest.mark.timeout(30)
def test_file_turned_into_a_fifo_after_listing_is_refused_on_read(synth_zip, tmp_path):
    """The read checks the opened file again: a file replaced after the listing cannot block the packer."""
    folder = extract(synth_zip, tmp_path / "src")
    source = open_source(folder)
    file = TRAIN_JPEG.removeprefix(ROOT)
    assert source.read(file)[:2] == b"\xff\xd8"
    (folder / file).unlink()
    os.mkfifo(folder / file)
    with pytest.raises(RankingError) as error:
        source.read(file)
    assert one_line(error) == f"{folder / file}: a FIFO, not a regular file; remove it from the source"


def test_oversized_file_in_a_folder_is_refused_by_its_size_before_reading(synth_zip, tmp_path):
    folder = extract(synth_zip, tmp_path / "src")
    big = folder / TRAIN_JPEG.removeprefix(ROOT)
    with open(big, "r+b") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    raised, peak = peak_python_memory(lambda: write_shards(folder, tmp_path / "out", shard_size=50))
    assert isinstance(raised, RankingError)
    assert str(raised) == (
        f"{big}: {MAX_FILE_BYTES + 1} bytes, over the limit of {MAX_FILE_BYTES} bytes per file "
        "(ranking.data.archive.MAX_FILE_BYTES)"
    )
    assert peak < MAX_FILE_BYTES


# ------------------------------------------------------------------------------------------------ 8: --out


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def other_zip(tmp_path_factory) -> Path:
    """Another source: same layout, other images and classes."""
    from ranking.synth import write_synthetic_archive

    path = tmp_path_factory.mktemp("other") / "other.zip"
    write_synthetic_archive(path, classes=3, train_per_class=10, val_per_class=4, test_count=3, seed=5)
    return path


def test_shards_of_another_source_are_refused_and_kept(synth_zip, other_zip, tmp_path, capsys):
    out = tmp_path / "shards"
    write_shards(synth_zip, out, shard_size=100)
    before = tree(out)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", str(other_zip), "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        (
            f"ranking shards: error: {out}: holds shards of another source ({synth_zip}); give --overwrite to replace "
            "them, or choose another --out"
        )
    ]
    assert tree(out) == before  # nothing deleted, nothing written
    verify_shards(out)

    assert main([str(other_zip), "--out", str(out), "--overwrite", "--workers", "1", "--no-progress"]) == 0
    manifest = verify_shards(out)
    assert manifest["source"] == "other.zip" and manifest["splits"]["train"]["count"] == 30
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]


def test_rerun_of_the_same_source_still_resumes(synth_zip, tmp_path):
    """Same path, or the same content elsewhere (the zip copied or extracted): a re-run, not another source."""
    out = tmp_path / "shards"
    first = write_shards(synth_zip, out, shard_size=50)
    (out / "manifest.json").unlink()
    (out / "train-000002.tar").unlink()
    assert write_shards(synth_zip, out, shard_size=50) == first
    copy = tmp_path / "copy.zip"
    shutil.copy(synth_zip, copy)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = write_shards(copy, out, shard_size=50)
    assert again["splits"] == first["splits"] and again["source_fingerprint"] == first["source_fingerprint"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps  # nothing rewritten
    assert write_shards(extract(synth_zip, tmp_path / "x"), out, shard_size=120)["splits"]["train"]["count"] == 240


def test_interrupted_first_run_is_recognised_by_its_journal(synth_zip, other_zip, tmp_path):
    """A crash before the manifest: the journal's first line names the source, so the re-run resumes and
    another source is still refused."""
    out = tmp_path / "shards"
    write_shards(synth_zip, out, shard_size=50)
    (out / "manifest.json").unlink()
    (out / "train-000004.tar").unlink()
    with pytest.raises(RankingError, match="holds shards of another source"):
        write_shards(other_zip, out, shard_size=50)
    write_shards(synth_zip, out, shard_size=50)
    verify_shards(out)


def test_folder_written_before_sources_were_recorded_is_still_recognised(synth_zip, other_zip, tmp_path):
    out = tmp_path / "shards"
    write_shards(synth_zip, out, shard_size=50)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["source_fingerprint"]  # as written by the previous version
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".journal.jsonl").write_text(
        "".join(line + "\n" for line in (out / ".journal.jsonl").read_text().splitlines()[1:])
    )
    with pytest.raises(RankingError, match=r"holds shards of another source \(synth.zip\)"):
        write_shards(other_zip, out, shard_size=50)
    write_shards(synth_zip, out, shard_size=50)
    verify_shards(out)


def test_non_empty_folder_that_is_not_a_shard_folder_is_refused(synth_zip, tmp_path):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(RankingError) as error:
        write_shards(synth_zip, out, shard_size=100)
    assert one_line(error) == (
        f"{out}: is not empty and not a shard folder (no manifest.json or .journal.jsonl); "
        "give --overwrite to write shards into it anyway (other files are left alone), or "
        "choose an empty or new folder"
    )
    assert tree(out) == {"thesis.tex": b"years of work"}
    write_shards(synth_zip, out, shard_size=100, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    verify_shards(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shards(synth_zip, empty, shard_size=100)  # an existing empty folder is fine


def test_failed_first_run_into_an_existing_folder_does_not_claim_it(synth_zip, other_zip, tmp_path):
    """Bad input stops the first run before any shard: the folder is free for another source."""
    bad = copy_zip_with_bomb(synth_zip, tmp_path / "bad.zip", TRAIN_JPEG, size=MAX_FILE_BYTES + 2**20)
    out = tmp_path / "shards"
    out.mkdir()
    with pytest.raises(RankingError):
        write_shards(bad, out, shard_size=1000)
    write_shards(other_zip, out, shard_size=1000)
    verify_shards(out)


# ------------------------------------------------------------------------------------------------ 12, 13: verify


@pytest.fixture
def shards(synth_shards, tmp_path) -> Path:
    """A private copy of the session's synthetic shards to damage."""
    return Path(shutil.copytree(synth_shards, tmp_path / "shards"))


def edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def verify_error(directory: Path) -> str:
    with pytest.raises(RankingError) as error:
        verify_shards(directory)
    return one_line(error)


def set_counts(split: str, index: int, delta: int):
    def edit(m):
        m["splits"][split]["shards"][index]["count"] += delta
        m["splits"][split]["count"] += delta

    return edit


def test_verify_opens_the_shards_and_counts_their_samples(shards):
    edit_manifest(shards, set_counts("train", 1, -1))  # counts still add up, sha256 still matches
    assert verify_error(shards) == (
        f"{shards}: 1 shard(s) fail verification: train-000001.tar holds 50 samples, the manifest says 49"
    )


def test_verify_checks_labels_against_the_classes(shards):
    edit_manifest(shards, lambda m: m["classes"].pop())  # 6 classes in the shards, 5 in the manifest
    message = verify_error(shards)
    assert message.startswith(f"{shards}: ") and "train-000000.tar: sample train_" in message
    assert "has label 5, outside the 5 classes" in message


def test_verify_checks_the_ids_of_a_split(shards):
    """A val shard listed twice: counts, hashes and labels all fit, the ids do not."""

    def edit(m):
        val = m["splits"]["val"]
        val["shards"][1] = {**val["shards"][0], "name": "val-000001.tar"}
        val["count"] = 2 * val["shards"][0]["count"]

    shutil.copy(shards / "val-000000.tar", shards / "val-000001.tar")
    edit_manifest(shards, edit)
    assert "val-000001.tar holds sample val_0000000 twice or also another shard does" in verify_error(shards)


def test_verify_passes_untouched_shards(shards, capsys):
    assert main(["--verify", str(shards)]) == 0
    assert capsys.readouterr().out.startswith(f"{shards}: OK, train 240 samples in 5 shard(s)")


MALFORMED = {
    "count is a string": (
        lambda m: m["splits"]["train"]["shards"][0].update(count="50"),
        "splits.train.shards[0].count must be a whole number of at least 1, got '50'",
    ),
    "split count is a bool": (
        lambda m: m["splits"]["test"].update(count=True),
        "splits.test.count must be a whole number, got True",
    ),
    "sha256 is not a string": (
        lambda m: m["splits"]["val"]["shards"][1].update(sha256=12),
        "splits.val.shards[1].sha256 must be 64 lowercase hex digits, got 12",
    ),
    "classes entry is not strings": (
        lambda m: m["classes"].__setitem__(2, {"wnid": 3, "words": None}),
        "classes[2] must be {wnid: non-empty string, words: string}, got ",
    ),
    "classes entry is a string": (lambda m: m["classes"].__setitem__(0, "n01"), "classes[0] must be"),
    "duplicate class": (lambda m: m["classes"].__setitem__(1, m["classes"][0]), "classes[1]: n9000000"),
    "shard name escapes the folder": (
        lambda m: m["splits"]["test"]["shards"][0].update(name="../../etc/passwd"),
        "splits.test.shards[0].name must be 'test-000000.tar', got '../../etc/passwd'",
    ),
    "split is a list": (lambda m: m["splits"].update(val=[]), "splits.val must be {count, shards}, got []"),
    "shards is a dict": (lambda m: m["splits"]["val"].update(shards={}), "splits.val.shards must be a list"),
    "seed is a float": (lambda m: m.update(seed=0.5), "'seed' must be a whole number of at least 0, got 0.5"),
    "classes emptied": (lambda m: m.update(classes=[]), "'classes' is empty, but the train split holds labelled"),
    "not an object": (lambda m: m.clear() or m.update(format=["x"]), "not a deep-ranking-shards/1 manifest"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_manifest_value_is_one_line_not_a_traceback(case, shards, capsys):
    edit, message = MALFORMED[case]
    edit_manifest(shards, edit)
    assert verify_error(shards).startswith(f"{shards / 'manifest.json'}: {message}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["shards", "--verify", str(shards)])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
