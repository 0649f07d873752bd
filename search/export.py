"""A trial's checkpoint as one standalone model file, and prediction with it, without Ray.

The file is a ``torch.save`` of plain types only (dicts, lists, strings,
numbers, tensors), so :func:`load_model` reads it with ``weights_only=True``:
loading a model file never runs code from it. It holds the weights and
everything needed to use them: backbone name and constructor arguments, class
names, input resolution, normalisation, the image size the data was stored
at, and the trial's config and scores. A classical head (``logreg``, ``svm``,
``xgboost``) is stored beside the backbone as its own state
(:meth:`trainables.heads.FittedHead.state`: tensors, and xgboost's JSON model text),
with the stage its pooled features come from.

The file is written atomically (a temporary file beside it, then a rename): ``--out``
is either the complete new model or exactly what it was before, never half a file.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from search import contract as C
from search.analysis import AnalysisError, leaderboard, load_experiment, trial_config
from search.storage import FileTargetError, file_target
from trainables.classical import HEAD_STATE_KEY, FeatureHeadNet
from trainables.data import IMAGE_EXTENSIONS, load_data, parse_spec, preprocess, to_rgb
from trainables.finetune import build_model, load_checkpoint_state, resolve_trial_config
from trainables.heads import head_from_state
from trainables.models import StagedNet, build_backbone
from trainables.params import CLASSICAL_HEADS, HEADS
from trainables.runtime import TrialSetupError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "ModelFileError",
    "export_model",
    "image_files",
    "load_model",
    "model_file_target",
    "predict",
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


def model_file_target(out: str | os.PathLike[str]) -> Path:
    """The regular file a model may be written to as ``out``, checked before any work.

    Raises:
        ModelFileError: ``out`` cannot be written as a file (:func:`search.storage.file_target`).
    """
    try:
        return file_target(out)
    except FileTargetError as err:
        raise ModelFileError(str(err)) from None


def _save_atomically(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file beside it, removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique, so two exports to one directory never share it; torch creates it, so it gets
    # the usual permissions (umask), as a plain write would.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(dict(payload), tmp)
        os.replace(tmp, path)  # atomic: `path` is the old file or the whole new one
    finally:  # also on KeyboardInterrupt
        tmp.unlink(missing_ok=True)


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


def _checkpoint_dir(directory: Path, recorded: Any, trial_id: str) -> Path:
    if not isinstance(recorded, str) or not recorded:
        raise AnalysisError(f"{directory / C.TRIALS_FILE}: trial {trial_id} has no checkpoint")
    path = Path(recorded)
    if not path.is_dir():
        # The experiment was moved or copied: the trial folder keeps its place under it.
        moved = directory / path.parent.name / path.name
        if not moved.is_dir():
            raise AnalysisError(f"{path}: checkpoint of trial {trial_id} does not exist "
                                f"(nor at {moved})")
        path = moved
    return path


def _class_names(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    try:
        names = load_data(cfg.data, seed=cfg.seed).class_names
    except (ValueError, OSError) as err:  # data not reachable from this machine
        warnings.warn(f"class names unavailable ({err}); using class indices", stacklevel=3)
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise AnalysisError(f"data: {len(names)} classes, but the checkpoint's classifier has "
                            f"{num_classes} outputs")
    return list(names)


def _head_outputs(state_dict: Mapping[str, torch.Tensor]) -> int:
    heads = [v for k, v in state_dict.items() if k.startswith("head.") and k.endswith(".weight")
             and v.ndim == 2]
    if not heads:
        raise AnalysisError("checkpoint: no classifier weight (head.*.weight) in its model")
    return int(heads[-1].shape[0])


def export_model(directory: str | Path, *, out: str | Path,
                 trial_id: str | None = None) -> dict[str, Any]:
    """Writes the best (or ``trial_id``'s) checkpoint of an experiment as one model file.

    Args:
        directory: The experiment directory.
        out: The model file to write (``.pt``).
        trial_id: A trial to export instead of the best finished one.

    Returns:
        The file's metadata (everything but the weights).

    Raises:
        ModelFileError: ``out`` cannot be a model file (see :func:`model_file_target`);
            checked first, before any work.
        AnalysisError: Unreadable results, an unknown trial, a missing checkpoint.
        OSError: Writing failed (disk full...); ``out`` is as it was and no temporary
            file remains.
    """
    target = model_file_target(out)
    exp = load_experiment(directory)
    board = leaderboard([exp])
    if trial_id is None:
        row = C.best_trial(board)
        if row is None:
            raise AnalysisError(f"{exp.directory / C.TRIALS_FILE}: no finished trial to "
                                f"export")
    else:
        match = board[board["trial_id"] == trial_id]
        if match.empty:
            raise AnalysisError(f"{exp.directory / C.TRIALS_FILE}: no trial {trial_id!r}; "
                                f"trials are {sorted(board['trial_id'])}")
        row = match.iloc[0]
    ckpt = _checkpoint_dir(exp.directory, row["checkpoint"], row["trial_id"])
    try:
        state = load_checkpoint_state(ckpt)
    except Exception as err:  # torch raises many kinds for a damaged file
        raise AnalysisError(f"{ckpt}: unreadable checkpoint ({err})") from None
    try:
        cfg = resolve_trial_config(trial_config(exp, row))
    except TrialSetupError as err:
        raise AnalysisError(f"{exp.directory / C.CONFIG_FILE}: trial {row['trial_id']}: "
                            f"{err}") from None
    num_classes = _head_outputs(state["model"])
    model = build_model(cfg.model_copy(update={"weights": "none"}), num_classes=num_classes)
    problem = _fit_problem(model, state["model"])
    if problem is not None:
        raise AnalysisError(f"{ckpt}: checkpoint does not fit trial {row['trial_id']}'s "
                            f"{cfg.backbone} ({problem})")
    model.load_state_dict(state["model"])
    classical = cfg.head in CLASSICAL_HEADS
    if classical and HEAD_STATE_KEY not in state:
        raise AnalysisError(f"{ckpt}: checkpoint of trial {row['trial_id']} has no fitted "
                            f"{cfg.head} head")
    epoch = int(state["epoch"])
    scores = exp.epochs[(exp.epochs["trial_id"] == row["trial_id"])
                        & (exp.epochs["epoch"] == epoch)]
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "experiment": exp.name,
        "trial_id": str(row["trial_id"]),
        "epoch": epoch,
        "top1": float(scores["top1"].iloc[0]) if len(scores) else None,
        "top5": float(scores["top5"].iloc[0]) if len(scores) else None,
        "backbone": model.name,
        "backbone_kwargs": cfg.efficientnet_kwargs(),
        "num_classes": num_classes,
        "class_names": _class_names(cfg, num_classes),
        "resolution": cfg.input_resolution(),
        "mean": list(model.mean),
        "std": list(model.std),
        "image_size": parse_spec(cfg.data).image_size,  # the spec fills in its default
        "trial_config": cfg.model_dump(),
        "head": cfg.head,
        # Stages whose pooled output feeds a classical head (the linear head uses them all).
        "feature_depth": cfg.freeze_depth if classical else len(model.stages),
    }
    payload = {**meta, "state_dict": model.state_dict()}
    if classical:
        payload["head_state"] = state[HEAD_STATE_KEY]
    _save_atomically(payload, target)
    return meta


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
    """``path`` itself, or the image files in folder ``path`` (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such image file or folder")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ModelFileError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


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
                probs = model(x).float()
            if meta.get("head", "linear") == "linear":  # logits; classical heads score
                probs = torch.softmax(probs, dim=1)
            values, indices = probs.topk(k, dim=1)
            for (f, _), v, i in zip(group, values.tolist(), indices.tolist(), strict=True):
                predictions.append((f, [(meta["class_names"][c], p) for c, p in zip(i, v,
                                                                                    strict=True)]))
    order = {f: n for n, f in enumerate(files)}
    predictions.sort(key=lambda item: order[item[0]])
    return predictions, failures
