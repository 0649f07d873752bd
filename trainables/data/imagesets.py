"""Image sets that yield uint8 batches, and the pools a loaded source is cut into them from.

A source loader returns one :data:`Pool` per split it has: a :class:`TensorPool` (every image
decoded into one tensor) or a :class:`StreamPool` (images decoded on demand).
``pool.subset(index, spec)`` then gives the :class:`ImageSet` of a split: an
:class:`InMemoryImageSet` batched by indexing, or a :class:`StreamingImageSet` batched by
DataLoader workers. Both visit images in the same order for the same seed.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

if TYPE_CHECKING:
    from trainables.data.spec import DataSpec

__all__ = [
    "ImageSet",
    "InMemoryImageSet",
    "Pool",
    "StreamPool",
    "StreamingImageSet",
    "TensorPool",
    "epoch_order",
    "indexed_batches",
]


class ImageSet(ABC):
    """Images with labels that yield uint8 batches.

    Attributes:
        labels: int64 tensor ``[N]`` of class indices.
    """

    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(3, H, W)`` of one stored image."""

    @abstractmethod
    def batches(
        self,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate once over the set.

        Args:
            batch_size: Images per batch.
            shuffle: Visit images in a random order drawn from ``seed``.
            seed: Same seed, same order (pass e.g. ``base_seed + epoch``).
            device: Where the yielded tensors live.
            drop_last: Skip a final batch smaller than ``batch_size``.

        Yields:
            ``(images, labels)``: uint8 ``[B, 3, H, W]`` and int64 ``[B]`` on ``device``.
        """


@dataclass
class InMemoryImageSet(ImageSet):
    """A set decoded once into one uint8 tensor, batched by indexing.

    Attributes:
        images: uint8 tensor ``[N, 3, H, W]``.
        labels: int64 tensor ``[N]``.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, channels, height, width = self.images.shape
        return channels, height, width

    def to(self, device: torch.device | str) -> InMemoryImageSet:
        """Return the set with images and labels on ``device`` (moved once, not per batch)."""
        return InMemoryImageSet(images=self.images.to(device), labels=self.labels.to(device))

    def batches(
        self,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return indexed_batches(self.images, self.labels, batch_size=batch_size, shuffle=shuffle,
                               seed=seed, device=device, drop_last=drop_last)


@dataclass
class StreamingImageSet(ImageSet):
    """A set decoded on the fly by DataLoader workers (for sets too big to hold decoded).

    Attributes:
        source: Dataset mapping a source index to a uint8 ``[3, H, W]`` image, or None when the
            file turns out unreadable (that image is then left out of its batch).
        indices: int64 tensor ``[N]`` of the source indices in this set.
        labels: int64 tensor ``[N]``.
        shape: ``(3, H, W)`` of every decoded image.
        num_workers: DataLoader worker processes (0 decodes in the calling process).
    """

    source: Dataset
    indices: Tensor
    labels: Tensor
    shape: tuple[int, int, int]
    num_workers: int = 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def batches(
        self,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        _check_batch_size(batch_size)
        device = torch.device(device)
        # Same permutation as the in-memory set for the same seed, so both paths agree.
        order = epoch_order(len(self), shuffle=shuffle, seed=seed).tolist()
        loader = DataLoader(
            _IndexedView(self.source, self.indices.tolist(), self.labels.tolist()),
            batch_sampler=BatchSampler(order, batch_size=batch_size, drop_last=drop_last),
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def epoch_order(n: int, *, shuffle: bool, seed: int) -> Tensor:
    """The order one epoch visits ``n`` items in: ``0..n-1``, or a permutation drawn from seed.

    Every batched set (and :class:`trainables.cache.FeatureSet`) uses it, so the same seed
    visits the same images whatever holds them.
    """
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


# --------------------------------------------------------------------------- pools


@dataclass
class TensorPool:
    """Every image of one source split decoded into uint8 ``[N, 3, H, W]``, labels ``[N]``."""

    images: Tensor
    labels: np.ndarray

    def subset(self, index: np.ndarray, opts: DataSpec) -> ImageSet:
        """The in-memory set of the images at ``index`` (sorted, unique)."""
        # index is sorted and unique, so full length means "all": keep the view, skip the copy.
        everything = len(index) == len(self.labels)
        images = self.images if everything else self.images[torch.from_numpy(index)]
        return InMemoryImageSet(images=images, labels=torch.from_numpy(self.labels[index]))


@dataclass
class StreamPool:
    """One source split decoded on demand by ``source``, with its labels and stored shape."""

    source: Dataset
    labels: np.ndarray
    shape: tuple[int, int, int]

    def subset(self, index: np.ndarray, opts: DataSpec) -> ImageSet:
        """The streaming set of the images at ``index``, decoded by ``opts.num_workers``."""
        return StreamingImageSet(
            source=self.source,
            indices=torch.from_numpy(index),
            labels=torch.from_numpy(self.labels[index]),
            shape=self.shape,
            num_workers=opts.num_workers,
        )


Pool = TensorPool | StreamPool


# --------------------------------------------------------------------------- batching helpers


def indexed_batches(
    data: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    device: torch.device | str,
    drop_last: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch over tensors held whole (images or cached activations), by indexing.

    Uses :func:`epoch_order`, so every in-memory set visits the same batches for a seed.
    """
    _check_batch_size(batch_size)
    order = epoch_order(len(labels), shuffle=shuffle, seed=seed).to(data.device)
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        if drop_last and index.numel() < batch_size:
            break
        yield (
            data[index].to(device, non_blocking=True),
            labels[index].to(device, non_blocking=True),
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@dataclass
class _IndexedView(Dataset):
    source: Dataset
    indices: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        return self.source[self.indices[index]], self.labels[index]


def _collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor, Tensor]:
    # Unreadable files come back as None: drop them rather than fail the whole batch.
    kept = [(image, label) for image, label in items if image is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = torch.stack([image for image, _ in kept])
    return images, torch.tensor([label for _, label in kept], dtype=torch.int64)
