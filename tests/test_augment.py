"""Device-side image transforms (ranking/data/augment.py) against torchvision's per-image transforms, on the CPU."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ranking.data.augment import (
    CropBoxes,
    EvalResize,
    StoredDecoder,
    TrainAugment,
    collate_samples,
    seeded_generator,
)
from ranking.data.stream import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_images(n: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)


def jpeg(mode: str = "RGB", size: tuple[int, int] = (64, 64)) -> bytes:
    image = Image.new(mode, size)
    image.putdata(
        [
            (x * 4) % 256 if mode == "L" else ((x * 4) % 256, (y * 4) % 256, 128)
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def normalized(images: torch.Tensor) -> torch.Tensor:
    return TF.normalize(images.float() / 255, list(MEAN), list(STD))


# ----------------------------------------------------------------------------------------------- crop parameters


def test_crops_are_reproducible_for_a_seed_and_differ_for_another():
    augment, images = TrainAugment(48, MEAN, STD), random_images(8)
    a, b = augment(images, seeded_generator(0, rank=0)), augment(images, seeded_generator(0, rank=0))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(images, seeded_generator(1, rank=0)))
    assert not torch.equal(a, augment(images, seeded_generator(0, rank=1))), "each rank augments its own way"
    assert not torch.equal(a, augment(images, seeded_generator(0, rank=0, worker=1))), "and each worker"
    assert torch.equal(
        augment(images, seeded_generator(5, rank=2, worker=3)), augment(images, seeded_generator(5, rank=2, worker=3))
    )
    boxes = augment.sample_boxes(8, 64, 64, torch.Generator().manual_seed(3))
    again = augment.sample_boxes(8, 64, 64, torch.Generator().manual_seed(3))
    assert torch.equal(boxes.boxes, again.boxes) and torch.equal(boxes.flips, again.flips)


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (80, 30)])
def test_crops_lie_inside_the_image_in_whole_pixels(height, width):
    augment = TrainAugment(160, MEAN, STD)
    boxes, flips = augment.sample_boxes(5000, height, width, torch.Generator().manual_seed(0))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    assert torch.equal(boxes, boxes.round()), "whole pixels, as RandomResizedCrop"
    area = (x2 - x1) * (y2 - y1) / (height * width)
    assert area.max() <= 1 and area.min() > 0.4  # scale (0.5, 1) up to rounding (or the fallback's centre crop)
    assert 0.4 < flips.float().mean() < 0.6


def test_crop_distribution_is_random_resized_crops():
    """Sizes and offsets have the moments of v2.RandomResizedCrop's parameters (drawn with torch's global RNG)."""
    n = 4000
    boxes = TrainAugment(160, MEAN, STD).sample_boxes(n, 64, 64, torch.Generator().manual_seed(0)).boxes
    ours = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 0], boxes[:, 1]], dim=1)
    crop = v2.RandomResizedCrop(160, scale=(0.5, 1.0), antialias=True)
    make_params = getattr(crop, "make_params", None) or crop._get_params  # renamed in torchvision 0.21
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    params = [make_params([image]) for _ in range(n)]
    theirs = torch.tensor([[p["width"], p["height"], p["left"], p["top"]] for p in params], dtype=torch.float32)
    assert torch.allclose(ours.mean(0), theirs.mean(0), atol=0.4), (ours.mean(0), theirs.mean(0))
    assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.08), (ours.std(0), theirs.std(0))


# ----------------------------------------------------------------------------------------------- pixels


def test_output_shape_dtype_and_normalisation():
    augment = TrainAugment(40, MEAN, STD)
    images = torch.stack([torch.full((3, 64, 64), value, dtype=torch.uint8) for value in (0, 100, 255)])
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 40, 40) and out.dtype == torch.float32
    floats = images.float()
    augment(floats, torch.Generator().manual_seed(0))
    assert torch.equal(floats, images.float()), "float input is left as it was"
    expected = normalized(images[:, :, :1, :1]).expand_as(out)  # a flat image stays flat whatever the crop
    assert torch.allclose(out, expected, atol=1e-5)


def test_crop_and_resize_is_torchvisions_bilinear_resized_crop():
    """Upsampling: the whole image equals v2's antialiased resize; a crop equals v2's resized crop except its outer
    pixels, which interpolate with the image around the crop instead of repeating the crop's edge."""
    augment, images = TrainAugment(160, MEAN, STD), random_images(2)
    whole = CropBoxes(torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2), torch.tensor([False, False]))
    expected = normalized(TF.resize(images.float(), [160, 160], antialias=True))
    assert torch.allclose(augment(images, crops=whole), expected, atol=1e-4)

    left, top, width, height = 5, 7, 45, 52
    crop = CropBoxes(
        torch.tensor([[left, top, left + width, top + height]] * 2, dtype=torch.float32), torch.tensor([False, False])
    )
    expected = normalized(TF.resized_crop(images.float(), top, left, height, width, [160, 160], antialias=True))
    inner = (..., slice(2, -2), slice(2, -2))
    assert torch.allclose(augment(images, crops=crop)[inner], expected[inner], atol=1e-4)


