"""The frozen-stage cache's files: what keys them, and their atomic write and read.

:mod:`trainables.cache` decides what to cache; this module names a cache file by a
:func:`fingerprint` of everything its contents depend on, writes it under a temporary name
and renames it (readers see the old state or the whole file), and reads it memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainables.data.imagesets import ImageSet, indexed_batches
from trainables.models.stagednet import StagedNet

try:  # POSIX; elsewhere write-then-rename alone keeps readers safe (a file may be built twice)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "fingerprint",
    "load_features",
    "locked",
    "save_features",
]

log = logging.getLogger("trainables.cache")

FORMAT_VERSION = 1
# Images hashed into the data fingerprint (evenly spaced), on top of every label.
_HASHED_IMAGES = 1024


@dataclass
class FeatureSet:
    """Activations of the frozen stages with their labels, batched like an image set.

    Attributes:
        features: float32 ``[N, ...]``, one row per image, in the image set's order.
        labels: int64 ``[N]``.
    """

    features: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FeatureSet:
        """The set with features (as ``dtype`` when given) and labels on ``device``, moved once,
        not per batch."""
        return FeatureSet(features=self.features.to(device, dtype=dtype),
                          labels=self.labels.to(device))

    def batches(
        self,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate once, with the arguments and batch order of ``ImageSet.batches``."""
        # The image sets' own batching, so a cached epoch visits the same batches.
        return indexed_batches(self.features, self.labels, batch_size=batch_size,
                               shuffle=shuffle, seed=seed, device=device, drop_last=drop_last)


def fingerprint(
    model: StagedNet,
    *,
    depth: int,
    resolution: int,
    data_key: str,
    train: ImageSet,
    val: ImageSet,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    pool: bool = False,
) -> str:
    """Hex digest of everything the frozen stages' outputs depend on.

    That is the backbone and the architecture of ``stages[:depth]``, their weights and buffers
    (hashed, so packaged, ImageNet, file and seeded random weights are all covered), the
    depth, the resolution, the input normalisation, the data (its spec and seed in
    ``data_key``, sizes, every label and a sample of the images), the numerics (device type,
    bf16 autocast, memory format), the torch version and whether the outputs are pooled.
    """
    h = hashlib.blake2b(digest_size=16)

    def put(*parts: object) -> None:
        for part in parts:
            h.update(repr(part).encode())
            h.update(b"\x00")

    frozen = model.stages[:depth]
    put(FORMAT_VERSION, model.name, depth, int(resolution), model.mean, model.std, repr(frozen))
    for name, tensor in frozen.state_dict().items():
        put(name, tuple(tensor.shape), str(tensor.dtype))
        h.update(_bytes(tensor))
    put(data_key, len(train), len(val), train.image_shape, val.image_shape)
    for image_set in (train, val):
        h.update(_bytes(image_set.labels))
        images = getattr(image_set, "images", None)  # in-memory sets; streamed ones are not read
        if images is not None and len(images):
            step = max(1, len(images) // _HASHED_IMAGES)
            h.update(_bytes(images[::step]))
    autocast = amp and device.type == "cuda"
    put(device.type, autocast, channels_last, torch.__version__)
    if pool:  # a separate file; unpooled keys stay what they were
        put("pooled")
    return h.hexdigest()


def _bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) while the block runs."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_features(path: Path, train: FeatureSet, val: FeatureSet) -> None:
    """Writes both sets to ``path`` atomically (a unique temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    payload = {"format": torch.tensor(FORMAT_VERSION),
               "train": train.features, "train_labels": train.labels,
               "val": val.features, "val_labels": val.labels}
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    finally:
        tmp.unlink(missing_ok=True)


def load_features(path: Path, *, n_train: int, n_val: int
                  ) -> tuple[FeatureSet, FeatureSet] | None:
    """The sets in ``path``, memory-mapped; None when absent, unreadable or of other sizes."""
    if not path.exists():
        return None
    try:
        # Memory-mapped: trials on a node share the page cache instead of one copy each.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        train = FeatureSet(features=payload["train"], labels=payload["train_labels"])
        val = FeatureSet(features=payload["val"], labels=payload["val_labels"])
        ok = int(payload["format"]) == FORMAT_VERSION and (len(train), len(val)) == (n_train,
                                                                                     n_val)
    except Exception as err:  # unreadable (e.g. a disk filled up mid-write): rebuild it
        log.warning("frozen-stage cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    return (train, val) if ok else None
