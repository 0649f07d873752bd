"""Sources backed by a library's dataset class: ``torchvision:<Name>``, ``fake`` and ``digits``.

``torchvision:<Name>`` takes any class of ``torchvision.datasets``. Sets that keep a uint8
``.data`` array with a label list (CIFAR, MNIST, SVHN, ...) are taken as one tensor without
touching items; any other is read item by item as PIL images, held in memory when it fits
``data.max_memory_mb`` and otherwise decoded per batch by DataLoader workers.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits as _sklearn_digits
from torch import Tensor
from torch.utils.data import Dataset

from trainables.data.imagesets import Pool, StreamPool, TensorPool
from trainables.data.spec import TORCHVISION_PREFIX, DataSpec
from trainables.data.transforms import chw_tensor, fit_array, fit_tensor

__all__ = ["load_digits", "load_fake", "load_torchvision", "torchvision_class", "vision_pool"]

# Named in the error for an unknown dataset, as examples of valid names.
_POPULAR_TORCHVISION = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN", "STL10")


def load_digits() -> tuple[list[Pool], list[str]]:
    """scikit-learn's 8x8 handwritten digits as one pool, classes ``"0"``..``"9"``."""
    digits = _sklearn_digits()
    # Pixel values are 0..16; stretch to the 0..255 range pretrained networks expect.
    gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = torch.from_numpy(gray).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    pool = TensorPool(images=images, labels=np.asarray(digits.target, dtype=np.int64))
    return [pool], [str(i) for i in range(10)]


def load_fake(opts: DataSpec, *, seed: int) -> tuple[list[Pool], list[str]]:
    """``data.fake_size`` random 32x32 images of torchvision's ``FakeData``, drawn from seed."""
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
    pool = TensorPool(images=_stack_hwc(arrays), labels=np.asarray(labels, dtype=np.int64))
    return [pool], [str(i) for i in range(opts.fake_classes)]


def load_torchvision(opts: DataSpec) -> tuple[list[Pool], list[str]]:
    """Load ``torchvision:<Name>``: its train and test splits where it has them, else one set.

    Raises:
        ValueError: The class is unknown, or it could not load from ``data.root``.
    """
    cls = torchvision_class(opts.source[len(TORCHVISION_PREFIX) :])
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
    pools = [vision_pool(ds, opts) for ds in datasets]
    top = max(int(pool.labels.max()) for pool in pools if len(pool.labels))
    classes = getattr(datasets[0], "classes", None)
    if isinstance(classes, Sequence) and len(classes) > top:
        names = [str(c) for c in classes]
    else:
        names = [str(i) for i in range(top + 1)]
    return pools, names


def torchvision_class(name: str) -> type:
    """The ``torchvision.datasets`` class called ``name``.

    Raises:
        ValueError: There is none; names close matches and popular examples.
    """
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


def vision_pool(dataset: Any, opts: DataSpec) -> Pool:
    """One loaded torchvision dataset as a pool stored at most ``data.image_size`` on a side."""
    arrays = _vision_arrays(dataset)
    if arrays is not None:
        images, labels = arrays
        if max(images.shape[2:]) > opts.image_size:
            images = fit_tensor(images, opts.image_size)
        return TensorPool(images=images, labels=labels)
    side = opts.image_size
    if len(dataset) * 3 * side * side > opts.max_memory_mb * 2**20:
        labels = _label_attr(dataset)
        if labels is None:
            labels = np.asarray(
                [_class_index(dataset[i][1], opts) for i in range(len(dataset))], dtype=np.int64
            )
        source = _VisionSource(dataset, side)
        return StreamPool(source=source, labels=labels, shape=(3, side, side))
    arrays_hwc, label_list = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image = _as_pil(image)
        small = max(image.size) <= side
        arrays_hwc.append(fit_array(image, None if small else side))
        label_list.append(_class_index(target, opts))
    if len({a.shape for a in arrays_hwc}) > 1:
        # Sizes vary: store all at one square side, never larger than the largest short side.
        side = min(side, max(min(a.shape[:2]) for a in arrays_hwc))
        arrays_hwc = [fit_array(Image.fromarray(a), side) for a in arrays_hwc]
    return TensorPool(images=_stack_hwc(arrays_hwc), labels=np.asarray(label_list, np.int64))


# --------------------------------------------------------------------------- helpers


def _torchvision_names() -> list[str]:
    names = []
    for name in getattr(torchvision.datasets, "__all__", dir(torchvision.datasets)):
        found = getattr(torchvision.datasets, name, None)
        if inspect.isclass(found) and issubclass(found, Dataset) and name != "VisionDataset":
            names.append(name)
    return names


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
    # Where torchvision classes keep their label list, so labels need not be read item by item.
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


def _class_index(target: Any, opts: DataSpec) -> int:
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


def _stack_hwc(arrays: list[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class _VisionSource(Dataset):
    """Reads and fits one item of a torchvision dataset per call, in a DataLoader worker."""

    dataset: Any
    side: int

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return chw_tensor(fit_array(_as_pil(self.dataset[index][0]), self.side))
