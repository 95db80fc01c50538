"""The one image decoder (ranking/data/decode.py): formats, transparency, the pixel limit, one-line errors, EXIF
orientation; and a phone photo's rotation honoured end to end: `ranking shards` stores it upright, and an index of
its shards or of its folder finds it from an upright copy."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

import ranking
from harness import encoded, mini_jpegs, odd_images, write_smoke_run
from ranking import index, search
from ranking.core.errors import RankingError
from ranking.data.augment import StoredDecoder
from ranking.data.decode import (
    MAX_IMAGE_PIXELS,
    decode_image,
    decode_jpeg,
    decode_jpegs,
    from_pil,
    read_header,
    to_pil,
)
from ranking.folders.shardformat import shard_paths
from ranking.shards import JPEG_QUALITY, write_shards

ROTATED = 6  # EXIF orientation "rotate 90 degrees clockwise to display": how a phone held upright stores a photo
# The photo of the end-to-end tests: a JPEG round trip of it moves a random-init smoke network's embedding by at most
# 8e-5 (squared distance, 30 inits; another photo's moved up to 1.3e-3), so the bound of 1e-3 holds whatever init
# the run folder's path seeds, while the photo turned sideways is at least 1.5e-2 away.
PHOTO_CLASS = "n03891332"
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(scope="module")
def photo(mini_zip) -> Image.Image:
    """A real Tiny ImageNet photo at its 64 px, cropped to 64 x 48 (not square, so a rotation shows in the shape)."""
    name, data = mini_jpegs(mini_zip)[PHOTO_CLASS][0]
    return Image.open(io.BytesIO(data)).convert("RGB").crop((0, 8, 64, 56))


def pixels(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.convert("RGB"))


def with_orientation(upright: Image.Image, orientation: int, fmt: str = "JPEG", **options) -> bytes:
    """The file a camera writes for ``upright`` when it stores its sensor's pixels and tags how to turn them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(upright_to_stored(upright, orientation), fmt, exif=exif, **options)


def upright_to_stored(upright: Image.Image, orientation: int) -> Image.Image:
    """The inverse of the transpose PIL's ``exif_transpose`` applies for ``orientation``."""
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }.get(orientation)
    return upright.transpose(inverse) if inverse is not None else upright.copy()


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().mean())


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
def test_tiny_imagenet_jpegs_keep_the_pixels_torchvision_decoded(mini_zip):
    """The training stream's pixels do not move: TorchCodec decodes each of the mini zip's JPEGs (grayscale ones
    too) to exactly the uint8 of torchvision.io.decode_jpeg, the decoder before it, and of PIL."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg

    with zipfile.ZipFile(mini_zip) as z:
        jpegs = {name: z.read(name) for name in z.namelist() if name.endswith(".JPEG")}
    grayscale = 0
    for name, data in jpegs.items():
        before = torchvision_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(decode_jpeg(data, name), before), name
        assert torch.equal(decode_image(data, name), before), name
        with Image.open(io.BytesIO(data)) as image:
            grayscale += image.mode == "L"
    assert len(jpegs) == 270 and grayscale == 5
    assert torch.equal(StoredDecoder(None)(data, name), before), "the workers' decoder is this one"


def test_formats_come_out_rgb_with_transparency_over_white(photo):
    """RGB, grayscale and CMYK JPEGs, PNG with and without alpha, a palette with a transparent colour, WebP,
    BMP and TIFF: uint8 [3, H, W], the image's own pixels (lossless formats exactly)."""
    exact = pixels(photo)
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})):
        assert torch.equal(decode_image(encoded(photo, fmt, **options), fmt), exact), fmt
    jpeg = decode_image(encoded(photo, "JPEG", quality=95), "rgb.jpg")
    assert jpeg.shape == (3, 48, 64) and jpeg.dtype == torch.uint8 and mean_difference(jpeg, exact) < 2
    gray = decode_image(encoded(photo.convert("L"), "JPEG", quality=95), "gray.jpg")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert mean_difference(gray[0], pixels(photo.convert("L"))[0]) < 2
    cmyk = decode_image(encoded(photo.convert("CMYK"), "JPEG", quality=95), "cmyk.jpg")
    assert mean_difference(cmyk, exact) < 3

    half = photo.convert("RGBA")
    half.putalpha(128)
    over_white = decode_image(encoded(half, "PNG"), "half.png")
    expected = (exact.float() * 128 / 255 + 255 * 127 / 255).round()
    assert (over_white.float() - expected).abs().max() <= 1, "alpha 128 over white"
    assert torch.equal(decode_image(encoded(half, "WEBP", lossless=True), "half.webp"), over_white)
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.putdata([0, 1, 1, 0, 1, 1, 1, 1])
    transparent = decode_image(encoded(palette, "PNG", transparency=0), "palette.png")
    assert transparent[:, 0, 0].tolist() == [255, 255, 255] and transparent[:, 0, 1].tolist() == [200, 10, 10]


