"""Batched image transforms on the training device: DataLoader workers ship images as stored, the device makes pixels.

A Tiny ImageNet image is stored as a 64 px JPEG of about 2 KB. Augmenting it in a DataLoader worker (PIL decode,
random resized crop to 160 px, float32, normalise) makes 307 KB per image to cross to the training process and costs
the worker most of its time, which left the GPU idle most of each step. The path here splits the work:

- worker: ``StoredDecoder`` (``decode.decode_jpeg``, then ``fit_stored_size``): JPEG bytes -> uint8 ``[3, s, s]`` at
  the stored size ``s`` (64: 12 KB); the samplers stack a batch into uint8 ``[N, 3, s, s]`` as they stack float images.
- device: ``TrainAugment`` (a random resized crop and flip of its own for each image, resize, normalise: one
  ``roi_align`` for the whole batch) or ``EvalResize`` (resize, centre crop, normalise) -> float ``[N, 3, S, S]``.

``decode.decode_jpegs`` decodes a list of JPEGs in one call, on the GPU where ``device="cuda"`` (nvJPEG), for a path
where even the decoding moves to the device.

Where it runs:
- training (``loader.train_batches``): workers decode with ``StoredDecoder().image``; the samplers stack uint8
  ``[N, 3, 64, 64]`` batches (pinned by the DataLoader); the training loop moves a batch to its device and runs
  ``TrainAugment`` there, its crops drawn from ``seeded_generator(batches seed, rank)``, then the model.
- evaluation (``stream.eval_samples``, ``embed.embed_split``): workers decode with ``StoredDecoder(None)`` (the size
  as stored: folder sources hold images of any size), ``collate_samples`` stacks a batch (a list where sizes differ),
  and ``EvalResize`` makes the model's input on the device; ``embed.embed_images`` (``ranking search``'s query files,
  any size) runs the same ``EvalResize`` on each image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from ranking.data.decode import decode_jpeg

STORED_SIZE = 64  # every Tiny ImageNet image is 64 x 64


# ------------------------------------------------------------------------------------------------- worker side


def fit_stored_size(image: Tensor, stored_size: int = STORED_SIZE) -> Tensor:
    """uint8 ``[3, h, w]`` -> ``[3, s, s]``: images of another size (none in Tiny ImageNet) are resized to the stored
    size, aspect ratio not kept, so that every batch stacks into one tensor of a fixed shape."""
    if tuple(image.shape[-2:]) == (stored_size, stored_size):
        return image
    return TF.resize(image, [stored_size, stored_size], antialias=True)


def collate_samples(samples: Sequence[tuple[Tensor, int, int]]) -> tuple[Tensor | list[Tensor], Tensor, Tensor]:
    """A DataLoader's ``collate_fn`` for ``(uint8 image, label, id)`` samples of any size: the images stacked into
    one ``[N, 3, h, w]`` tensor when they share a size (every Tiny ImageNet batch), else a list (``EvalResize`` takes
    both), and the labels and ids as long tensors."""
    images = [sample[0] for sample in samples]
    same = all(image.shape == images[0].shape for image in images)
    return (
        torch.stack(images) if same else images,
        torch.tensor([sample[1] for sample in samples]),
        torch.tensor([sample[2] for sample in samples]),
    )


class StoredDecoder:
    """JPEG bytes -> uint8 ``[3, s, s]``; picklable, for DataLoader workers (``decode=StoredDecoder().image`` for
    ``sampling.build_batches``): the batch's images stay uint8. ``stored_size=None`` keeps each image's own size."""

    def __init__(self, stored_size: int | None = STORED_SIZE) -> None:
        self.stored_size = stored_size

    def __call__(self, jpeg: bytes, source: str = "?") -> Tensor:
        image = decode_jpeg(jpeg, source)
        return image if self.stored_size is None else fit_stored_size(image, self.stored_size)

    def image(self, record: Any) -> Tensor:  # a stream.Record: image bytes, label, id, source
        return self(record.image, record.source)

    def sample(self, record: Any) -> tuple[Tensor, int, int]:
        return self.image(record), record.label, record.id


# ------------------------------------------------------------------------------------------------- device side


def seeded_generator(seed: int, rank: int = 0, worker: int = 0) -> torch.Generator:
    """A CPU generator of its own for each (seed, rank, worker), by the same recipe as ``stream.worker_seed``.

    The crop parameters are drawn on the CPU whatever the device of the images, so a seed gives the same crops on
    a CPU and on a GPU.
    """
    state = np.random.SeedSequence([seed % 2**64, rank, worker]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class CropBoxes(NamedTuple):
    boxes: Tensor  # [N, 4] float (x1, y1, x2, y2) in pixels: the crop covers pixels x1 <= x < x2, y1 <= y < y2
    flips: Tensor  # [N] bool: mirror this image


class _PerDevice:
    """Constant tensors made once per device: copying them from pageable host memory at each call would make the
    CPU wait for the GPU's queued work (PyTorch synchronises a blocking host-to-device copy)."""

    def __init__(self, make) -> None:
        self.make = make
        self.made: dict[torch.device, torch.Tensor] = {}

    def __call__(self, device: torch.device):
        if device not in self.made:
            self.made[device] = self.make(device)
        return self.made[device]


