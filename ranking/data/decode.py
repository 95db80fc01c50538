"""The one image decoder: encoded bytes of any image -> an upright RGB uint8 tensor ``[3, H, W]``.

Every reader of pixels comes here: DataLoader workers decoding shard records (``augment.StoredDecoder``, training and
evaluation), ``ranking index`` of shards or of a folder, ``ranking search``'s queries, ``ranking.load(...).embed``,
and ``ranking shards``, which checks each JPEG it keeps and decodes each image it converts. So a photo gives the
same pixels whichever way it reaches the network: in a shard, in a folder or as a query.

- JPEGs are decoded by TorchCodec (libjpeg-turbo on the CPU, nvJPEG on CUDA), which torchvision 0.29 deprecates
  its own ``torchvision.io`` decoders for. It decodes every JPEG of the Tiny ImageNet zips in ../shared/data
  (110,770: the 160- and 40-class subsets and the mini zip) to exactly the uint8 that ``torchvision.io.decode_jpeg``
  gave, at the same speed (``bench/bench_decode.py``), and needs no FFmpeg for images. It applies a JPEG's EXIF
  orientation (every phone photo has one), on the CPU and on CUDA alike.
- Other formats (PNG, WebP, GIF, BMP, TIFF...) are decoded by PIL, which reads more of them than TorchCodec;
  they are lossless or rare, and PIL is what converted them before. Its EXIF orientation is applied too.
- Transparency is composited over white; grayscale, palette and CMYK images come out as RGB.
- ``MAX_IMAGE_PIXELS``: an image declaring more pixels is refused from its header, before decoding
  (``decode_image``, ``read_header``). The workers' ``decode_jpeg`` reads shard records, whose every image passed
  that check when ``ranking shards`` wrote it; it skips the header read, which would cost as much as the decoding.
- Whatever does not decode is one line, a ``RankingError`` "WHERE: cannot decode (REASON)".
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchcodec.decoders import decode_jpeg as _torchcodec_decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

from ranking.core.errors import RankingError

MAX_IMAGE_PIXELS = 64 * 2**20  # decoding takes 3 bytes a pixel: 192 MiB at most
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture file, a JPEG followed by others
EXIF_ORIENTATION = 0x0112
REDUCE_MARGIN = 2  # an image decoded reduced keeps at least twice the shorter side it will be resized to
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Header:
    """What an image file declares before its pixels: PIL's format name and mode, its size, and for a JPEG its EXIF
    orientation (1: stored upright; other formats are decoded by PIL, which applies theirs)."""

    format: str
    width: int
    height: int
    mode: str
    orientation: int = 1


def read_header(source: bytes | str | os.PathLike, where: str) -> Header:
    """The header of encoded bytes or of a file (only its first bytes are read), the pixel limit checked."""
    try:
        with _open(source) as image:
            return _header(image, where)
    except _PIL_ERRORS as e:
        raise _cannot_decode(where, e) from None


def decode_image(data: bytes, where: str, shorter_side: int | None = None) -> Tensor:
    """Any image PIL or TorchCodec reads -> uint8 ``[3, H, W]``, upright RGB, transparency over white; the pixel
    limit checked from the header first. ``where`` names the file in a RankingError.

    ``shorter_side``: the shorter side the caller resizes to (a model's eval resize to S). An image at least
    2 x REDUCE_MARGIN times as large is decoded reduced by 2, 4 or 8 (``reduction``), keeping at least REDUCE_MARGIN
    x S: a JPEG by libjpeg's DCT scaling (PIL's draft mode), so its full size is never in memory; other formats are
    reduced (box filter) right after decoding. Twelve 8000x8000 photos then take megabytes, not gigabytes. The
    margin leaves the final antialiased resize to set the pixels, and images of a few times S (Tiny ImageNet's
    64 px at S = 32, say) decode exactly as the workers decode shard records.
    """
    try:
        with _open(data) as image:
            header = _header(image, where)
            factor = reduction(header, shorter_side)
            if header.format not in JPEG_FORMATS:
                rgb = upright_rgb(image)
                return pil_to_tensor(rgb.reduce(factor) if factor > 1 else rgb)
            if factor > 1:
                image.draft("RGB", (header.width // factor, header.height // factor))
                return pil_to_tensor(upright_rgb(image))
    except _PIL_ERRORS as e:
        raise _cannot_decode(where, e) from None
    return decode_jpeg(data, where)


def reduction(header: Header, shorter_side: int | None) -> int:
    """The largest of 8, 4, 2 that keeps the image's shorter side at least REDUCE_MARGIN x ``shorter_side`` (1:
    decode at full size; always 1 without ``shorter_side``)."""
    if not shorter_side:
        return 1
    shorter = min(header.width, header.height)
    return next((factor for factor in (8, 4, 2) if shorter // factor >= REDUCE_MARGIN * shorter_side), 1)


def decode_jpeg(data: bytes, where: str = "?") -> Tensor:
    """A JPEG -> uint8 ``[3, H, W]`` RGB (grayscale and CMYK JPEGs too), EXIF orientation applied: the workers'
    decoder of shard records, without ``decode_image``'s header read. ``where`` names the sample in the error
    (``"shard: sample key"``, as ``stream.Record.source``)."""
    try:
        return cast(Tensor, _torchcodec_decode_jpeg(_as_tensor(data, where), mode="RGB"))  # one in, one out
    except (RuntimeError, ValueError) as e:
        raise _cannot_decode(where, e) from None


def decode_jpegs(
    jpegs: Sequence[bytes], sources: Sequence[str] | None = None, device: str | torch.device = "cpu"
) -> list[Tensor]:
    """Many JPEGs -> uint8 ``[3, H, W]`` tensors on ``device``: on CUDA in one nvJPEG call, on the CPU one by one.

    If a CUDA batch fails, the images are decoded one by one on the CPU, so that the error names the broken one.
    """
    sources = list(sources) if sources is not None else ["?"] * len(jpegs)
    if not jpegs:
        return []
    if torch.device(device).type == "cpu":
        return [decode_jpeg(jpeg, source) for jpeg, source in zip(jpegs, sources)]
    try:
        return list(
            _torchcodec_decode_jpeg(
                [_as_tensor(jpeg, source) for jpeg, source in zip(jpegs, sources)], mode="RGB", device=device
            )
        )
    except (RuntimeError, ValueError, RankingError):
        images = [decode_jpeg(jpeg, source) for jpeg, source in zip(jpegs, sources)]  # raises, naming the culprit
        return [image.to(device) for image in images]  # decodable one by one: a device failure, not a bad image


def from_pil(image: Image.Image) -> Tensor:
    """A PIL image in memory (``ranking.load(...).embed``) -> uint8 ``[3, H, W]`` as ``decode_image`` makes it from
    its file: EXIF orientation applied, transparency over white."""
    return pil_to_tensor(upright_rgb(image))


def to_pil(image: Tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` -> an RGB PIL image, to draw (thumbnails, grids) or to encode (``ranking shards``)."""
    return to_pil_image(image.cpu(), mode="RGB")