def test_odd_images_of_the_folder_tests_decode(mini_zip):
    data = mini_jpegs(mini_zip)[sorted(mini_jpegs(mini_zip))[0]][0][1]
    for name, image in odd_images(data).items():
        decoded = decode_image(image, name)
        assert decoded.shape == (3, 64, 64) and decoded.dtype == torch.uint8, name


# ------------------------------------------------------------------------------------------------ bad input


def declaring(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) declares another size; its scan is still the small one's."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


@pytest.mark.parametrize("width, height", [(9000, 9000), (20000, 20000)], ids=["over ours", "over PIL's too"])
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(photo, width, height):
    """A few KB of JPEG declaring 81 or 400 Mpx (243 MiB, 1.2 GB decoded) is refused from its header, in one
    message naming the file, whichever limit (PIL's bomb check sits above ours) sees it first."""
    huge = declaring(encoded(photo, "JPEG"), width, height)
    declared = f"{width}x{height}" if width * height < 2 * Image.MAX_IMAGE_PIXELS else str(width * height)
    message = f"big.jpg: {declared} pixels, over the limit of {MAX_IMAGE_PIXELS} (ranking.data.decode.MAX_IMAGE_PIXELS)"
    for read in (decode_image, read_header):
        with pytest.raises(RankingError) as raised:
            read(huge, "big.jpg")
        assert str(raised.value) == message
    assert width * height > MAX_IMAGE_PIXELS


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "header only", "truncated png"])
def test_what_does_not_decode_is_one_line_naming_its_source(photo, damage):
    jpeg, png = encoded(photo, "JPEG"), encoded(photo, "PNG")
    data = {
        "garbage": b"this is not an image",
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "header only": jpeg[:200],
        "truncated png": png[:300],
    }[damage]
    source = "shards/train-000003.tar: sample train_0000042"
    readers = [decode_image] + (
        [] if damage == "truncated png" else [decode_jpeg, lambda d, s: decode_jpegs([jpeg, d], ["good", s])[1]]
    )
    for read in readers:
        with pytest.raises(RankingError) as raised:
            read(data, source)
        message = str(raised.value)
        assert message.startswith(f"{source}: cannot decode (") and message.endswith(")"), message
        assert "\n" not in message and "BytesIO" not in message and " at 0x" not in message and ".cpp" not in message


# ------------------------------------------------------------------------------------------------ EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_reader_applies_the_exif_orientation(photo, orientation):
    """Each of the 8 orientations gives the upright pixels: from bytes (decode_image, and the workers' decode_jpeg),
    from a PIL image opened on them (PIL decodes those), as PIL's own ``exif_transpose`` turns them."""
    data = with_orientation(photo, orientation, quality=95)
    with Image.open(io.BytesIO(data)) as opened:
        reference = pixels(ImageOps.exif_transpose(opened))
        assert torch.equal(from_pil(opened), reference)
    assert reference.shape == (3, 48, 64) and mean_difference(reference, pixels(photo)) < 2
    decoded = decode_image(data, "photo.jpg")
    assert torch.equal(decode_jpeg(data, "photo.jpg"), decoded)
    assert decoded.shape == reference.shape and (decoded.int() - reference.int()).abs().max() <= 1  # two libjpegs
    assert read_header(data, "photo.jpg").orientation == orientation
    png = with_orientation(photo, orientation, "PNG")  # lossless: exactly the upright pixels
    assert torch.equal(decode_image(png, "photo.png"), pixels(photo))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_decode_is_single_decodes_on_each_device(photo, device):
    """``decode_jpegs`` (nvJPEG on CUDA) gives what ``decode_jpeg`` gives, rotation included; the CPU exactly, nvJPEG
    within its own rounding."""
    jpegs = [
        encoded(photo, "JPEG"),
        encoded(photo.convert("L"), "JPEG"),
        with_orientation(photo, ROTATED),
        encoded(photo.resize((40, 30)), "JPEG"),
    ]
    decoded = decode_jpegs(jpegs, device=device)
    assert [image.device.type for image in decoded] == [device] * len(jpegs)
    for image, data in zip(decoded, jpegs):
        single = decode_jpeg(data)
        assert image.shape == single.shape
        assert (image.cpu().int() - single.int()).abs().max() <= (0 if device == "cpu" else 2)
    assert decode_jpegs([], device=device) == []


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def phone_folder(photo, mini_zip, tmp_path_factory) -> dict:
    """Class folders of real photos, one of them stored sideways with EXIF orientation 6 as a phone writes it; a
    random-init smoke network; and an upright copy of that photo to search with."""
    root = tmp_path_factory.mktemp("phone")
    folder = root / "photos"
    photos = mini_jpegs(mini_zip)
    for wnid in [*sorted(photos)[:3], PHOTO_CLASS]:
        (folder / wnid).mkdir(parents=True)
        for name, data in photos[wnid][1:4]:
            (folder / wnid / name).write_bytes(data)
    rotated = folder / PHOTO_CLASS / "phone.jpg"
    rotated.write_bytes(with_orientation(photo, ROTATED, quality=95))
    upright = root / "upright.jpg"
    upright.write_bytes(encoded(photo, "JPEG", quality=JPEG_QUALITY))
    return {
        "root": root,
        "folder": folder,
        "rotated": rotated,
        "upright": upright,
        "run": write_smoke_run(root / "run", "unused"),
    }


