"""A trial's checkpoint as one standalone model file, usable without Ray.

The file is a ``torch.save`` of plain types only (dicts, lists, strings, numbers,
tensors), read back by :func:`search.predict.load_model` with ``weights_only=True``:
loading a model file never runs code from it. It holds the weights and everything
needed to use them: backbone name and constructor arguments, class names, input
resolution, normalisation, the image size the data was stored at, and the trial's
config and scores. A classical head (``logreg``, ``svm``, ``xgboost``) is stored beside
the backbone as its own state (:meth:`trainables.fitted_heads.FittedHead.state`: tensors, and
xgboost's JSON model text), with the stage its pooled features come from. The format
(its name, version and required keys) is defined once, beside its reader, in
:mod:`search.predict`.

The file is written atomically (a temporary file beside it, then a rename): ``--out``
is either the complete new model or exactly what it was before, never half a file.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from search import contract as C
from search.analysis import AnalysisError, leaderboard, load_experiment, trial_config
from search.predict import FORMAT, FORMAT_VERSION, ModelFileError, _fit_problem
from search.storage import FileTargetError, file_target
from trainables.classical import HEAD_STATE_KEY
from trainables.data import load_data, parse_spec
from trainables.finetune import build_model, load_checkpoint_state, resolve_trial_config
from trainables.params import CLASSICAL_HEADS
from trainables.runtime import TrialSetupError

__all__ = ["export_model", "export_summary", "model_file_target"]


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


def export_summary(meta: Mapping[str, Any], *, out: str | os.PathLike[str]) -> str:
    """``ftsearch export``'s one line about the model file ``meta`` describes."""
    top1 = "" if meta["top1"] is None else f", top-1 {meta['top1']:.2f}%"
    return (f"exported trial {meta['trial_id']} of {meta['experiment']} (epoch {meta['epoch']}"
            f"{top1}): {meta['backbone']}, {meta['num_classes']} classes, "
            f"{meta['resolution']} px -> {os.fspath(out)}")
