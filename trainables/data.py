"""Datasets for a trial: load, split, batch and preprocess images.

A trial gets the experiment's ``data:`` section as a plain dict and calls :func:`load_data`.
Every source ends up as uint8 images ``[N, 3, H, W]`` plus int64 labels:

* small sets (digits, fake, CIFAR-sized torchvision sets, image folders whose decoded size fits in
  ``max_memory_mb``) are decoded once into one tensor and batched by indexing, so an epoch costs
  no worker processes and the whole set can move to the GPU once;
* larger folders stream through a :class:`torch.utils.data.DataLoader` whose workers decode and
  resize to ``image_size`` and yield the same uint8 batches.

Resizing to the trial's resolution, augmentation and normalisation happen later, batched, on the
trial's device (:func:`preprocess`), so the stored set does not depend on the searched resolution.

Splits are stratified and seeded: the same ``seed`` gives the same train/validation split, and
``samples_per_class`` subsamples the training split only, so validation stays comparable across
data-size experiments.

Keys of the ``data:`` section (only ``source`` is required; None means "not set"):

* ``source``: ``digits`` (scikit-learn's 8x8 handwritten digits), ``imagefolder``, ``fake``
  (torchvision ``FakeData``) or ``torchvision:<Name>`` (any ``torchvision.datasets`` class).
* ``path``, ``val_path``: image folder root with one subfolder per class, and an optional separate
  validation folder with the same subfolders (otherwise ``val_fraction`` is split off).
* ``root`` (default ``~/.cache/ftsearch/datasets``), ``download`` (default false): passed to the
  torchvision class; its own ``train=True/False`` split is used where it has one.
* ``samples_per_class``: keep that many training images per class (seeded).
* ``val_fraction`` (0.2), ``seed`` (overrides the ``seed`` argument of :func:`load_data`).
* ``image_size`` (256): side of the central square images are stored at when they vary in size
  or are larger; images that all share one size no larger than this keep it (CIFAR, MNIST).
* ``fake_size`` (200), ``fake_classes`` (10): size of the ``fake`` source.
* ``on_bad_file`` (``warn``): skip unreadable image files with one warning, or ``error``.
* ``num_workers`` (2), ``max_memory_mb`` (2048): folders bigger than this once decoded stream
  through that many DataLoader workers.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

__all__ = [
    "DATA_SOURCES",
    "IMAGE_EXTENSIONS",
    "TORCHVISION_PREFIX",
    "DataSplits",
    "ImageSet",
    "InMemoryImageSet",
    "StreamingImageSet",
    "check_data_spec",
    "load_data",
    "preprocess",
]

DATA_SOURCES = ("digits", "imagefolder", "fake")
TORCHVISION_PREFIX = "torchvision:"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

_LOG = logging.getLogger(__name__)

# Every valid key of the data section with its default; None means "not set".
_DEFAULTS: dict[str, Any] = {
    "source": None,
    "path": None,
    "val_path": None,
    "root": "~/.cache/ftsearch/datasets",
    "download": False,
    "samples_per_class": None,
    "val_fraction": 0.2,
    "seed": None,
    "image_size": 256,
    "fake_size": 200,
    "fake_classes": 10,
    "on_bad_file": "warn",
    "num_workers": 2,
    "max_memory_mb": 2048,
}
# Keys that only mean something for some sources: setting them elsewhere is a mistake worth naming.
_SOURCE_ONLY = {
    "path": ("imagefolder",),
    "val_path": ("imagefolder",),
    "root": ("torchvision",),
    "download": ("torchvision",),
    "fake_size": ("fake",),
    "fake_classes": ("fake",),
}
_BAD_FILE_CHOICES = ("warn", "error")
_POPULAR_TORCHVISION = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN", "STL10")
_MAX_NAMED_BAD_FILES = 5


# --------------------------------------------------------------------------- image sets


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
        _check_batch_size(batch_size)
        order = _order(len(self), shuffle=shuffle, seed=seed).to(self.images.device)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            if drop_last and index.numel() < batch_size:
                break
            yield (
                self.images[index].to(device, non_blocking=True),
                self.labels[index].to(device, non_blocking=True),
            )


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
        order = _order(len(self), shuffle=shuffle, seed=seed).tolist()
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


@dataclass
class DataSplits:
    """Train and validation sets of one dataset.

    Attributes:
        train: Training images (subsampled when ``samples_per_class`` is set).
        val: Validation images.
        class_names: Name of each class index.
    """

    train: ImageSet
    val: ImageSet
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier head's output size)."""
        return len(self.class_names)