def upright_rgb(image: Image.Image) -> Image.Image:
    """A PIL image decoded, turned upright by its EXIF orientation, and RGB with transparency over white."""
    image.load()
    upright = ImageOps.exif_transpose(image)
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return upright.convert("RGB")


def _open(source: bytes | str | os.PathLike) -> Image.Image:
    """PIL's lazy open (the header only). PIL warns at 85 Mpx and refuses at 170 Mpx by its own limit; ours is lower
    and checked by ``_header``, so its warning is silenced here and its refusal reported as ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _header(image: Image.Image, where: str) -> Header:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise _too_large(where, f"{image.width}x{image.height}")
    orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format in JPEG_FORMATS else 1
    return Header(str(image.format), image.width, image.height, image.mode, int(orientation))


def _too_large(where: str, pixels: str) -> RankingError:
    return RankingError(
        f"{where}: {pixels} pixels, over the limit of {MAX_IMAGE_PIXELS} (ranking.data.decode.MAX_IMAGE_PIXELS)"
    )


def _as_tensor(data: bytes, where: str) -> Tensor:
    if not data:
        raise RankingError(f"{where}: cannot decode (an empty file)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: frombuffer warns on read-only bytes


# TorchCodec's errors start with the C++ function and source line: "decode_rows, /__w/.../DecodeJpeg.cpp:287, "
_SOURCE_LINE = re.compile(r"^\w+, \S+:\d+, ")
_PIXEL_COUNT = re.compile(r"Image size \((\d+) pixels\)")


def _cannot_decode(where: str, error: Exception) -> RankingError:
    """One line naming ``where``, never the decoder's own object names (PIL's ``<_io.BytesIO object at 0x...>``)."""
    if isinstance(error, Image.DecompressionBombError):
        found = _PIXEL_COUNT.search(str(error))
        return _too_large(where, found.group(1) if found else "too many")
    if isinstance(error, UnidentifiedImageError):
        return RankingError(f"{where}: cannot decode (not an image file)")
    lines = str(error).strip().splitlines()
    reason = _SOURCE_LINE.sub("", lines[0]) if lines else type(error).__name__
    return RankingError(f"{where}: cannot decode ({reason})")