def test_flip_mirrors_the_crop():
    image = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    image[..., :16] = 255  # bright on the left only
    augment = TrainAugment(96, MEAN, STD)
    box = torch.tensor([[4.0, 2.0, 52.0, 60.0]])
    plain = augment(image, crops=CropBoxes(box, torch.tensor([False])))
    flipped = augment(image, crops=CropBoxes(box, torch.tensor([True])))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    assert plain[..., :20].mean() > plain[..., -20:].mean() and flipped[..., -20:].mean() > flipped[..., :20].mean()
    # random draws: about half the images come out bright on the right
    out = augment(image.expand(200, -1, -1, -1), torch.Generator().manual_seed(0))
    bright_right = (out[..., -10:].mean(dim=(1, 2, 3)) > out[..., :10].mean(dim=(1, 2, 3))).float().mean()
    assert 0.35 < bright_right < 0.65


def test_downsampling_averages_instead_of_aliasing():
    """A one-pixel checkerboard shrunk 64 -> 32 becomes flat grey, not another checkerboard."""
    board = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255).to(torch.uint8)
    image = board.expand(1, 3, 64, 64)
    out = TrainAugment(32, (0.0,) * 3, (1.0,) * 3)(
        image, crops=CropBoxes(torch.tensor([[0.0, 0, 64, 64]]), torch.tensor([False]))
    )
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.02)


@pytest.mark.parametrize("size, height, width", [(160, 64, 64), (48, 64, 64), (56, 64, 80), (64, 64, 64)])
def test_eval_resize_is_the_eval_transform(size, height, width):
    images = random_images(3, height, width)
    batched = EvalResize(size, MEAN, STD)(images)
    one_by_one = torch.stack([eval_transform(size, MEAN, STD)(image) for image in images])
    assert batched.shape == (3, 3, size, size) and batched.dtype == torch.float32
    assert (batched - one_by_one).abs().max() < 1e-3


def test_eval_resize_takes_images_of_different_sizes():
    images = [random_images(1, 48, 64)[0], random_images(1, 64, 64)[0], random_images(1, 100, 30)[0]]
    resize = EvalResize(32, MEAN, STD)
    assert torch.equal(resize(images), torch.cat([resize(image) for image in images]))
    same, labels, ids = collate_samples([(image, 1, 7) for image in images[:1] * 2])
    assert isinstance(same, torch.Tensor) and same.shape == (2, 3, 48, 64) and torch.equal(ids, torch.tensor([7, 7]))
    mixed, _, _ = collate_samples([(image, 0, i) for i, image in enumerate(images)])
    assert isinstance(mixed, list) and [tuple(image.shape) for image in mixed] == [tuple(i.shape) for i in images]


def test_eval_resize_embeddings_equal_torchvisions_within_bf16_tolerance():
    """The model's embeddings of uint8 images through EvalResize (as ``ranking evaluate`` and ``ranking search``
    make them, on the device) equal those through torchvision v2's Resize, CenterCrop and Normalize."""
    from ranking.core.config import TrainConfig
    from ranking.learning.models import ModelSpec, build_model, input_normalization
    from ranking.retrieval.embed import embed_images

    cfg = TrainConfig(
        backbone="resnet18", pretrained=False, freeze_bn_stats=False, frozen_stages=0, embed_dim=16, image_size=48
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mean, std = input_normalization(cfg.backbone)
    torchvision_eval = v2.Compose(
        [
            v2.Resize(cfg.image_size, antialias=True),
            v2.CenterCrop(cfg.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    batch = random_images(6, seed=1)
    with torch.inference_mode():
        ours = model(EvalResize(cfg.image_size, mean, std)(batch))
        reference = model(torch.stack([torchvision_eval(image) for image in batch]))
    torch.testing.assert_close(ours, reference, rtol=1.6e-2, atol=1e-5)  # torch.testing's bf16 tolerances

    odd = [random_images(1, 50, 90, seed=2)[0], random_images(1, 120, 64, seed=3)[0]]  # query files: any size
    searched = embed_images(model, ModelSpec.of(cfg), odd)
    with torch.inference_mode():
        reference = model(torch.stack([torchvision_eval(image) for image in odd]))
    torch.testing.assert_close(searched, reference, rtol=1.6e-2, atol=1e-5)


# ----------------------------------------------------------------------------------------------- worker side


def test_stored_decoder_gives_a_fixed_size_and_pickles():
    decoder = pickle.loads(pickle.dumps(StoredDecoder(64)))
    odd = decoder(jpeg(size=(80, 48)), "x")
    assert odd.shape == (3, 64, 64) and odd.dtype == torch.uint8
    batch = torch.stack([decoder(jpeg()), odd, decoder(jpeg(size=(32, 32)))])  # as the samplers stack a batch
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8
    assert batch[0].numel() * batch.element_size() == 12288  # what crosses from a worker per image
    assert StoredDecoder(None)(jpeg(size=(80, 48))).shape == (3, 48, 80), "None keeps the stored size"


def test_eval_resize_takes_one_image():
    image = random_images(1, 48, 64)[0]
    assert torch.equal(EvalResize(32, MEAN, STD)(image), EvalResize(32, MEAN, STD)(image[None]))
