"""``ftsearch images``: a config's training or validation split as a folder per class.

What a search trained and validated on, as PNG files: to look at, or to hand to
``ftsearch predict`` and ``ftsearch evaluate`` (on the validation split, ``evaluate``
reproduces the top-1 a trial recorded). The split is the one every trial of the config
gets: the same data section, the same seed. The files are the images as stored before a
trial resizes them (digits: their 8 x 8 pixels), named ``<class name>/<index>.png``, the
index in the split's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.storage import is_uri

if TYPE_CHECKING:
    from search.config import ExperimentConfig

__all__ = ["SPLITS", "ImagesError", "default_out", "write_split"]

SPLITS = ("train", "val")
_BATCH = 256


class ImagesError(ValueError):
    """A split that cannot be written where asked; the message names the cause."""


def default_out(cfg: ExperimentConfig, split: str) -> Path:
    """``<storage>/<name>-<split>``: beside the experiment's own directory.

    Raises:
        ImagesError: The storage is a URI (``s3://...``): the images are written locally.
    """
    if is_uri(cfg.storage):
        raise ImagesError(f"--out: storage {cfg.storage!r} is not a local folder; give --out")
    return Path(cfg.storage).expanduser() / f"{cfg.name}-{split}"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImagesError(f"--out: {out} exists and is not an empty folder; give another "
                          f"--out (nothing of yours is replaced)")


def _folder_names(class_names: list[str]) -> list[str]:
    # evaluate matches a folder's name to a class name: each must be one path component.
    bad = [n for n in class_names if not n or n in (".", "..") or "/" in n or "\0" in n]
    if bad:
        raise ImagesError(f"class name(s) {bad} cannot name a folder, so `ftsearch evaluate` "
                          f"could not match them; nothing written")
    return class_names


def write_split(cfg: ExperimentConfig, *, split: str, out: Path) -> dict[str, int]:
    """Writes ``split`` of ``cfg``'s data under ``out``; returns images per class folder.

    Raises:
        ImagesError: ``split`` is not one of :data:`SPLITS`, ``out`` holds files already, or
            a class name cannot be a folder name (checked before any file is written).
        ValueError, OSError: The data cannot be loaded (as a trial would fail).
    """
    if split not in SPLITS:
        raise ImagesError(f"--split: {split!r} is not one of {list(SPLITS)}")
    _check_out(out)
    from PIL import Image

    from trainables.data import load_data

    splits = load_data(cfg.data, seed=cfg.seed)
    names = _folder_names(splits.class_names)
    images = splits.train if split == "train" else splits.val
    counts = dict.fromkeys(names, 0)
    index = 0
    for batch, labels in images.batches(batch_size=_BATCH, shuffle=False):
        for image, label in zip(batch, labels.tolist(), strict=True):
            folder = out / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
            counts[names[label]] += 1
            index += 1
    return counts
