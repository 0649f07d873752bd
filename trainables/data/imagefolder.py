"""The ``imagefolder`` source: one subfolder of image files per class.

Folders are listed by :mod:`~trainables.data.listing` (sorted classes, each real file once
however symlinks reach it), every file's header is read first (cheap) to drop non-images and
to choose the stored size, and then the set is either decoded once in threads into one
tensor, or, when that would exceed ``data.max_memory_mb``, handed to DataLoader workers that
decode per batch. Both decode with :func:`_decode_file`, so 16-bit images are scaled to 8 bits
the same way (:func:`~trainables.data.transforms.to_rgb`). Unreadable files are skipped with
one warning (``data.on_bad_file: warn``) or stop the load (``error``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from trainables.data.imagesets import Pool, StreamPool, TensorPool
from trainables.data.listing import IMAGE_EXTENSIONS, FolderListing, list_folders
from trainables.data.spec import DataSpec
from trainables.data.transforms import chw_tensor, fit_array, to_rgb

# IMAGE_EXTENSIONS lives in listing; re-exported: trainables.data's lazy map names this module.
__all__ = ["IMAGE_EXTENSIONS", "check_folders", "load_imagefolder"]

# The logger of trainables.data, where this code lived: logging set-ups filtering on it still work.
_LOG = logging.getLogger("trainables.data")
_MAX_NAMED_BAD_FILES = 5


def check_folders(opts: DataSpec) -> None:
    """Check that ``data.path`` (and ``data.val_path``) hold matching class subfolders of images.

    Raises:
        ValueError: Naming the folder field and what is wrong with it.
    """
    list_folders(opts)


def load_imagefolder(opts: DataSpec) -> tuple[list[Pool], list[str]]:
    """Load ``data.path`` (and ``data.val_path``).

    Returns:
        One pool per folder (train, then val when ``data.val_path`` is set) and the class names.
    """
    listing = list_folders(opts)
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
    return pools, listing.names


# --------------------------------------------------------------------------- decoding


def _streamed_parts(
    listing: FolderListing,
    keep: np.ndarray,
    *,
    side: int | None,
    shape: tuple[int, int, int],
    opts: DataSpec,
) -> list[Pool]:
    pools: list[Pool] = []
    for part in range(len(listing.parts)):
        chosen = listing.chosen(keep, part)
        source = _FileSource([str(listing.files[i]) for i in chosen], side, opts.on_bad_file)
        pools.append(StreamPool(source=source, labels=listing.labels[chosen], shape=shape))
    return pools


def _decoded_parts(
    listing: FolderListing,
    keep: np.ndarray,
    bad: list[tuple[Path, str]],
    *,
    side: int | None,
    shape: tuple[int, int, int],
    opts: DataSpec,
) -> list[Pool]:
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
    pools: list[Pool] = []
    start = 0
    for part in range(len(listing.parts)):
        chosen = listing.chosen(keep, part)
        part_images = images[start : start + len(chosen)]
        pools.append(TensorPool(images=part_images, labels=listing.labels[chosen]))
        start += len(chosen)
    return pools


def _storage_size(
    sizes: list[tuple[int, int]], opts: DataSpec
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
        rgb = to_rgb(image)
    return fit_array(rgb, side)


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


# --------------------------------------------------------------------------- bad files


def _keep_readable(
    files: list[Path],
    results: list[tuple[Any, str | None]],
    bad: list[tuple[Path, str]],
    opts: DataSpec,
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


def _check_readable(listing: FolderListing, keep: np.ndarray) -> None:
    for part, (field, folder) in enumerate(listing.parts):
        kept = listing.labels[listing.chosen(keep, part)]
        counts = np.bincount(kept, minlength=len(listing.names))
        for label in np.flatnonzero(counts == 0):
            raise ValueError(
                f"{field}: class folder {folder / listing.names[label]} has no readable image"
            )


def _warn_bad(bad: list[tuple[Path, str]]) -> None:
    if not bad:
        return
    named = ", ".join(f"{path} ({error})" for path, error in bad[:_MAX_NAMED_BAD_FILES])
    more = ", ..." if len(bad) > _MAX_NAMED_BAD_FILES else ""
    message = (
        f"data: skipped {len(bad)} unreadable image file(s) (data.on_bad_file=warn): {named}{more}"
    )
    _LOG.warning(message)
    # Points at the caller of trainables.data.load_data: _warn_bad <- load_imagefolder <- it.
    warnings.warn(message, stacklevel=4)


@dataclass
class _FileSource(Dataset):
    """Decodes one file per item in a DataLoader worker; None when the file is unreadable."""

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
        return chw_tensor(array)
