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

Files (:mod:`trainables.cachefiles`) are written to a temporary name and renamed under an
exclusive lock, so concurrent trials on a node build a file once and never read a partial
one; they are read memory-mapped, so trials on a node share one copy in the page cache.
Activations are kept in float32: what the uncached path feeds the first trainable stage, at
N x C x H x W x 4 bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainables.cachefiles import (
    FORMAT_VERSION,
    FeatureSet,
    fingerprint,
    load_features,
    locked,
    save_features,
)
from trainables.data.imagesets import ImageSet
from trainables.data.transforms import preprocess
from trainables.models.stagednet import StagedNet, eval_mode

__all__ = [
    "FORMAT_VERSION",
    "MAX_CACHE_MB",
    "FeatureSet",
    "FrozenFeatures",
    "bypass_reason",
    "compute_features",
    "fingerprint",
    "frozen_features",
    "pooled_stage_features",
    "say_once",
]

log = logging.getLogger(__name__)

# Above this the activations are not cached: at half depth of a large backbone at 224 px they
# reach megabytes per image, and the cache must fit in memory (on the GPU when training there).
MAX_CACHE_MB = 2048.0

_said: set[str] = set()


@dataclass(frozen=True)
class FrozenFeatures:
    """What a trial trains on when its frozen stages are cached.

    Attributes:
        train: Training activations, in the dtype the frozen stages emit (bf16 under autocast).
        val: Validation activations, likewise.
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
        channels_last: channels_last inputs, as in the trial.
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
    sets = load_features(path, n_train=len(train), n_val=len(val))
    if sets is None:
        with locked(directory / f"{key}.lock"):
            # Another trial on this node may have built it while this one waited.
            sets = load_features(path, n_train=len(train), n_val=len(val))
            if sets is None:
                t0 = time.perf_counter()
                try:
                    sets = (opts.all(train, batch_size), opts.all(val, batch_size))
                except _Skipped as err:
                    say_once(f"frozen-stage cache bypassed: {err}")
                    return None
                save_features(path, *sets)
                build_seconds = time.perf_counter() - t0
                log.info("frozen-stage cache %s built in %.1f s (%.0f MB)", path,
                         build_seconds, size_mb)
    train_set, val_set = sets
    # The file keeps float32; the uncached trial feeds stages[depth:] the frozen stages' own
    # output, bf16 under autocast. Handing the cached trial that dtype makes it run the same
    # kernels on the same values. Fed float32, a head that starts with pooling and dropout
    # runs them in float32 where the uncached trial ran bf16; on a GPU the two trials' metrics
    # drifted apart (BENCHMARKS.md, GPU rows of section 4). Pooled features stay float32.
    dtype = None if pool or opts.out_dtype == torch.float32 else opts.out_dtype
    if device.type == "cuda" or dtype is not None:
        train_set, val_set = train_set.to(device, dtype), val_set.to(device, dtype)
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


def pooled_stage_features(
    model: StagedNet,
    *,
    depths: list[int],
    train: ImageSet,
    val: ImageSet,
    resolution: int,
    data_key: str,
    cache_dir: str | os.PathLike[str],
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    batch_size: int = 256,
) -> tuple[dict[int, tuple[FeatureSet, FeatureSet]], float]:
    """Pooled outputs of ``stages[:k]`` for every k in ``depths``, in one forward pass.

    Each depth is the very file :func:`frozen_features` with ``pool=True`` reads (same
    fingerprint, same numerics), so a ranking's features serve the classical-head trials
    and LP-FT probes that follow, and the other way round. Depths already on disk are read;
    the rest are computed by one pass through ``stages[:max(missing)]``.

    Returns:
        ``({depth: (train, val)}, seconds spent computing)``.
    """
    directory = Path(cache_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    opts = _Compute(model=model, depth=max(depths), resolution=resolution, device=device,
                    amp=amp, channels_last=channels_last, pool=True)
    keys = {k: fingerprint(model, depth=k, resolution=resolution, data_key=data_key,
                           train=train, val=val, device=device, amp=amp,
                           channels_last=channels_last, pool=True) for k in depths}
    paths = {k: directory / f"{key}.pt" for k, key in keys.items()}
    found = {k: load_features(paths[k], n_train=len(train), n_val=len(val)) for k in depths}
    missing = [k for k in depths if found[k] is None]
    seconds = 0.0
    if missing:
        t0 = time.perf_counter()
        computed = [opts.all_depths(images, batch_size, missing) for images in (train, val)]
        seconds = time.perf_counter() - t0
        for k in missing:
            found[k] = (computed[0][k], computed[1][k])
            with locked(directory / f"{paths[k].stem}.lock"):
                if not paths[k].exists():
                    save_features(paths[k], *found[k])
    return {k: found[k] for k in depths}, seconds  # type: ignore[misc]


def say_once(message: str) -> None:
    """Logs ``message`` as a warning the first time this process sees it."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


# --------------------------------------------------------------------------- helpers


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
    # dtype of the frozen stages' output before it is stored as float32 (set by each run).
    out_dtype: torch.dtype = torch.float32

    def _inputs(self, images: Tensor) -> Tensor:
        x = preprocess(images, resolution=self.resolution, mean=self.model.mean,
                       std=self.model.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> contextlib.AbstractContextManager:
        return (torch.autocast("cuda", dtype=torch.bfloat16)
                if self.amp and self.device.type == "cuda" else contextlib.nullcontext())

    def _finish(self, out: Tensor) -> Tensor:
        self.out_dtype = out.dtype
        if self.pool and out.ndim == 4:
            out = out.float().mean(dim=(2, 3))
        return out.float().contiguous().cpu()

    def run(self, images: Tensor) -> Tensor:
        x = self._inputs(images)
        with torch.no_grad(), self._autocast(), eval_mode(self.model.stages[: self.depth]):
            return self._finish(self.model.forward_stages(x, 0, self.depth))

    def all_depths(self, images: ImageSet, batch_size: int, depths: list[int]
                   ) -> dict[int, FeatureSet]:
        """:meth:`run` at each of ``depths`` (pooled), from one pass through the stages."""
        outputs: dict[int, list[Tensor]] = {k: [] for k in depths}
        labels = []
        for x, y in images.batches(batch_size=batch_size, shuffle=False, device=self.device):
            x = self._inputs(x)
            with torch.no_grad(), self._autocast(), eval_mode(self.model.stages[: self.depth]):
                for k in range(1, max(depths) + 1):
                    x = self.model.stages[k - 1](x)
                    if k in outputs:
                        outputs[k].append(self._finish(x))
            labels.append(y.cpu())
        labels_t = torch.cat(labels)
        if len(labels_t) != len(images):
            raise ValueError(f"{len(images)} images listed but {len(labels_t)} decoded")
        return {k: FeatureSet(features=torch.cat(v), labels=labels_t) for k, v in outputs.items()}

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


