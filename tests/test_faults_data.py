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
import tarfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from ranking import cli
from ranking.archive import MAX_FILE_BYTES, Archive, open_source
from ranking.errors import RankingError
from ranking.shards import MAX_IMAGE_PIXELS, load_manifest, main, verify_shards, write_shards

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
    while data[at:at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46:at + 46 + name_len].decode() == member:
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
    assert str(raised) == (f"{bomb}:{TRAIN_JPEG}: {BOMB_BYTES} uncompressed bytes, over the limit of {MAX_FILE_BYTES} "
                           f"bytes per file (ranking.archive.MAX_FILE_BYTES)")
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
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "JPEG", quality=10)
    folder = extract(synth_zip, tmp_path / "src")
    (folder / TRAIN_JPEG.removeprefix(ROOT)).write_bytes(buffer.getvalue())
    with pytest.raises(RankingError) as error:
        write_shards(folder, tmp_path / "out", shard_size=50)
    assert one_line(error).endswith(f"n90000003_7.JPEG: {side}x{side} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                                    "(ranking.shards.MAX_IMAGE_PIXELS)")


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
    assert one_line(error) == (f"{link}: a character device (a symlink to /dev/zero), not a regular file; "
                               "remove it from the source")


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
    assert str(raised) == (f"{big}: {MAX_FILE_BYTES + 1} bytes, over the limit of {MAX_FILE_BYTES} bytes per file "
                           "(ranking.archive.MAX_FILE_BYTES)")
    assert peak < MAX_FILE_BYTES
