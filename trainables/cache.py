"""Frozen-stage cache: the first ``freeze_depth`` stages computed once, kept on disk.

With ``freeze_depth = k`` and no random augmentation, ``stages[:k]`` are a fixed function
(eval mode, no gradient) of fixed inputs: every epoch of every trial that shares the
backbone, the frozen stages' weights, k, the resolution, the preprocessing and the data
computes the same activations. :func:`frozen_features` computes them once per node, stores
them under ``cache_dir`` keyed by a :func:`fingerprint` of all of those, and the trial then
trains ``stages[k:]`` and the head on batches of activations (:class:`FeatureSet`) visited in
exactly the order the images would have been, so its metrics match an uncached run up to
floating-point rounding.

The cache does not apply, and the trial says so once per process, when augmentation is on
(the frozen stages' inputs change every epoch), with gradual unfreezing (the frozen stages
train later) or when the activations would exceed ``max_mb``.

Classical heads (trainables/heads.py) and the LP-FT probe read *pooled* activations
(``pool=True``): one global-average-pooled vector per image, a separate, much smaller file.

Files are written to a temporary name and renamed under an exclusive lock, so concurrent
trials on a node build a file once and never read a partial one; they are read
memory-mapped, so trials on a node share one copy in the page cache. Activations are kept in
float32: what the uncached path feeds the first trainable stage, at N x C x H x W x 4 bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainables.data.imagesets import ImageSet, indexed_batches
from trainables.data.transforms import preprocess
from trainables.models.stagednet import StagedNet, eval_mode

try:  # POSIX; elsewhere write-then-rename alone keeps readers safe (a file may be built twice)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "MAX_CACHE_MB",
    "FeatureSet",
    "FrozenFeatures",
    "bypass_reason",
    "compute_features",
    "fingerprint",
    "frozen_features",
    "say_once",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Above this the activations are not cached: at half depth of a large backbone at 224 px they
# reach megabytes per image, and the cache must fit in memory (on the GPU when training there).
MAX_CACHE_MB = 2048.0
# Images hashed into the data fingerprint (evenly spaced), on top of every label.
_HASHED_IMAGES = 1024

_said: set[str] = set()


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

    def to(self, device: torch.device | str) -> FeatureSet:
        """The set with features and labels on ``device`` (moved once, not per batch)."""
        return FeatureSet(features=self.features.to(device), labels=self.labels.to(device))

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


@dataclass(frozen=True)
class FrozenFeatures:
    """What a trial trains on when its frozen stages are cached.

    Attributes:
        train: Training activations.
        val: Validation activations.
        start: Index of the first stage to run on them (the freeze depth).
        path: The cache file.
        build_seconds: Time this trial spent computing the file; 0.0 when it was on disk.
    """

    train: FeatureSet
    val: FeatureSet
    start: int
    path: Path
    build_seconds: float


def bypass_reason(*, augment: bool, unfreeze_at_epoch: int | None) -> str | None:
    """Why a trial with frozen stages cannot use the cache, or None when it can."""
    if augment:
        return "augment=true feeds the frozen stages different crops every epoch"
    if unfreeze_at_epoch is not None:
        return "unfreeze_at_epoch is set: the frozen stages train later"
    return None


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
    put(device.type, autocast, channels_last and device.type == "cuda", torch.__version__)
    if pool:  # a separate file; unpooled keys stay what they were
        put("pooled")
    return h.hexdigest()


def frozen_features(
    model: StagedNet,
    *,
    depth: int,
    train: ImageSet,
    val: ImageSet,
    resolution: int,
    data_key: str,
    cache_dir: str | os.PathLike[str],
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    batch_size: int = 256,
    max_mb: float = MAX_CACHE_MB,
    pool: bool = False,
) -> FrozenFeatures | None:
    """The outputs of ``stages[:depth]`` for every training and validation image.

    Reads them from ``cache_dir`` or computes and stores them there. Call it after the model
    is on ``device`` and its first ``depth`` stages are frozen; the call draws no random
    numbers, so a trial's randomness is the same with and without the cache.

    Args:
        model: The trial's model; ``stages[:depth]`` must not be trained.
        depth: The freeze depth (at least 1).
        train: Training images.
        val: Validation images.
        resolution: Input side the images are resized to.
        data_key: Identity of the data (its spec and seed), part of the fingerprint.
        cache_dir: Node-local directory of cache files (created if missing).
        device: The trial's device; computed there, and kept there when it is a GPU.
        amp: bf16 autocast on CUDA, as in the trial.
        channels_last: channels_last inputs on CUDA, as in the trial.
        batch_size: Images per forward pass while computing.
        max_mb: Size above which nothing is cached (None is returned).
        pool: Keep the global average over each activation map (``[N, C]``) instead.

    Returns:
        The cached sets, or None (logged once) when they would exceed ``max_mb`` or a
        streamed set skips unreadable files.
    """
    if depth < 1:
        raise ValueError(f"depth={depth!r}: the cache needs at least one frozen stage")
    opts = _Compute(model=model, depth=depth, resolution=resolution, device=device,
                    amp=amp, channels_last=channels_last, pool=pool)
    per_image = opts.run(next(val.batches(batch_size=1, shuffle=False, device=device))[0])[0]
    size_mb = per_image.numel() * per_image.element_size() * (len(train) + len(val)) / 2**20
    if size_mb > max_mb:
        say_once(f"frozen-stage cache bypassed for {model.name} at freeze_depth={depth}, "
                 f"resolution {resolution}: its activations would take {size_mb:.0f} MB "
                 f"(limit {max_mb:.0f} MB)")
        return None

    key = fingerprint(model, depth=depth, resolution=resolution, data_key=data_key,
                      train=train, val=val, device=device, amp=amp, channels_last=channels_last,
                      pool=pool)
    directory = Path(cache_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.pt"
    build_seconds = 0.0
    sets = _load(path, n_train=len(train), n_val=len(val))
    if sets is None:
        with _locked(directory / f"{key}.lock"):
            # Another trial on this node may have built it while this one waited.
            sets = _load(path, n_train=len(train), n_val=len(val))
            if sets is None:
                t0 = time.perf_counter()
                try:
                    sets = (opts.all(train, batch_size), opts.all(val, batch_size))
                except _Skipped as err:
                    say_once(f"frozen-stage cache bypassed: {err}")
                    return None
                _save(path, *sets)
                build_seconds = time.perf_counter() - t0
                log.info("frozen-stage cache %s built in %.1f s (%.0f MB)", path,
                         build_seconds, size_mb)
    train_set, val_set = sets
    if device.type == "cuda":
        train_set, val_set = train_set.to(device), val_set.to(device)
    return FrozenFeatures(train=train_set, val=val_set, start=depth, path=path,
                          build_seconds=build_seconds)


def compute_features(
    model: StagedNet,
    images: ImageSet,
    *,
    depth: int,
    resolution: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    batch_size: int = 256,
    pool: bool = False,
) -> FeatureSet:
    """The outputs of ``stages[:depth]`` for ``images``, computed now and not stored.

    What :func:`frozen_features` caches, for a trial without a cache directory. The labels
    are those of the images that decoded (a streamed set skips unreadable files).
    """
    opts = _Compute(model=model, depth=depth, resolution=resolution, device=device,
                    amp=amp, channels_last=channels_last, pool=pool)
    return opts.all(images, batch_size, strict=False)


def say_once(message: str) -> None:
    """Logs ``message`` as a warning the first time this process sees it."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


