"""A trial's checkpoint as one standalone model file, and prediction with it, without Ray.

The file is a ``torch.save`` of plain types only (dicts, lists, strings,
numbers, tensors), so :func:`load_model` reads it with ``weights_only=True``:
loading a model file never runs code from it. It holds the weights and
everything needed to use them: backbone name and constructor arguments, class
names, input resolution, normalisation, the image size the data was stored
at, and the trial's config and scores.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from search import contract as C
from search.analysis import AnalysisError, leaderboard, load_experiment, trial_config
from trainables.data import IMAGE_EXTENSIONS, load_data, parse_spec, preprocess
from trainables.finetune import build_model, load_checkpoint_state, resolve_trial_config
from trainables.models import StagedNet, build_backbone
from trainables.runtime import TrialSetupError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "export_model",
    "image_files",
    "load_model",
    "predict",
]

FORMAT = "ftsearch-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file or image path that cannot be used; the message names it and why."""


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
        AnalysisError: Unreadable results, an unknown trial, a missing checkpoint.
    """
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
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise AnalysisError(f"{ckpt}: checkpoint does not fit trial {row['trial_id']}'s "
                            f"{cfg.backbone} ({err})") from None
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
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({**meta, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, out)  # a half-written model file is never left behind
    return meta


def load_model(path: str | Path) -> tuple[StagedNet, dict[str, Any]]:
    """Rebuilds the network of a model file, in eval mode; returns it and the metadata.

    Raises:
        ModelFileError: A missing, unreadable or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        raise ModelFileError(f"{path}: not a readable model file ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an ftsearch model file (export one with "
                             f"`ftsearch export`)")
    if payload.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file version {payload.get('version')}, this "
                             f"ftsearch reads version {FORMAT_VERSION}")
    model = build_backbone(payload["backbone"], num_classes=payload["num_classes"],
                           weights="none", **payload["backbone_kwargs"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


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
        rgb = image.convert("RGB")
    if max(rgb.size) > image_size:
        # As trainables.data stores larger images: central square at image_size.
        rgb = ImageOps.fit(rgb, (image_size, image_size), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def predict(model: StagedNet, meta: Mapping[str, Any], files: Sequence[Path], *, top: int = 5,
            batch_size: int = 64) -> tuple[list[tuple[Path, list[tuple[str, float]]]],
                                           list[tuple[Path, str]]]:
    """Class probabilities of each image, as the trial evaluated its validation images.

    Returns:
        ``(predictions, failures)``: per readable file its ``top`` (class name,
        probability) pairs, most likely first; per unreadable file why.
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
                probs = torch.softmax(model(x).float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            for (f, _), v, i in zip(group, values.tolist(), indices.tolist(), strict=True):
                predictions.append((f, [(meta["class_names"][c], p) for c, p in zip(i, v,
                                                                                    strict=True)]))
    order = {f: n for n, f in enumerate(files)}
    predictions.sort(key=lambda item: order[item[0]])
    return predictions, failures