def search_first(capsys, query: Path, index_dir: Path) -> dict:
    capsys.readouterr()
    assert search.main([str(query), "--index", str(index_dir), "--top", "3", "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["results"][0]


def test_shards_store_a_rotated_photo_upright_and_search_finds_it(phone_folder, photo, tmp_path, capsys):
    """`ranking shards` re-encodes the rotated JPEG upright (an RGB JPEG at q95 without EXIF, counted as converted);
    an index of those shards, searched with an upright copy of the photo, finds it first at distance < 1e-3.

    The copy is saved as the shard writer saves (RGB JPEG q95), so query and gallery differ by one JPEG round trip of
    almost the same pixels, not by a rotation."""
    shards = tmp_path / "shards"
    manifest = write_shards(phone_folder["folder"], shards, shard_size=4, seed=0)
    assert sum(entry["converted"] for entry in manifest["splits"].values()) == 1
    samples = [
        (json.loads(sample["json"]), sample["jpg"])
        for sample in wds.WebDataset(
            shard_paths(shards, "train"), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
    ]
    assert sorted(bool(meta.get("converted")) for meta, _ in samples) == [False] * 12 + [True]
    meta, jpeg = next((meta, jpeg) for meta, jpeg in samples if meta["file"].endswith("phone.jpg"))
    assert meta["converted"] is True
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(0x0112) is None
        upright_as_stored = pixels(image)
    assert upright_as_stored.shape == (3, 48, 64), "stored upright, not sideways (64 x 48)"
    assert mean_difference(upright_as_stored, pixels(photo)) < 2

    index_dir = tmp_path / "index"
    assert index.main(["--checkpoint", str(phone_folder["run"]), "--images", str(shards), "--out", str(index_dir)]) == 0
    first = search_first(capsys, phone_folder["upright"], index_dir)
    assert first["file"].endswith("phone.jpg") and first["distance"] < 1e-3, first


def test_an_index_of_the_folder_finds_the_rotated_photo_from_an_upright_copy(phone_folder, tmp_path, capsys):
    """`ranking index --images FOLDER` decodes the rotated file upright; ``ranking.load(...).embed`` of its path and
    of the PIL image opened on it give that same embedding."""
    index_dir = tmp_path / "index"
    assert (
        index.main(
            [
                "--checkpoint",
                str(phone_folder["run"]),
                "--images",
                str(phone_folder["folder"]),
                "--out",
                str(index_dir),
                "--mixed-precision",
                "no",
            ]
        )
        == 0
    )  # as embed: full precision
    first = search_first(capsys, phone_folder["upright"], index_dir)
    assert first["file"].endswith("phone.jpg") and first["distance"] < 1e-3, first

    model = ranking.load(phone_folder["run"], device="cpu")
    with Image.open(phone_folder["rotated"]) as opened:
        path, pil, upright = model.embed([phone_folder["rotated"], opened, phone_folder["upright"]])
    assert float((path - pil).pow(2).sum()) < 1e-5  # TorchCodec and PIL decode it; the same pixels or off by one
    assert float((path - upright).pow(2).sum()) < 1e-3
    assert torch.allclose(path, ranking.Index.load(index_dir).embeddings[first["id"]], atol=1e-6)
    assert to_pil(decode_image(phone_folder["rotated"].read_bytes(), "phone.jpg")).size == (64, 48)
