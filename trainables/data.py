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

This module is the entry point and does the splitting; the work lives in
:mod:`trainables.dataspec` (the ``data:`` keys), :mod:`trainables.imagesets` (image sets and
pools), :mod:`trainables.imagefolder` and :mod:`trainables.tvdatasets` (the sources) and
:mod:`trainables.transforms` (crops, resizes and :func:`preprocess`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from trainables.dataspec import DATA_SOURCES, TORCHVISION_PREFIX, DataSpec, check_seed, parse_spec
from trainables.imagefolder import IMAGE_EXTENSIONS, check_folders, load_imagefolder
from trainables.imagesets import (
    ImageSet,
    InMemoryImageSet,
    Pool,
    StreamingImageSet,
    epoch_order,
)
from trainables.transforms import preprocess
from trainables.tvdatasets import (
    load_digits,
    load_fake,
    load_torchvision,
    torchvision_class,
    vision_pool,
)

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

# The private names these helpers had when they lived here: trainables.cache and
# tests/trainables/test_data.py import them from this module.
_order = epoch_order
_parse_spec = parse_spec
_vision_pool = vision_pool


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


def check_data_spec(spec: Mapping[str, Any]) -> None:
    """Validate a ``data:`` section without decoding any image.

    Checks keys, types and ranges, the source name, and for image folders that the folders exist
    and hold at least two class subfolders with image files.

    Args:
        spec: The experiment's ``data:`` section.

    Raises:
        ValueError: Naming the offending ``data.<key>`` and the valid choices.
    """
    opts = parse_spec(spec)
    if opts.source == "imagefolder":
        check_folders(opts)
    elif opts.source.startswith(TORCHVISION_PREFIX):
        torchvision_class(opts.source[len(TORCHVISION_PREFIX) :])


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
    opts = parse_spec(spec)
    seed = check_seed(opts.seed if opts.seed is not None else seed, field="seed")
    if opts.source == "digits":
        pools, names = load_digits()
    elif opts.source == "fake":
        pools, names = load_fake(opts, seed=seed)
    elif opts.source == "imagefolder":
        pools, names = load_imagefolder(opts)
    else:
        pools, names = load_torchvision(opts)
    # A second pool is the source's own validation split (data.val_path, a test split).
    val = pools[1] if len(pools) > 1 else None
    return _split(train=pools[0], val=val, class_names=names, opts=opts, seed=seed)


# --------------------------------------------------------------------------- splits


def _split(
    *, train: Pool, val: Pool | None, class_names: list[str], opts: DataSpec, seed: int
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
