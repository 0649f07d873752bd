"""Reading a model file written by :mod:`search.export`, and predicting with it, without Ray.

The file is a ``torch.save`` of plain types only (dicts, lists, strings, numbers,
tensors), so :func:`load_model` reads it with ``weights_only=True``: loading a model
file never runs code from it. :func:`load_model` checks every key the file must hold
(:data:`REQUIRED_KEYS`) before using it, so a foreign or damaged file is one message
naming what is wrong, not a traceback. :func:`predict` decodes, resizes and normalises
images exactly as the trial did its validation images, so its top-1 on those images is
the trial's (:mod:`search.evaluate` scores labelled folders with it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from trainables.classical import FeatureHeadNet
from trainables.data import IMAGE_EXTENSIONS, preprocess, to_rgb

# The walk the trial's image folders are listed with (hidden entries skipped, symlinks
# followed, loop-safe), so a folder given here yields the files a trial would read.
from trainables.data.listing import _walk
from trainables.fitted_heads import head_from_state
from trainables.models import StagedNet, build_backbone
from trainables.params import HEADS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "ModelFileError",
    "image_files",
    "image_name",
    "load_model",
    "predict",
    "prediction_lines",
    "scores_are_probabilities",
]

FORMAT = "ftsearch-model"
# Version 2 added classical heads (`head`, `feature_depth`, `head_state`); a version-1 file
# is a linear-head model and still loads. A reader of version 1 refuses version 2, rather
# than predicting with the untrained linear classifier of a classical-head model.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _three_numbers(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))


# What a model file must hold besides `format` and `version`, and what each value must be:
# export_model writes these keys, load_model refuses a file that lacks one or holds a
# value predict could not use (it would fail later with a traceback instead).
_REQUIRED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "backbone": ("a backbone name", lambda v: isinstance(v, str)),
    "backbone_kwargs": ("a dict", lambda v: isinstance(v, dict)
                        and all(isinstance(k, str) for k in v)),
    "num_classes": ("a positive int", _positive_int),
    "class_names": ("a list of strings", lambda v: isinstance(v, list)
                    and all(isinstance(n, str) for n in v)),
    "resolution": ("a positive int", _positive_int),
    "image_size": ("a positive int", _positive_int),
    "mean": ("a list of 3 numbers", _three_numbers),
    "std": ("a list of 3 numbers", _three_numbers),
    "state_dict": ("a dict of tensors", lambda v: isinstance(v, dict)
                   and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                           for k, t in v.items())),
}
REQUIRED_KEYS = tuple(_REQUIRED)

# Messages are printed as one `ftsearch: ...` line; torch's can run to many lines.
_MAX_DETAIL = 300


class ModelFileError(ValueError):
    """A model file or image path that cannot be used; the message names it and why."""


def _one_line(text: object) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _MAX_DETAIL else flat[:_MAX_DETAIL] + " ..."


def _fit_problem(model: StagedNet, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` does not load into ``model``, in one line, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
                for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = [f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
             for what, found in (("missing", missing), ("unexpected", unexpected),
                                 ("of another shape", reshaped)) if found]
    return "; ".join(parts) or None



def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the network of a model file, in eval mode; returns it and the metadata.

    The network maps preprocessed images to class scores: logits for the linear head,
    a classical head's probabilities or (SVM) decision values (:func:`predict`).

    Raises:
        ModelFileError: A missing, unreadable, foreign or incomplete file, or weights that
            do not fit its backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike (a truncated file too)
        raise ModelFileError(f"{path}: not a readable model file ({_one_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an ftsearch model file (export one with "
                             f"`ftsearch export`)")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: model file version {payload.get('version')}, this "
                             f"ftsearch reads versions {list(READABLE_VERSIONS)}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ModelFileError(f"{path}: missing keys {missing}")
    for key, (what, valid) in _REQUIRED.items():
        if not valid(payload[key]):
            value = payload[key]
            shown = (repr(value) if isinstance(value, str | int | float | None)
                     else f"a {type(value).__name__}")
            raise ModelFileError(f"{path}: {key} must be {what}, not {_one_line(shown)}")
    if len(payload["class_names"]) != payload["num_classes"]:
        raise ModelFileError(f"{path}: {len(payload['class_names'])} class names for "
                             f"{payload['num_classes']} classes")
    name = payload["backbone"]
    try:
        model = build_backbone(name, num_classes=payload["num_classes"], weights="none",
                               **payload["backbone_kwargs"])
    except (ValueError, TypeError) as err:  # unknown name or arguments
        raise ModelFileError(f"{path}: cannot build backbone {name!r} "
                             f"({_one_line(err)})") from None
    problem = _fit_problem(model, payload["state_dict"])
    if problem is not None:
        raise ModelFileError(f"{path}: weights do not fit backbone {name}: {problem}")
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "head_state")}
    meta.setdefault("head", "linear")  # version 1
    if meta["head"] not in HEADS:
        raise ModelFileError(f"{path}: head must be one of {list(HEADS)}, not "
                             f"{_one_line(repr(meta['head']))}")
    if meta["head"] == "linear":
        return model, meta
    depth = meta.get("feature_depth")
    if not _positive_int(depth) or depth > len(model.stages):
        raise ModelFileError(f"{path}: feature_depth must be 1..{len(model.stages)} for "
                             f"{name}, not {_one_line(repr(depth))}")
    try:
        head = head_from_state(payload.get("head_state"))
    except (ValueError, TypeError, KeyError) as err:
        raise ModelFileError(f"{path}: unusable {meta['head']} head ({_one_line(err)})") from None
    return FeatureHeadNet(model, depth=depth, head=head).eval(), meta


def image_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the image files in folder ``path`` and all its subfolders.

    A folder is walked as the trial walks a class folder: top-down and sorted (a folder's
    files, then each subfolder in turn), hidden entries skipped, symlinks followed, each
    real file once; so the same tree gives the same list, in the same order, every time.

    Raises:
        ModelFileError: ``path`` does not exist, or no image file lies under it.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such image file or folder")
    files = _walk(path).paths
    if not files:
        raise ModelFileError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it "
                             f"or its subfolders")
    return files


def image_name(path: Path, root: str | Path) -> str:
    """How output names image ``path`` found under ``root``: its path below the folder
    ``root`` (``cat/01.png``), or its file name when ``root`` is the image itself."""
    root = Path(root)
    return path.name if path == root else path.relative_to(root).as_posix()


def prediction_lines(predictions: Sequence[tuple[Path, Sequence[tuple[str, float]]]], *,
                     root: str | Path) -> list[str]:
    """``ftsearch predict``'s output: per image its name (:func:`image_name`), then one
    ``class score`` item per class, most likely first, all separated by tabs."""
    return [f"{image_name(path, root)}\t" + "\t".join(f"{name} {p:.4f}" for name, p in classes)
            for path, classes in predictions]


def _read_image(path: Path, image_size: int) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = to_rgb(image)  # as the trial decoded its images (16-bit scaled, not clipped)
    if max(rgb.size) > image_size:
        # As trainables.data stores larger images: central square at image_size.
        rgb = ImageOps.fit(rgb, (image_size, image_size), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def scores_are_probabilities(meta: Mapping[str, Any]) -> bool:
    """Whether :func:`predict` gives probabilities (an SVM gives decision values: one-vs-one
    votes plus a confidence below one, as scikit-learn's ``decision_function``)."""
    return meta.get("head", "linear") != "svm"


def predict(model: nn.Module, meta: Mapping[str, Any], files: Sequence[Path], *, top: int = 5,
            batch_size: int = 64) -> tuple[list[tuple[Path, list[tuple[str, float]]]],
                                           list[tuple[Path, str]]]:
    """Class scores of each image, as the trial evaluated its validation images.

    Probabilities, except for an SVM head (:func:`scores_are_probabilities`).

    Returns:
        ``(predictions, failures)``: per readable file its ``top`` (class name,
        score) pairs, most likely first; per unreadable file why.
    """
    predictions, failures = [], []
    k = min(top, meta["num_classes"])
    for start in range(0, len(files), batch_size):
        images: dict[tuple[int, ...], list[tuple[Path, torch.Tensor]]] = {}
        for f in files[start:start + batch_size]:
            try:
                image = _read_image(f, meta["image_size"])
            except (OSError, UnidentifiedImageError) as err:
                failures.append((f, str(err)))
                continue
            images.setdefault(tuple(image.shape), []).append((f, image))
        for group in images.values():  # one forward pass per image size
            x = preprocess(torch.stack([img for _, img in group]),
                           resolution=meta["resolution"], mean=meta["mean"], std=meta["std"])
            with torch.no_grad():
                scores = model(x).float()
            # Ranked by the raw scores, as the trial ranks them (trainables.scoring): softmax
            # rounds the unlikely classes of a confident image to equal probabilities (0.0),
            # whose order topk leaves arbitrary, and top-5 would stop being the trial's.
            indices = scores.topk(k, dim=1).indices
            if meta.get("head", "linear") == "linear":  # logits; classical heads score
                scores = torch.softmax(scores, dim=1)
            values = scores.gather(1, indices)
            for (f, _), v, i in zip(group, values.tolist(), indices.tolist(), strict=True):
                predictions.append((f, [(meta["class_names"][c], p) for c, p in zip(i, v,
                                                                                    strict=True)]))
    order = {f: n for n, f in enumerate(files)}
    predictions.sort(key=lambda item: order[item[0]])
    return predictions, failures
