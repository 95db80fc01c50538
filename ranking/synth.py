"""`ranking synth`: a procedurally generated archive in the official Tiny ImageNet layout, for the demo and tests.

Each class is one combination of shape, colour and texture; every image varies position, scale, rotation, hue,
background and noise, so the classes are distinct yet a model has to learn them. The zip also carries what real
copies of the archive contain: a few grayscale JPEGs, `.DS_Store` files, CRLF line endings and a missing final
newline in `words.txt`, `wnids.txt` in no particular order, directory entries, `*_boxes.txt` files.
Same arguments, same bytes.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageDraw

from ranking.core.errors import ConfigError
from ranking.core.files import check_output_file, write_atomically
from ranking.core.flags import at_least, parse

ROOT = "tiny-imagenet-200"
SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
HUES = ("red", "orange", "yellow", "green", "teal", "sky", "blue", "violet", "magenta")
TEXTURES = ("plain", "horizontal-striped", "vertical-striped", "dotted")
# 7, 9 and 4 are pairwise coprime, so by the Chinese remainder theorem class c -> (c % 7, c % 9, c % 4) gives
# every class below 7 * 9 * 4 its own combination, and neighbouring classes differ in all three attributes.
MAX_CLASSES = len(SHAPES) * len(HUES) * len(TEXTURES)
GRAYSCALE_EVERY = 37  # about 3% of the images are grayscale JPEGs, as in the real data
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip timestamps, for byte-identical archives


@dataclass
class SynthConfig:
    # the archive
    out: str = "synth.zip"  # the zip to write
    classes: int = 10  # each a combination of shape, colour and texture (2 to 252)
    train_per_class: int = 300  # labelled train images of each class
    val_per_class: int = 30  # labelled val images of each class
    test_count: int = 100  # unlabelled test images
    seed: int = 0  # the same seed and sizes give the same bytes

    def validate(self) -> None:
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ConfigError(f"classes must be between 2 and {MAX_CLASSES}; got {self.classes}")
        for name, least in (("train_per_class", 1), ("val_per_class", 1), ("test_count", 0), ("seed", 0)):
            at_least(name, getattr(self, name), least)


@dataclass(frozen=True)
class Style:
    shape: str
    hue: int  # index into HUES
    texture: str


def class_style(index: int) -> Style:
    return Style(SHAPES[index % len(SHAPES)], index % len(HUES), TEXTURES[index % len(TEXTURES)])


def class_wnid(index: int) -> str:
    return f"n9{index:07d}"


def class_words(index: int) -> str:
    style = class_style(index)
    return f"{HUES[style.hue]} {style.texture} {style.shape}"


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the shape (before the rotation `angle`, it is symmetric under a horizontal flip)."""
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(x * 0.8, y * 0.8) for x, y in corners]
    elif shape == "triangle":
        points = [(math.sin(a), -math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == "diamond":
        points = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "cross":
        t = 0.35
        points = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    elif shape == "star":
        points = [
            (
                (1 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                -(1 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5),
            )
            for i in range(10)
        ]
    else:
        raise ValueError(shape)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Soft-edged mask in [0, 1], drawn at twice the size and downsampled."""
    scale = 2
    mask = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = cx * scale, cy * scale, radius * scale
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        draw.ellipse((x - 0.55 * r, y - 0.55 * r, x + 0.55 * r, y + 0.55 * r), fill=0)
    else:
        draw.polygon(_polygon(shape, x, y, r, angle), fill=255)
    return np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255


def _texture(style: Style, rng: np.random.Generator) -> np.ndarray:
    """The class's fill: a colour of its hue, with stripes or dots in a darker shade."""
    hue = style.hue / len(HUES) + rng.uniform(-0.02, 0.02)
    fill = _hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.8, 1.0))
    ink = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.45))
    image = np.broadcast_to(fill, (SIZE, SIZE, 3)).copy()
    period, phase = rng.integers(5, 9), rng.integers(0, 8)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    if style.texture == "horizontal-striped":
        marks = (ys + phase) % period < period // 2
    elif style.texture == "vertical-striped":
        marks = (xs + phase) % period < period // 2
    elif style.texture == "dotted":
        marks = ((xs + phase) % period < 2) & ((ys + phase) % period < 2)
    else:
        marks = np.zeros((SIZE, SIZE), dtype=bool)
    image[marks] = ink
    return image


