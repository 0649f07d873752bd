"""Crops and resizes of images: once when a set is stored, and per batch on the trial's device.

* Store time: :func:`to_rgb` turns a decoded file into 8-bit RGB (16-bit scaled, not clipped);
  :func:`fit_array` (one PIL image) and :func:`fit_tensor` (a uint8 tensor of
  images) take the central square at the stored side, so the stored set does not depend on
  the searched resolution.
* Train time: :func:`preprocess` resizes (or randomly crops and flips) a uint8 batch to the
  trial's resolution and normalises it, batched, on whatever device holds the batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

__all__ = ["chw_tensor", "fit_array", "fit_tensor", "preprocess", "to_rgb"]

# TIFF tag BitsPerSample: how many of a 32-bit integer ("I") image's bits its samples use.
_TIFF_BITS_PER_SAMPLE = 258


def preprocess(
    images: Tensor,
    *,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Turn a uint8 batch into the normalised float input of a network, on its own device.

    Without ``augment`` the central square is resized to ``resolution`` (bilinear, antialiased
    when shrinking). With ``augment`` every image gets its own random crop (area 60-100 % of the
    central square, aspect 3/4-4/3) and a horizontal flip with probability 1/2, all in one batched
    ``grid_sample``.

    Args:
        images: uint8 ``[B, 3, H, W]`` on any device.
        resolution: Output height and width.
        mean: Per-channel mean of the pretrained weights (on the 0-1 scale).
        std: Per-channel standard deviation of the pretrained weights.
        augment: Apply random crop and flip (training batches).
        generator: Source of the augmentation randomness (any device); global RNG when None.

    Returns:
        float32 ``[B, 3, resolution, resolution]`` on the device of ``images``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral):
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values (std > 0), got mean={mean}, std={std}")
    x = images.to(torch.float32).div_(255.0)
    x = _random_crop_flip(x, int(resolution), generator) if augment else _center(x, resolution)
    mean_t = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


# --------------------------------------------------------------------------- store time


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image, with 16- and 32-bit grayscale scaled instead of clipped.

    PIL's ``convert("RGB")`` clips integer grayscale (modes ``I;16*`` and ``I``) at 255, so a
    16-bit PNG comes out near-white. Here such samples keep their top 8 bits (``value >> 8``
    for 16 bits, negative values black): the same reduction PIL itself applies when it opens
    16-bit RGB PNGs (as 8-bit ``RGB``), so a 16-bit folder stores like its 8-bit export.
    Every other mode goes through ``convert("RGB")``.
    """
    if image.mode.startswith("I"):  # "I", "I;16", "I;16B", ...: the integer grayscale modes
        samples = np.asarray(image)
        samples = np.maximum(samples, 0) if samples.dtype.kind == "i" else samples
        top = np.minimum(samples >> max(_sample_bits(image) - 8, 0), 255)
        image = Image.fromarray(top.astype(np.uint8))
    return image.convert("RGB")


def _sample_bits(image: Image.Image) -> int:
    if image.mode != "I":
        return 16
    # A TIFF says how deep its samples are (16 signed, 32); PIL's other "I" images come from
    # 16-bit files (PNG in older Pillow, PGM), so without the tag 16 bits is right.
    bits = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE, 16)
    return int(bits[0] if isinstance(bits, tuple) else bits)


def fit_array(image: Image.Image, side: int | None) -> np.ndarray:
    """HWC uint8 array: native size, or the central square resized to ``side``."""
    if side is not None and image.size != (side, side):
        # PIL's bilinear widens its kernel when shrinking, i.e. it antialiases.
        image = ImageOps.fit(image, (side, side), method=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def fit_tensor(images: Tensor, side: int, *, chunk: int = 512) -> Tensor:
    """Central square of uint8 ``[N, 3, H, W]`` resized to ``side`` (antialiased), in chunks."""
    out = torch.empty(len(images), 3, side, side, dtype=torch.uint8)
    # In chunks so a whole dataset is never held as float32 at once.
    for start in range(0, len(images), chunk):
        part = _center_square(images[start : start + chunk]).float()
        part = F.interpolate(
            part, size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def chw_tensor(array: np.ndarray) -> Tensor:
    """A decoded HWC uint8 array as a CHW tensor that owns its memory."""
    # Copied: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# --------------------------------------------------------------------------- train time


def _center_square(x: Tensor) -> Tensor:
    height, width = x.shape[-2:]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    return x[..., top : top + short, left : left + short]


def _center(x: Tensor, resolution: int) -> Tensor:
    height, width = x.shape[-2:]
    short = min(height, width)
    if height != width:
        x = _center_square(x)
    if short == resolution:
        return x
    return F.interpolate(
        x,
        size=(resolution, resolution),
        mode="bilinear",
        align_corners=False,
        antialias=short > resolution,
    )


def _random_crop_flip(x: Tensor, resolution: int, generator: torch.Generator | None) -> Tensor:
    batch, _, height, width = x.shape
    short = min(height, width)
    if short > resolution:
        # Shrink first with antialiasing: grid_sample below has none, so it should only enlarge.
        height, width = round(height * resolution / short), round(width * resolution / short)
        x = F.interpolate(
            x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        short = min(height, width)
    draw_device = generator.device if generator is not None else x.device
    rand = torch.rand(batch, 5, generator=generator, device=draw_device).to(x.device)
    area = 0.6 + 0.4 * rand[:, 0]
    ratio = torch.exp((2 * rand[:, 1] - 1) * math.log(4 / 3))
    # Crop sides as fractions of the full width/height, sized relative to the central square.
    crop_w = (torch.sqrt(area * ratio) * short / width).clamp(max=1.0)
    crop_h = (torch.sqrt(area / ratio) * short / height).clamp(max=1.0)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = crop_w * flip
    theta[:, 0, 2] = (2 * rand[:, 2] - 1) * (1 - crop_w)
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = (2 * rand[:, 3] - 1) * (1 - crop_h)
    grid = F.affine_grid(theta, [batch, 3, resolution, resolution], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