def _mean_std(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, Tensor]:
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
        torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
    )


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor to ``device`` without making the CPU wait for the GPU (pinned, non-blocking)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class TrainAugment:
    """uint8 ``[N, 3, h, w]`` on any device -> float32 ``[N, 3, S, S]``, normalised: for each image its own random
    resized crop (the distribution of ``v2.RandomResizedCrop(S, scale, ratio)``) and horizontal flip (p = 0.5).

    The crops and resizes of the whole batch are one ``torchvision.ops.roi_align`` call, each image with its box:
    torchvision is already a dependency (kornia would be a new one for one op), and ``roi_align`` is a maintained,
    deterministic bilinear sampler that takes a box of its own size for each image, on the CPU and on CUDA. With
    ``aligned=True`` and one sample per output pixel it is exactly bilinear resizing (``align_corners=False``) of the
    crop, which is what ``antialias=True`` resizing does when it upsamples (64 px crops to 160 px); the pixels of the
    outer row and column interpolate with the image beyond the crop instead of repeating the crop's edge. To
    downsample (a crop larger than S), ``sampling_ratio=0`` averages ceil(crop / S) x ceil(crop / S) samples per
    output pixel, a box filter against aliasing. A flipped image is mirrored with its box before the crop.

    Parameters come from the ``torch.Generator`` passed in (``seeded_generator``), drawn on the CPU: the same
    generator state gives the same crops on any device. They reach a GPU in one pinned, non-blocking copy, and the
    normalisation constants are made once per device, so a call never makes the CPU wait for the GPU.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad scale {scale} or ratio {ratio}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio = scale, ratio

        def scale_shift(device: torch.device) -> tuple[Tensor, Tensor]:  # uint8 * scale + shift: normalised
            mean_t, std_t = _mean_std(self.mean, self.std, device)
            return 1.0 / (255.0 * std_t), -mean_t / std_t

        self._scale_shift = _PerDevice(scale_shift)

    def sample_boxes(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None, attempts: int = 10
    ) -> CropBoxes:
        """``v2.RandomResizedCrop``'s parameters for n images at once: up to ``attempts`` draws of an area fraction
        in ``scale`` and a log-uniform aspect ratio in ``ratio``, rounded to whole pixels; the first draw that fits
        the image is placed uniformly at integer offsets; if none fits, the centre crop closest to ``ratio``."""
        area = height * width
        fractions = torch.empty(n, attempts).uniform_(self.scale[0], self.scale[1], generator=generator)
        log_ratios = torch.empty(n, attempts).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator
        )
        aspect = log_ratios.exp()
        target = area * fractions
        w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round in torchvision
        h = torch.round(torch.sqrt(target / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

        fallback_w, fallback_h = self._fallback(height, width)
        found = fits.any(dim=1)
        w = torch.where(found, w, torch.full_like(w, fallback_w))
        h = torch.where(found, h, torch.full_like(h, fallback_h))
        offsets = torch.rand(n, 2, generator=generator)  # uniform integer offsets in [0, size - crop]
        top = torch.where(
            found,
            torch.minimum(torch.floor(offsets[:, 0] * (height - h + 1)), height - h),
            torch.full_like(h, (height - fallback_h) // 2),
        )
        left = torch.where(
            found,
            torch.minimum(torch.floor(offsets[:, 1] * (width - w + 1)), width - w),
            torch.full_like(w, (width - fallback_w) // 2),
        )
        flips = torch.rand(n, generator=generator) < 0.5
        return CropBoxes(torch.stack([left, top, left + w, top + h], dim=1), flips)

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            return width, round(width / min(self.ratio))
        if in_ratio > max(self.ratio):
            return round(height * max(self.ratio)), height
        return width, height

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, crops: CropBoxes | None = None
    ) -> Tensor:
        """Augment a uint8 (or float in [0, 255]) batch where it lies; ``crops`` overrides the random draw."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W]; got {list(images.shape)}")
        n, _, height, width = images.shape
        if crops is None:
            crops = self.sample_boxes(n, height, width, generator)
        device = images.device
        scale, shift = self._scale_shift(device)
        # Normalise and mirror the stored pixels, 6x fewer than the output's at 160 px: bilinear weights sum to
        # one, so normalising first is exact, and resizing the mirrored crop is mirroring the resized crop.
        pixels = torch.addcmul(shift, images.float(), scale)  # a new tensor, even when the images are float32
        x1, y1, x2, y2 = crops.boxes.float().cpu().unbind(1)
        mirrored = crops.flips.cpu()
        x1, x2 = torch.where(mirrored, width - x2, x1), torch.where(mirrored, width - x1, x2)
        # (image index, box, flip) in one small copy to the device
        rois = _to_device(
            torch.stack([torch.arange(n, dtype=torch.float32), x1, y1, x2, y2, mirrored.float()], dim=1), device
        )
        flips, rois = rois[:, 5] > 0.5, rois[:, :5].contiguous()
        pixels = torch.where(flips.view(n, 1, 1, 1), pixels.flip(-1), pixels)
        # one sample per output pixel when every crop is upsampled (the same as sampling_ratio=0, and faster)
        sampling_ratio = 1 if max(height, width) <= self.image_size else 0
        return roi_align(
            pixels,
            rois,
            output_size=(self.image_size, self.image_size),
            spatial_scale=1.0,
            sampling_ratio=sampling_ratio,
            aligned=True,
        )


class EvalResize:
    """uint8 ``[N, 3, h, w]`` on any device -> float32 ``[N, 3, S, S]``, normalised (one ``[3, h, w]`` gives
    ``[1, 3, S, S]``; a list of images of different sizes is resized one by one and concatenated): the
    ``torchvision.transforms.v2.functional`` ops of ``stream.eval_transform`` (shorter side to S with antialiasing,
    centre crop, scale to [0, 1], normalise), applied to the whole batch at once."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        self._mean_std = _PerDevice(lambda device: _mean_std(self.mean, self.std, device))

    def __call__(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(images, Tensor):
            return torch.cat([self(image) for image in images])
        if images.dim() == 3:
            images = images.unsqueeze(0)
        resized = TF.resize(images, [self.image_size], antialias=True)
        cropped = TF.center_crop(resized, [self.image_size, self.image_size])
        mean, std = self._mean_std(images.device)  # TF.normalize's own sub_ and div_, its mean and std made once
        return TF.to_dtype(cropped, torch.float32, scale=True).sub_(mean).div_(std)