def _background(rng: np.random.Generator) -> np.ndarray:
    """A muted linear gradient in a random direction."""
    start = _hsv(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.9))
    end = _hsv(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = np.clip(0.5 + (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle), 0, 1)[..., None]
    return start * (1 - t) + end * t


def render_image(class_index: int, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One 64x64 image of the class and the bounding box of its object (x0, y0, x1, y1)."""
    style = class_style(class_index)
    radius = rng.uniform(11, 22)
    cx, cy = rng.uniform(radius - 4, SIZE - radius + 4, size=2)
    angle = rng.uniform(-0.25, 0.25)  # small rotations: stripes stay horizontal or vertical
    mask = _shape_mask(style.shape, cx, cy, radius, angle)
    pixels = mask * _texture(style, rng) + (1 - mask) * _background(rng)
    pixels += rng.normal(0, rng.uniform(2, 10), size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    x0, y0, x1, y1 = (int(np.clip(v, 0, SIZE - 1)) for v in (cx - radius, cy - radius, cx + radius, cy + radius))
    return image, (x0, y0, x1, y1)


def encode_jpeg(image: Image.Image, grayscale: bool, quality: int) -> bytes:
    buffer = io.BytesIO()
    (image.convert("L") if grayscale else image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _image(class_index: int, seed: int, *stream: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """Each image has its own random stream, so it does not depend on the order images are made in."""
    rng = np.random.default_rng([seed, *stream])
    index = stream[-1]
    image, box = render_image(class_index, rng)
    quality = int(rng.integers(75, 96))
    return encode_jpeg(image, grayscale=index % GRAYSCALE_EVERY == GRAYSCALE_EVERY - 1, quality=quality), box


def _lines(rows: list[str], newline: str = "\n", final_newline: bool = True) -> bytes:
    return (newline.join(rows) + (newline if final_newline else "")).encode()


def archive_members(
    classes: int, train_per_class: int, val_per_class: int, test_count: int, seed: int
) -> list[tuple[str, bytes]]:
    """(path inside the zip, bytes) of every member, in the order they are written."""
    rng = np.random.default_rng([seed, 0])
    wnids = [class_wnid(c) for c in range(classes)]
    members: list[tuple[str, bytes]] = [(f"{ROOT}/", b""), (f"{ROOT}/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(8))]

    members.append((f"{ROOT}/wnids.txt", _lines([wnids[c] for c in rng.permutation(classes)])))
    decoys = [f"n8{i:07d}\tsomething else entirely" for i in range(3)]  # words.txt covers all of WordNet
    words = decoys + [f"{wnids[c]}\t{class_words(c)}" for c in range(classes)]
    members.append((f"{ROOT}/words.txt", _lines(words, newline="\r\n", final_newline=False)))

    members.append((f"{ROOT}/train/", b""))
    for c, wnid in enumerate(wnids):
        boxes, images = [], []
        for i in range(train_per_class):
            jpeg, box = _image(c, seed, 1, c, i)
            name = f"{wnid}_{i}.JPEG"
            images.append((f"{ROOT}/train/{wnid}/images/{name}", jpeg))
            boxes.append("\t".join([name, *map(str, box)]))
        members.append((f"{ROOT}/train/{wnid}/{wnid}_boxes.txt", _lines(boxes)))
        members += images

    # val images are numbered in a shuffled class order, as in the real archive
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    annotations = []
    members.append((f"{ROOT}/val/", b""))
    for i, c in enumerate(val_classes):
        jpeg, box = _image(int(c), seed, 2, i)
        members.append((f"{ROOT}/val/images/val_{i}.JPEG", jpeg))
        annotations.append("\t".join([f"val_{i}.JPEG", wnids[c], *map(str, box)]))
    members.append((f"{ROOT}/val/val_annotations.txt", _lines(annotations)))

    members += [(f"{ROOT}/test/", b""), (f"{ROOT}/test/.DS_Store", bytes(16))]
    for i, c in enumerate(rng.integers(0, classes, size=test_count)):
        members.append((f"{ROOT}/test/images/test_{i}.JPEG", _image(int(c), seed, 3, i)[0]))
    return members


def write_synthetic_archive(
    path: str | os.PathLike,
    classes: int = 6,
    train_per_class: int = 40,
    val_per_class: int = 10,
    test_count: int = 10,
    seed: int = 0,
) -> Path:
    """Write the zip atomically; returns the path."""
    SynthConfig(str(path), classes, train_per_class, val_per_class, test_count, seed).validate()

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for name, data in archive_members(classes, train_per_class, val_per_class, test_count, seed):
                info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
                info.external_attr = (0o40755 if name.endswith("/") else 0o100644) << 16
                archive.writestr(info, data)

    return write_atomically(path, write)


def main(argv: list[str] | None = None) -> int:
    config = parse(SynthConfig, argv, "ranking synth", __doc__.splitlines()[0])
    check_output_file(config.out, "--out")
    path = write_synthetic_archive(
        config.out, config.classes, config.train_per_class, config.val_per_class, config.test_count, config.seed
    )
    images = config.classes * (config.train_per_class + config.val_per_class) + config.test_count
    print(f"{path}: {config.classes} classes, {images} images")
    return 0