# --------------------------------------------------------------------------- public functions


def check_data_spec(spec: Mapping[str, Any]) -> None:
    """Validate a ``data:`` section without decoding any image.

    Checks keys, types and ranges, the source name, and for image folders that the folders exist
    and hold at least two class subfolders with image files.

    Args:
        spec: The experiment's ``data:`` section.

    Raises:
        ValueError: Naming the offending ``data.<key>`` and the valid choices.
    """
    opts = _parse_spec(spec)
    if opts.source == "imagefolder":
        names, _ = _scan_folder(opts.path, field="data.path")
        if opts.val_path is not None:
            val_names, _ = _scan_folder(opts.val_path, field="data.val_path")
            _check_same_classes(names, val_names)
    elif opts.source.startswith(TORCHVISION_PREFIX):
        _torchvision_class(opts.source[len(TORCHVISION_PREFIX) :])


def load_data(spec: Mapping[str, Any], *, seed: int = 0) -> DataSplits:
    """Load a dataset and split it into train and validation sets.

    Args:
        spec: The experiment's ``data:`` section (``source`` plus optional keys, see the module
            docstring and :func:`check_data_spec`).
        seed: Split and subsampling seed; ``spec["seed"]`` overrides it.

    Returns:
        The splits, stratified by class.

    Raises:
        ValueError: On invalid settings, unreadable data or a split that cannot be stratified.
    """
    opts = _parse_spec(spec)
    seed = _check_seed(opts.seed if opts.seed is not None else seed, field="seed")
    val: _Pool | None = None
    if opts.source == "digits":
        train, names = _load_digits(), [str(i) for i in range(10)]
    elif opts.source == "fake":
        train, names = _load_fake(opts, seed=seed), [str(i) for i in range(opts.fake_classes)]
    elif opts.source == "imagefolder":
        train, val, names = _load_imagefolder(opts)
    else:
        train, val, names = _load_torchvision(opts)
    return _split(train=train, val=val, class_names=names, opts=opts, seed=seed)


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


# --------------------------------------------------------------------------- spec parsing


@dataclass(frozen=True)
class _Spec:
    source: str
    path: Path | None
    val_path: Path | None
    root: Path
    download: bool
    samples_per_class: int | None
    val_fraction: float
    seed: int | None
    image_size: int
    fake_size: int
    fake_classes: int
    on_bad_file: str
    num_workers: int
    max_memory_mb: float


def _parse_spec(spec: Mapping[str, Any]) -> _Spec:
    if not isinstance(spec, Mapping):
        raise ValueError(f"data must be a mapping with a 'source' key, got {type(spec).__name__}")
    unknown = sorted(f"data.{k}" for k in spec if k not in _DEFAULTS)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: unknown key{'s' if len(unknown) > 1 else ''}; "
            f"valid keys: {', '.join(_DEFAULTS)}"
        )
    # None counts as "not set" so a config layer may pass every key through.
    given = {k: v for k, v in spec.items() if v is not None}
    source = given.get("source")
    choices = f"{', '.join(DATA_SOURCES)} or {TORCHVISION_PREFIX}<Name> (e.g. torchvision:CIFAR10)"
    if not isinstance(source, str) or not (
        source in DATA_SOURCES or source.startswith(TORCHVISION_PREFIX)
    ):
        raise ValueError(f"data.source: unknown source {source!r}; choose one of {choices}")
    kind = "torchvision" if source.startswith(TORCHVISION_PREFIX) else source
    for key, kinds in _SOURCE_ONLY.items():
        if key in given and kind not in kinds:
            raise ValueError(
                f"data.{key} only applies to source {' or '.join(kinds)}, not {source!r}"
            )
    if kind == "imagefolder" and "path" not in given:
        raise ValueError("data.path is required for source imagefolder (one subfolder per class)")
    on_bad_file = given.get("on_bad_file", _DEFAULTS["on_bad_file"])
    if on_bad_file not in _BAD_FILE_CHOICES:
        raise ValueError(
            f"data.on_bad_file must be one of {', '.join(_BAD_FILE_CHOICES)}, got {on_bad_file!r}"
        )
    download = given.get("download", _DEFAULTS["download"])
    if not isinstance(download, bool):
        raise ValueError(f"data.download must be true or false, got {download!r}")
    val_fraction = given.get("val_fraction", _DEFAULTS["val_fraction"])
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, numbers.Real)
        or not 0 < val_fraction < 1
    ):
        raise ValueError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")
    max_memory_mb = given.get("max_memory_mb", _DEFAULTS["max_memory_mb"])
    if (
        isinstance(max_memory_mb, bool)
        or not isinstance(max_memory_mb, numbers.Real)
        or max_memory_mb < 0
    ):
        raise ValueError(f"data.max_memory_mb must be a number >= 0, got {max_memory_mb!r}")
    seed = given.get("seed")
    return _Spec(
        source=source,
        path=_path(given, "path"),
        val_path=_path(given, "val_path"),
        root=_path(given, "root") or Path(_DEFAULTS["root"]).expanduser(),
        download=download,
        samples_per_class=(
            None
            if "samples_per_class" not in given
            else _integer(given, "samples_per_class", minimum=1)
        ),
        val_fraction=float(val_fraction),
        seed=None if seed is None else _check_seed(seed, field="data.seed"),
        image_size=_integer(given, "image_size", minimum=1),
        fake_size=_integer(given, "fake_size", minimum=1),
        fake_classes=_integer(given, "fake_classes", minimum=2),
        on_bad_file=on_bad_file,
        num_workers=_integer(given, "num_workers", minimum=0),
        max_memory_mb=float(max_memory_mb),
    )