# --------------------------------------------------------------------------- helpers


def _bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


class _Skipped(Exception):
    """The activations cannot stand in for the images (the trial runs uncached)."""


@dataclass
class _Compute:
    """Runs the frozen stages exactly as the training loop would, in eval mode."""

    model: StagedNet
    depth: int
    resolution: int
    device: torch.device
    amp: bool
    channels_last: bool
    pool: bool = False

    def run(self, images: Tensor) -> Tensor:
        x = preprocess(images, resolution=self.resolution, mean=self.model.mean,
                       std=self.model.std)
        if self.device.type == "cuda" and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.amp and self.device.type == "cuda" else contextlib.nullcontext())
        with torch.no_grad(), autocast, eval_mode(self.model.stages[: self.depth]):
            out = self.model.forward_stages(x, 0, self.depth)
            if self.pool and out.ndim == 4:
                out = out.float().mean(dim=(2, 3))
        return out.float().contiguous().cpu()

    def all(self, images: ImageSet, batch_size: int, *, strict: bool = True) -> FeatureSet:
        features, labels = [], []
        for x, y in images.batches(batch_size=batch_size, shuffle=False, device=self.device):
            features.append(self.run(x))
            labels.append(y.cpu())
        labels_t = torch.cat(labels)
        if strict and len(labels_t) != len(images):  # a streamed set skipped unreadable files
            raise _Skipped(f"{len(images)} images listed but {len(labels_t)} decoded; the "
                           f"batches would not line up with the image set's")
        return FeatureSet(features=torch.cat(features), labels=labels_t)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save(path: Path, train: FeatureSet, val: FeatureSet) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    payload = {"format": torch.tensor(FORMAT_VERSION),
               "train": train.features, "train_labels": train.labels,
               "val": val.features, "val_labels": val.labels}
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path, *, n_train: int, n_val: int) -> tuple[FeatureSet, FeatureSet] | None:
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
