"""Load a data set and split it into stratified, seeded train and validation sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from trainables.data.imagefolder import check_folders, load_imagefolder
from trainables.data.imagesets import (
    ImageSet,
    Pool,
)
from trainables.data.spec import TORCHVISION_PREFIX, DataSpec, check_seed, parse_spec
from trainables.data.tvdatasets import (
    load_digits,
    load_fake,
    load_torchvision,
    torchvision_class,
)

__all__ = ["DataSplits", "check_data_spec", "load_data"]



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
