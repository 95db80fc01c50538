"""Result grids: rows of captioned images with coloured borders (the report's ranked results, search's results)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ranking.core.files import write_atomically
from ranking.folders.shardformat import SampleInfo

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

TILE = 128  # pixels of an image in a grid; Tiny ImageNet's 64 px images are upsampled 2x
BORDER = 6
CAPTION = 30  # two lines of text under each tile
GAP = 4
TITLE = 24
CELL_WIDTH = TILE + 2 * BORDER
CELL_HEIGHT = TILE + 2 * BORDER + CAPTION
SAME_CLASS = (30, 160, 60)
OTHER_CLASS = (210, 40, 40)
NEUTRAL = (150, 150, 150)
QUERY = (40, 90, 200)
BACKGROUND = (255, 255, 255)


@dataclass
class Tile:
    """One cell of a grid: an image (or None for a text-only cell), its caption lines and its border colour."""

    image: Image.Image | None
    caption: Sequence[str]
    border: tuple[int, int, int] = NEUTRAL


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    return columns * CELL_WIDTH + (columns + 1) * GAP, TITLE + rows * CELL_HEIGHT + (rows + 1) * GAP


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of a cell's border."""
    return GAP + column * (CELL_WIDTH + GAP), TITLE + GAP + row * (CELL_HEIGHT + GAP)


def draw_grid(rows: Sequence[Sequence[Tile | None]], title: str = "") -> Image.Image:
    """Rows of captioned, bordered tiles (None leaves a cell empty); images are padded to TILE x TILE, bicubic."""
    columns = max((len(row) for row in rows), default=1)
    canvas = Image.new("RGB", grid_size(len(rows), columns), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((GAP, GAP), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is not None:
                _draw_tile(canvas, draw, font, tile, *cell_origin(r, c))
    return canvas


def _draw_tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, font: Font, tile: Tile, x: int, y: int) -> None:
    caption_y = y + TILE + 2 * BORDER + 2
    if tile.image is None:  # a text-only cell: the caption, centred where the image would be
        caption_y = y + TILE // 2
    else:
        draw.rectangle((x, y, x + CELL_WIDTH - 1, y + TILE + 2 * BORDER - 1), fill=tile.border)
        image = ImageOps.pad(tile.image.convert("RGB"), (TILE, TILE), method=Image.Resampling.BICUBIC, color=BACKGROUND)
        canvas.paste(image, (x + BORDER, y + BORDER))
    for i, line in enumerate(tile.caption[:2]):
        draw.text((x + 2, caption_y + 13 * i), _fit(draw, font, line, CELL_WIDTH - 4), fill=(0, 0, 0), font=font)


def _fit(draw: ImageDraw.ImageDraw, font: Font, text: str, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def short_name(info: SampleInfo) -> str:
    """The first of a class's words ("goldfish, Carassius auratus" -> "goldfish")."""
    return (info.words or info.wnid or "?").split(",")[0]


def caption(info: SampleInfo, distance: float) -> list[str]:
    return [f"d={distance:.3f}", short_name(info)]


def save_png(image: Image.Image, path: Path) -> Path:
    return write_atomically(path, lambda f: image.save(f, format="PNG"))