def _integer(given: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = given.get(key, _DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _path(given: Mapping[str, Any], key: str) -> Path | None:
    value = given.get(key)
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"data.{key} must be a path, got {value!r}")
    return Path(value).expanduser()


def _check_seed(seed: Any, *, field: str) -> int:
    # sklearn's random_state and numpy generators accept 0 .. 2**32 - 1.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"{field} must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------- pools and splits


@dataclass
class _TensorPool:
    images: Tensor
    labels: np.ndarray

    def subset(self, index: np.ndarray, opts: _Spec) -> ImageSet:
        # index is sorted and unique, so full length means "all": keep the view, skip the copy.
        everything = len(index) == len(self.labels)
        images = self.images if everything else self.images[torch.from_numpy(index)]
        return InMemoryImageSet(images=images, labels=torch.from_numpy(self.labels[index]))


@dataclass
class _StreamPool:
    source: Dataset
    labels: np.ndarray
    shape: tuple[int, int, int]

    def subset(self, index: np.ndarray, opts: _Spec) -> ImageSet:
        return StreamingImageSet(
            source=self.source,
            indices=torch.from_numpy(index),
            labels=torch.from_numpy(self.labels[index]),
            shape=self.shape,
            num_workers=opts.num_workers,
        )


_Pool = _TensorPool | _StreamPool


def _split(
    *, train: _Pool, val: _Pool | None, class_names: list[str], opts: _Spec, seed: int
) -> DataSplits:
    for pool in (train, val):
        if pool is not None and not np.isin(pool.labels, np.arange(len(class_names))).all():
            raise ValueError(
                f"data.source {opts.source!r}: labels must lie in 0..{len(class_names) - 1}"
            )
    if val is None:
        train_index, val_index = _stratified_split(
            train.labels, val_fraction=opts.val_fraction, seed=seed, num_classes=len(class_names)
        )
        val = train
    else:
        train_index = np.arange(len(train.labels), dtype=np.int64)
        val_index = np.arange(len(val.labels), dtype=np.int64)
    if opts.samples_per_class is not None:
        train_index = _take_per_class(
            train.labels, train_index, count=opts.samples_per_class, seed=seed, names=class_names
        )
    return DataSplits(
        train=train.subset(train_index, opts),
        val=val.subset(val_index, opts),
        class_names=class_names,
    )


def _stratified_split(
    labels: np.ndarray, *, val_fraction: float, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(len(labels), dtype=np.int64)
    try:
        train, val = train_test_split(
            index, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as exc:
        raise ValueError(
            f"data.val_fraction={val_fraction}: cannot split {len(labels)} images of "
            f"{num_classes} classes stratified ({exc}); every class needs at least 2 images and "
            "the validation split at least one per class"
        ) from exc
    # Sorted so a set's stored order does not depend on the seed; batches() shuffles.
    return np.sort(train), np.sort(val)


def _take_per_class(
    labels: np.ndarray, index: np.ndarray, *, count: int, seed: int, names: list[str]
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = []
    for label, name in enumerate(names):
        members = index[labels[index] == label]
        if len(members) < count:
            raise ValueError(
                f"data.samples_per_class={count}: class {name!r} has only {len(members)} "
                "training images"
            )
        picked.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- sources


def _load_digits() -> _TensorPool:
    digits = load_digits()
    # Pixel values are 0..16; stretch to the 0..255 range pretrained networks expect.
    gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = torch.from_numpy(gray).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return _TensorPool(images=images, labels=np.asarray(digits.target, dtype=np.int64))


def _load_fake(opts: _Spec, *, seed: int) -> _TensorPool:
    fake = torchvision.datasets.FakeData(
        size=opts.fake_size,
        image_size=(3, 32, 32),
        num_classes=opts.fake_classes,
        random_offset=seed,
    )
    arrays, labels = [], []
    for i in range(len(fake)):
        image, label = fake[i]
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        labels.append(int(label))
    return _TensorPool(images=_stack_hwc(arrays), labels=np.asarray(labels, dtype=np.int64))


@dataclass
class _FolderListing:
    """Image files of one or two folders (train, then val), with labels and part of each."""

    names: list[str]
    parts: list[tuple[str, Path]]  # (config field, folder)
    files: list[Path]
    labels: np.ndarray
    part_of: np.ndarray


def _load_imagefolder(opts: _Spec) -> tuple[_Pool, _Pool | None, list[str]]:
    listing = _list_folders(opts)
    bad: list[tuple[Path, str]] = []
    # Headers first (cheap): drops non-images and tells the stored size without decoding.
    sizes = _thread_map(lambda i: _read_size(listing.files[i]), len(listing.files))
    keep = _keep_readable(listing.files, sizes, bad, opts)
    _check_readable(listing, keep)
    side, shape = _storage_size([sizes[i][0] for i in np.flatnonzero(keep)], opts)
    decoded_bytes = int(keep.sum()) * math.prod(shape)
    if decoded_bytes > opts.max_memory_mb * 2**20:
        _LOG.info(
            "streaming %d images (%.0f MB decoded > data.max_memory_mb=%s)",
            int(keep.sum()),
            decoded_bytes / 2**20,
            opts.max_memory_mb,
        )
        pools = _streamed_parts(listing, keep, side=side, shape=shape, opts=opts)
    else:
        pools = _decoded_parts(listing, keep, bad, side=side, shape=shape, opts=opts)
    _warn_bad(bad)
    return pools[0], pools[1] if len(pools) > 1 else None, listing.names


def _list_folders(opts: _Spec) -> _FolderListing:
    names, per_class = _scan_folder(opts.path, field="data.path")
    parts = [("data.path", opts.path)]
    per_part = [per_class]
    if opts.val_path is not None:
        val_names, val_per_class = _scan_folder(opts.val_path, field="data.val_path")
        _check_same_classes(names, val_names)
        parts.append(("data.val_path", opts.val_path))
        per_part.append(val_per_class)
    files: list[Path] = []
    labels: list[int] = []
    part_of: list[int] = []
    for part, class_files in enumerate(per_part):
        for label, found in enumerate(class_files):
            files += found
            labels += [label] * len(found)
            part_of += [part] * len(found)
    return _FolderListing(
        names=names,
        parts=parts,
        files=files,
        labels=np.asarray(labels, dtype=np.int64),
        part_of=np.asarray(part_of, dtype=np.int64),
    )


def _streamed_parts(
    listing: _FolderListing,
    keep: np.ndarray,
    *,
    side: int | None,
    shape: tuple[int, int, int],
    opts: _Spec,
) -> list[_Pool]:
    pools: list[_Pool] = []
    for part in range(len(listing.parts)):
        chosen = np.flatnonzero(keep & (listing.part_of == part))
        source = _FileSource([str(listing.files[i]) for i in chosen], side, opts.on_bad_file)
        pools.append(_StreamPool(source=source, labels=listing.labels[chosen], shape=shape))
    return pools


def _decoded_parts(
    listing: _FolderListing,
    keep: np.ndarray,
    bad: list[tuple[Path, str]],
    *,
    side: int | None,
    shape: tuple[int, int, int],
    opts: _Spec,
) -> list[_Pool]:
    # Decode straight into one preallocated buffer: no list of arrays plus a stacked copy.
    slots = np.cumsum(keep) - 1
    buffer = np.empty((int(keep.sum()), *shape), dtype=np.uint8)

    def decode_into(i: int) -> None:
        buffer[slots[i]] = _decode_file(listing.files[i], side).transpose(2, 0, 1)

    decoded = _thread_map(decode_into, len(listing.files), only=keep)
    good = _keep_readable(listing.files, decoded, bad, opts)
    images = torch.from_numpy(buffer)
    if not good[keep].all():
        images = images[torch.from_numpy(good[keep])]
    keep = keep & good
    _check_readable(listing, keep)
    # Files are ordered by part, so each part's images are one contiguous slice (a view).
    pools: list[_Pool] = []
    start = 0
    for part in range(len(listing.parts)):
        chosen = np.flatnonzero(keep & (listing.part_of == part))
        part_images = images[start : start + len(chosen)]
        pools.append(_TensorPool(images=part_images, labels=listing.labels[chosen]))
        start += len(chosen)
    return pools


def _scan_folder(root: Path, *, field: str) -> tuple[list[str], list[list[Path]]]:
    if not root.exists():
        raise ValueError(f"{field}: folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{field}: {root} is not a folder")
    names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and entry.name[0] != "."
    )
    if not names:
        raise ValueError(
            f"{field}: {root} has no class subfolders; expected one subfolder of images per class"
        )
    if len(names) < 2:
        raise ValueError(
            f"{field}: {root} has one class subfolder ({names[0]!r}); classification needs "
            "at least 2 classes, one subfolder each"
        )
    per_class = []
    for name in names:
        found = _image_files(root / name)
        if not found:
            raise ValueError(
                f"{field}: class folder {root / name} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        per_class.append(found)
    return names, per_class


def _image_files(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def _check_same_classes(names: list[str], val_names: list[str]) -> None:
    if names != val_names:
        missing = sorted(set(names) - set(val_names))
        extra = sorted(set(val_names) - set(names))
        raise ValueError(
            "data.val_path must hold the same class subfolders as data.path; "
            f"missing: {missing or 'none'}, extra: {extra or 'none'}"
        )


def _check_readable(listing: _FolderListing, keep: np.ndarray) -> None:
    for part, (field, folder) in enumerate(listing.parts):
        kept = listing.labels[keep & (listing.part_of == part)]
        counts = np.bincount(kept, minlength=len(listing.names))
        for label in np.flatnonzero(counts == 0):
            raise ValueError(
                f"{field}: class folder {folder / listing.names[label]} has no readable image"
            )


def _storage_size(
    sizes: list[tuple[int, int]], opts: _Spec
) -> tuple[int | None, tuple[int, int, int]]:
    """Side to store images at (None: native size) and the stored shape."""
    if len(set(sizes)) == 1 and max(sizes[0]) <= opts.image_size:
        width, height = sizes[0]
        return None, (3, height, width)
    # Never upsample a folder of small images to image_size: store at the largest short side.
    side = min(opts.image_size, max(min(size) for size in sizes))
    return side, (3, side, side)


def _read_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _decode_file(path: Path | str, side: int | None) -> np.ndarray:
    with Image.open(path) as image:
        if side is not None:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale when that is still >= side: much faster.
            image.draft("RGB", (side, side))
        rgb = image.convert("RGB")
    return _fit_array(rgb, side)


def _fit_array(image: Image.Image, side: int | None) -> np.ndarray:
    """HWC uint8 array: native size, or the central square resized to ``side``."""
    if side is not None and image.size != (side, side):
        # PIL's bilinear widens its kernel when shrinking, i.e. it antialiases.
        image = ImageOps.fit(image, (side, side), method=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _thread_map(
    fn: Callable[[int], Any], count: int, *, only: np.ndarray | None = None
) -> list[tuple[Any, str | None]]:
    """``fn(i)`` for i < count in threads (PIL releases the GIL while decoding) -> (value, error).

    Items where ``only`` is False are skipped and count as readable.
    """

    def attempt(i: int) -> tuple[Any, str | None]:
        if only is not None and not only[i]:
            return None, None
        try:
            return fn(i), None
        except Exception as exc:  # whatever PIL raises, the file is unreadable
            if isinstance(exc, Image.UnidentifiedImageError):
                return None, "not an image"
            return None, str(exc) or type(exc).__name__

    workers = min(16, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(attempt, range(count)))


def _keep_readable(
    files: list[Path],
    results: list[tuple[Any, str | None]],
    bad: list[tuple[Path, str]],
    opts: _Spec,
) -> np.ndarray:
    failed = [(files[i], error) for i, (_, error) in enumerate(results) if error is not None]
    if failed and opts.on_bad_file == "error":
        path, error = failed[0]
        raise ValueError(
            f"data.on_bad_file=error: cannot read image file {path} ({error}); "
            f"{len(failed)} unreadable file(s) in all. Fix or remove them, or set "
            "data.on_bad_file: warn to skip them"
        )
    bad += failed
    return np.asarray([error is None for _, error in results], dtype=bool)


def _warn_bad(bad: list[tuple[Path, str]]) -> None:
    if not bad:
        return
    named = ", ".join(f"{path} ({error})" for path, error in bad[:_MAX_NAMED_BAD_FILES])
    more = ", ..." if len(bad) > _MAX_NAMED_BAD_FILES else ""
    message = (
        f"data: skipped {len(bad)} unreadable image file(s) (data.on_bad_file=warn): {named}{more}"
    )
    _LOG.warning(message)
    warnings.warn(message, stacklevel=4)


def _load_torchvision(opts: _Spec) -> tuple[_Pool, _Pool | None, list[str]]:
    cls = _torchvision_class(opts.source[len(TORCHVISION_PREFIX) :])
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "root" in params:
        kwargs["root"] = str(opts.root)
    if "download" in params:
        kwargs["download"] = opts.download
    # Use the dataset's own train/test split where it has one, else a seeded split of one set.
    splits: list[dict[str, Any]] = (
        [{"train": True}, {"train": False}] if "train" in params else [{}]
    )
    try:
        datasets = [cls(**kwargs, **extra) for extra in splits]
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        hint = (
            "the download failed (offline?): fetch it once where there is internet and point "
            "data.root at it"
            if opts.download
            else "set data.download: true to fetch it, or point data.root at a folder holding it"
        )
        raise ValueError(
            f"data.source {opts.source!r}: torchvision could not load it from "
            f"data.root={str(opts.root)!r} with data.download={str(opts.download).lower()} "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    pools = [_vision_pool(ds, opts) for ds in datasets]
    top = max(int(pool.labels.max()) for pool in pools if len(pool.labels))
    classes = getattr(datasets[0], "classes", None)
    if isinstance(classes, Sequence) and len(classes) > top:
        names = [str(c) for c in classes]
    else:
        names = [str(i) for i in range(top + 1)]
    return pools[0], pools[1] if len(pools) > 1 else None, names


def _torchvision_class(name: str) -> type:
    found = getattr(torchvision.datasets, name, None) if name and name[0] != "_" else None
    if inspect.isclass(found) and issubclass(found, Dataset) and name in _torchvision_names():
        return found
    valid = _torchvision_names()
    by_lower = {n.lower(): n for n in valid}
    close = [by_lower[n] for n in difflib.get_close_matches(name.lower(), by_lower, n=3)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    examples = [n for n in _POPULAR_TORCHVISION if n in valid]
    raise ValueError(
        f"data.source: torchvision has no dataset {name!r}; {hint}valid names include "
        f"{', '.join(examples)} (any class in torchvision.datasets), "
        f"written as {TORCHVISION_PREFIX}<Name>"
    )


def _torchvision_names() -> list[str]:
    names = []
    for name in getattr(torchvision.datasets, "__all__", dir(torchvision.datasets)):
        found = getattr(torchvision.datasets, name, None)
        if inspect.isclass(found) and issubclass(found, Dataset) and name != "VisionDataset":
            names.append(name)
    return names


def _vision_pool(dataset: Any, opts: _Spec) -> _Pool:
    arrays = _vision_arrays(dataset)
    if arrays is not None:
        images, labels = arrays
        if max(images.shape[2:]) > opts.image_size:
            images = _fit_tensor(images, opts.image_size)
        return _TensorPool(images=images, labels=labels)
    side = opts.image_size
    if len(dataset) * 3 * side * side > opts.max_memory_mb * 2**20:
        labels = _label_attr(dataset)
        if labels is None:
            labels = np.asarray(
                [_class_index(dataset[i][1], opts) for i in range(len(dataset))], dtype=np.int64
            )
        source = _VisionSource(dataset, side)
        return _StreamPool(source=source, labels=labels, shape=(3, side, side))
    arrays_hwc, label_list = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image = _as_pil(image)
        small = max(image.size) <= side
        arrays_hwc.append(_fit_array(image, None if small else side))
        label_list.append(_class_index(target, opts))
    if len({a.shape for a in arrays_hwc}) > 1:
        side = min(side, max(min(a.shape[:2]) for a in arrays_hwc))
        arrays_hwc = [_fit_array(Image.fromarray(a), side) for a in arrays_hwc]
    return _TensorPool(images=_stack_hwc(arrays_hwc), labels=np.asarray(label_list, np.int64))


def _vision_arrays(dataset: Any) -> tuple[Tensor, np.ndarray] | None:
    """Whole-set uint8 tensor from a ``.data`` array (CIFAR, MNIST, SVHN, ...), else None."""
    data = getattr(dataset, "data", None)
    if isinstance(data, Tensor):
        data = data.numpy()
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or len(data) != len(dataset):
        return None
    labels = _label_attr(dataset)
    if labels is None:
        return None
    if data.ndim == 3:  # grayscale [N, H, W]
        data = data[:, None]
    elif data.ndim == 4 and data.shape[-1] in (1, 3, 4) and data.shape[1] not in (1, 3, 4):
        data = data.transpose(0, 3, 1, 2)  # NHWC, e.g. CIFAR
    elif data.ndim != 4 or data.shape[1] not in (1, 3, 4):
        return None
    images = torch.from_numpy(np.ascontiguousarray(data))
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif images.shape[1] == 4:
        images = images[:, :3].contiguous()
    return images, labels


def _label_attr(dataset: Any) -> np.ndarray | None:
    for attr in ("targets", "labels", "_labels"):
        values = getattr(dataset, attr, None)
        if values is None or isinstance(values, str):
            continue
        try:
            labels = np.asarray(values)
        except (TypeError, ValueError):
            continue
        if labels.ndim == 1 and len(labels) == len(dataset) and labels.dtype.kind in "iu":
            return labels.astype(np.int64)
    return None


def _class_index(target: Any, opts: _Spec) -> int:
    if isinstance(target, Tensor) and target.numel() == 1:
        target = target.item()
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise ValueError(
            f"data.source {opts.source!r}: targets are {type(target).__name__}, not class "
            "indices; only single-label classification datasets are supported"
        )
    return int(target)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return torchvision.transforms.functional.to_pil_image(image).convert("RGB")


@dataclass
class _FileSource(Dataset):
    files: list[str]
    side: int | None
    on_bad_file: str

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor | None:
        path = self.files[index]
        try:
            array = _decode_file(path, self.side)
        except Exception as exc:  # a file that passed the header check can still be truncated
            if self.on_bad_file == "error":
                raise ValueError(
                    f"data.on_bad_file=error: cannot read image file {path} ({exc})"
                ) from exc
            warnings.warn(f"data: skipped unreadable image file {path} ({exc})", stacklevel=2)
            return None
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


@dataclass
class _VisionSource(Dataset):
    dataset: Any
    side: int

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        array = _fit_array(_as_pil(self.dataset[index][0]), self.side)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


@dataclass
class _IndexedView(Dataset):
    source: Dataset
    indices: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        return self.source[self.indices[index]], self.labels[index]


# --------------------------------------------------------------------------- tensor helpers


def _collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor, Tensor]:
    kept = [(image, label) for image, label in items if image is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = torch.stack([image for image, _ in kept])
    return images, torch.tensor([label for _, label in kept], dtype=torch.int64)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _order(n: int, *, shuffle: bool, seed: int) -> Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def _stack_hwc(arrays: list[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _fit_tensor(images: Tensor, side: int, *, chunk: int = 512) -> Tensor:
    """Central square of uint8 ``[N, 3, H, W]`` resized to ``side`` (antialiased), in chunks."""
    height, width = images.shape[2:]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    out = torch.empty(len(images), 3, side, side, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk, :, top : top + short, left : left + short].float()
        part = F.interpolate(
            part, size=(side, side), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _center(x: Tensor, resolution: int) -> Tensor:
    height, width = x.shape[-2:]
    short = min(height, width)
    if height != width:
        top, left = (height - short) // 2, (width - short) // 2
        x = x[..., top : top + short, left : left + short]
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
