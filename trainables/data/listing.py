"""Which image files make up an image folder: each real file once, however it is reached.

``data.path`` (and ``data.val_path``) hold one subfolder per class, taken in sorted order (class
index = position of the name). A class folder is walked recursively, top-down and sorted (the
order ``os.walk`` gives: a folder's files, then its subfolders one by one), skipping hidden
entries and following symlinks, so the same files get the same labels on every load.

Symlinks make a folder a graph, not a tree, so the walk keeps the real identity of every folder
it entered and enters none twice: a loop (``ln -s . again``) ends the walk instead of repeating
it until the path is too long, and the walk holds one entry per real folder, never one per path.
Files are identified by real folder and name (their real path). The same file reached twice in
one class folder is used once, with one warning counting such files; reached from two class
folders, or from both ``data.path`` and ``data.val_path``, it is an error (see
:func:`_claim`). Torch-free: pre-flight can list folders without importing torch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data.spec import DataSpec

__all__ = ["IMAGE_EXTENSIONS", "FolderListing", "list_folders"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# The logger of trainables.data, where this code lived: logging set-ups filtering on it still work.
_LOG = logging.getLogger("trainables.data")

_DirKey = tuple[int, int]  # (st_dev, st_ino) of a folder: the same for every path to it
_FileKey = tuple[_DirKey, str]  # real folder and name: the file's real path


@dataclass
class FolderListing:
    """Image files of one or two folders (train, then val), with labels and part of each."""

    names: list[str]
    parts: list[tuple[str, Path]]  # (config field, folder)
    files: list[Path]
    labels: np.ndarray
    part_of: np.ndarray

    def chosen(self, keep: np.ndarray, part: int) -> np.ndarray:
        """Indices of the kept files of one part, in file order."""
        return np.flatnonzero(keep & (self.part_of == part))


def list_folders(opts: DataSpec) -> FolderListing:
    """List the image files of ``data.path`` (and ``data.val_path``), each real file once.

    Raises:
        ValueError: Naming the folder field and what is wrong with it: missing, no or one class
            subfolder, a class folder without image files, other classes in ``data.val_path``,
            or one image file in two class folders or in both folders.
    """
    parts = [("data.path", opts.path)]
    if opts.val_path is not None:
        parts.append(("data.val_path", opts.val_path))
    names: list[str] = []
    owners: dict[_FileKey, tuple[int, Path]] = {}  # file -> (part, class folder) first holding it
    files: list[Path] = []
    labels: list[int] = []
    part_of: list[int] = []
    for part, (field, root) in enumerate(parts):
        part_names = _class_names(root, field=field)
        if part:
            _check_same_classes(names, part_names)
        names = part_names
        twice = 0
        for label, name in enumerate(names):
            walk = _walk(root / name)
            if not walk.paths:
                raise ValueError(
                    f"{field}: class folder {root / name} has no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            _claim(walk, owners, part=part, folder=root / name, parts=parts)
            files += walk.paths
            labels += [label] * len(walk.paths)
            part_of += [part] * len(walk.paths)
            twice += walk.twice
        _warn_twice(field, twice)
    return FolderListing(
        names=names,
        parts=parts,
        files=files,
        labels=np.asarray(labels, dtype=np.int64),
        part_of=np.asarray(part_of, dtype=np.int64),
    )


# --------------------------------------------------------------------------- class folders


def _class_names(root: Path, *, field: str) -> list[str]:
    if not root.exists():
        raise ValueError(f"{field}: folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{field}: {root} is not a folder")
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir() and entry.name[0] != ".")
    if not names:
        raise ValueError(
            f"{field}: {root} has no class subfolders; expected one subfolder of images per class"
        )
    if len(names) < 2:
        raise ValueError(
            f"{field}: {root} has one class subfolder ({names[0]!r}); classification needs "
            "at least 2 classes, one subfolder each"
        )
    return names


def _check_same_classes(names: list[str], val_names: list[str]) -> None:
    if names != val_names:
        missing = sorted(set(names) - set(val_names))
        extra = sorted(set(val_names) - set(names))
        raise ValueError(
            "data.val_path must hold the same class subfolders as data.path; "
            f"missing: {missing or 'none'}, extra: {extra or 'none'}"
        )


# --------------------------------------------------------------------------- one class folder


@dataclass
class _Walk:
    """Image files under one class folder, each real file once, in walk order."""

    paths: list[Path]  # the first path each file was reached by
    keys: list[_FileKey]
    twice: int  # files reached more than once (through symlinks), listed once


def _walk(folder: Path) -> _Walk:
    """Image files under ``folder`` in ``os.walk``'s top-down sorted order, loop-safe."""
    top = _dir_key(folder)
    entered = {top}
    below: dict[_DirKey, list[_DirKey]] = {}  # folder -> subfolders entered from it
    held: dict[_DirKey, list[_FileKey]] = {}  # folder -> image files directly in it
    skipped: list[_DirKey] = []  # folders reached again, through a symlink
    walk = _Walk(paths=[], keys=[], twice=0)
    seen: set[_FileKey] = set()
    twice: set[_FileKey] = set()
    stack = [(folder, top)]  # explicit: a deep tree cannot overflow Python's recursion limit
    while stack:
        path, key = stack.pop()
        subfolders = []
        for entry in _entries(path):
            if entry.is_dir():
                try:
                    sub = _dir_key(entry.path)
                except OSError:
                    continue  # removed since it was listed: as if it had not been there
                if sub in entered:
                    skipped.append(sub)
                    continue
                entered.add(sub)
                below.setdefault(key, []).append(sub)
                subfolders.append((Path(entry.path), sub))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                file = _file_key(entry, key)
                held.setdefault(key, []).append(file)
                if file in seen:
                    twice.add(file)
                    continue
                seen.add(file)
                walk.paths.append(Path(entry.path))
                walk.keys.append(file)
        stack += reversed(subfolders)  # popped in sorted order
    # A folder entered once and reached again would have listed all its files again.
    walk.twice = len(twice | _files_below(skipped, below, held))
    return walk


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return sorted((e for e in entries if e.name[0] != "."), key=lambda e: e.name)
    except OSError:
        return []  # as os.walk does: an unreadable folder is left out


def _dir_key(path: str | Path) -> _DirKey:
    # os.stat, not DirEntry.stat: the latter leaves st_ino 0 on Windows.
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _file_key(entry: os.DirEntry, folder: _DirKey) -> _FileKey:
    if not entry.is_symlink():
        return folder, entry.name
    # A linked file is named by where it really lies; its folder costs one stat, not one a file.
    real = os.path.realpath(entry.path)
    try:
        return _dir_key(os.path.dirname(real)), os.path.basename(real)
    except OSError:
        return folder, entry.name  # a dangling link: listed, and named as unreadable when read


def _files_below(
    tops: list[_DirKey],
    below: dict[_DirKey, list[_DirKey]],
    held: dict[_DirKey, list[_FileKey]],
) -> set[_FileKey]:
    """Image files in ``tops`` and the folders entered from them, each folder visited once."""
    found: set[_FileKey] = set()
    done: set[_DirKey] = set()
    pending = list(tops)
    while pending:
        key = pending.pop()
        if key not in done:
            done.add(key)
            found.update(held.get(key, ()))
            pending += below.get(key, ())
    return found


# --------------------------------------------------------------------------- across folders


def _claim(
    walk: _Walk,
    owners: dict[_FileKey, tuple[int, Path]],
    *,
    part: int,
    folder: Path,
    parts: list[tuple[str, Path]],
) -> None:
    """Record the files of one class folder; one file in two class folders is an error.

    Both cases are errors, not warnings that drop a copy: in two class folders of one part the
    same image would get two labels and no choice of one is right; in ``data.path`` and
    ``data.val_path`` it leaks training images into validation, so every trial's top-1 (the
    search objective) is inflated, and which copy to drop is the user's decision.
    """
    clashes = [
        (owners[key], path)
        for key, path in zip(walk.keys, walk.paths, strict=True)
        if key in owners
    ]
    if clashes:
        (other_part, other_folder), path = clashes[0]
        if other_part != part:
            raise ValueError(
                f"{parts[part][0]}: {len(clashes)} image file(s) in {folder} are also in "
                f"{parts[other_part][0]} {other_folder} (e.g. {path}); the same image in "
                "training and validation inflates validation accuracy: remove one copy"
            )
        raise ValueError(
            f"{parts[part][0]}: class folders {other_folder} and {folder} hold the same "
            f"{len(clashes)} image file(s) (e.g. {path}), through a symlink or a folder linked "
            "as a class; an image cannot have two labels: remove the link"
        )
    owners.update((key, (part, folder)) for key in walk.keys)


def _warn_twice(field: str, count: int) -> None:
    if not count:
        return
    message = (
        f"{field}: {count} image file(s) reached more than once through symlinks were used once"
    )
    _LOG.warning(message)
    # Points at the caller of load_data (or check_data_spec): _warn_twice <- list_folders <-
    # load_imagefolder (check_folders) <- it.
    warnings.warn(message, stacklevel=5)
