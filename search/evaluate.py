"""Accuracy of a model file on a labelled folder: top-1, top-5, per class, confusion matrix.

The folder holds one subfolder of images per class, named as the model's classes (its
``class_names``); each class folder is walked as the trial walks one (subfolders too,
sorted, hidden entries skipped, symlinks followed). Images are scored by
:func:`search.predict.predict`, the decoding, resizing, normalisation and forward pass of
``ftsearch predict`` and of the trial's validation, so on the trial's validation images the
top-1 here is the trial's recorded top-1.

The folder is checked before the model sees an image: a subfolder that is not a class of
the model, or an image lying in the folder itself, is an error naming it. A class of the
model with no images is reported as absent. An image that cannot be read is listed (in
``predictions.csv``, with why) and counted, never silently dropped; the accuracies are over
the images read.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from search.predict import ModelFileError, image_name, predict
from search.storage import FileTargetError, file_target, replace_file
from trainables.data import IMAGE_EXTENSIONS
from trainables.data.listing import _walk  # the walk the trial lists a class folder with

__all__ = [
    "OUTPUTS",
    "TOP_K",
    "Evaluation",
    "LabelledFolder",
    "default_out",
    "evaluate",
    "labelled_images",
    "output_dir",
    "summary_lines",
    "write_evaluation",
]

TOP_K = 5  # top-5, or top-k for k = every class of a model with fewer
OUTPUTS = ("predictions.csv", "per_class.csv", "confusion.png")
PREDICTION_COLUMNS = ("path", "true_class", "predicted_class", "score", "correct", "in_top5",
                      "top5", "error")
PER_CLASS_COLUMNS = ("class", "images", "correct", "top1", "top5", "predicted", "unreadable")
# Beyond these many classes a confusion matrix's cells are too small to hold a count, or
# its axes a name each: the colours remain.
_COUNTS_UP_TO, _NAMES_UP_TO = 30, 60
_SHOWN_NAMES = 20  # class names a message lists before "..."


@dataclass(frozen=True)
class LabelledFolder:
    """The image files of a labelled folder and the model's class index of each."""

    root: Path
    files: list[Path]
    labels: list[int]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured; the tables are what :func:`write_evaluation` writes."""

    root: Path
    class_names: list[str]
    top_k: int
    predictions: pd.DataFrame  # one row per image file, in file order (PREDICTION_COLUMNS)
    per_class: pd.DataFrame  # one row per class of the model, in its order (PER_CLASS_COLUMNS)
    confusion: np.ndarray  # [true, predicted] counts of the images read, model class order
    unreadable: list[tuple[Path, str]]

    @property
    def images(self) -> int:
        """Images read and scored (unreadable ones are not)."""
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent over the images read (NaN if none was)."""
        return _percent(int(np.trace(self.confusion)), self.images)

    @property
    def top5(self) -> float:
        """Top-``top_k`` accuracy in percent over the images read (NaN if none was)."""
        return _percent(int(self.predictions["in_top5"].eq(True).sum()), self.images)


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else float("nan")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN_NAMES else "")


def labelled_images(folder: str | Path, class_names: Sequence[str]) -> LabelledFolder:
    """The images under ``folder``'s class subfolders, labelled by the subfolder's name.

    Raises:
        ModelFileError: ``folder`` is missing, holds image files itself, no class
            subfolder, a subfolder not named as a class of the model (the message names
            them and lists the model's classes), or no image file at all.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ModelFileError(f"{root}: no such folder" if not root.exists()
                             else f"{root}: not a folder; give a folder of class subfolders")
    with os.scandir(root) as scan:
        entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    subfolders = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries
             if not e.is_dir() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    expected = (f"one subfolder of images per class, named as the model's classes: "
                f"{_names(class_names)}")
    if loose:
        raise ModelFileError(f"{root}: {len(loose)} image file(s) directly in it "
                             f"({_names(loose[:3])}{', ...' if len(loose) > 3 else ''}), "
                             f"so of no class; expected {expected}")
    if not subfolders:
        raise ModelFileError(f"{root}: no class subfolders; expected {expected}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in subfolders if name not in index]
    if unknown:
        raise ModelFileError(f"{root}: subfolder(s) {_names(unknown)} not a class of the "
                             f"model; its classes are {_names(class_names)}")
    files: list[Path] = []
    labels: list[int] = []
    for name in subfolders:
        found = _walk(root / name).paths
        files += found
        labels += [index[name]] * len(found)
    if not files:
        raise ModelFileError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its "
                             f"class subfolders")
    return LabelledFolder(root=root, files=files, labels=labels)


def evaluate(model: nn.Module, meta: Mapping[str, Any], images: LabelledFolder, *,
             batch_size: int = 64) -> Evaluation:
    """Scores every image of ``images`` with :func:`search.predict.predict` and tallies.

    Args:
        model: The network :func:`search.predict.load_model` returned.
        meta: Its metadata (``class_names``, resolution, normalisation...).
        images: From :func:`labelled_images` with the same ``class_names``.
        batch_size: Images per forward pass.
    """
    names = list(meta["class_names"])
    index = {name: i for i, name in enumerate(names)}
    k = min(TOP_K, len(names))
    scored, failures = predict(model, meta, images.files, top=k, batch_size=batch_size)
    top = dict(scored)
    why = dict(failures)
    rows = []
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for path, label in zip(images.files, images.labels, strict=True):
        row: dict[str, Any] = {"path": image_name(path, images.root), "true_class": names[label]}
        if path in top:
            classes = [name for name, _ in top[path]]
            confusion[label, index[classes[0]]] += 1
            row.update(predicted_class=classes[0], score=top[path][0][1],
                       correct=classes[0] == names[label], in_top5=names[label] in classes,
                       top5=json.dumps(classes), error="")
        else:  # kept as a row: an unreadable image is reported, not silently dropped
            row.update(predicted_class="", score=float("nan"), correct=None, in_top5=None,
                       top5="", error=why[path] or "unreadable")
        rows.append(row)
    predictions = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    return Evaluation(root=images.root, class_names=names, top_k=k, predictions=predictions,
                      per_class=_per_class(names, predictions, confusion),
                      confusion=confusion, unreadable=failures)


def _per_class(names: list[str], predictions: pd.DataFrame,
               confusion: np.ndarray) -> pd.DataFrame:
    read = predictions[predictions["error"] == ""]
    in_top = read[read["in_top5"].eq(True)]["true_class"].value_counts()
    failed = predictions[predictions["error"] != ""]["true_class"].value_counts()
    counts = confusion.sum(axis=1)
    return pd.DataFrame({
        "class": names,
        "images": counts,
        "correct": np.diag(confusion),
        "top1": [_percent(int(c), int(n)) for c, n in zip(np.diag(confusion), counts,
                                                           strict=True)],
        "top5": [_percent(int(in_top.get(name, 0)), int(n)) for name, n in zip(names, counts,
                                                                               strict=True)],
        "predicted": confusion.sum(axis=0),
        "unreadable": [int(failed.get(name, 0)) for name in names],
    }, columns=list(PER_CLASS_COLUMNS))


def default_out(folder: str | Path) -> Path:
    """``<FOLDER>-evaluation`` beside ``folder``: outside it, so its files are never read as
    images of the folder by the next evaluation."""
    path = Path(os.path.abspath(Path(folder).expanduser()))  # `.` and `..` resolved
    return path.parent / f"{path.name or 'root'}-evaluation"  # `/` has no name


def output_dir(out: str | Path | None, *, folder: str | Path, force: bool = False) -> Path:
    """The folder the evaluation of ``folder`` may be written to, checked before any work.

    Args:
        out: The ``--out`` folder, or None for :func:`default_out`.
        folder: The labelled folder evaluated.
        force: Replace files of :data:`OUTPUTS` that ``out`` already holds.

    Raises:
        FileTargetError: ``out`` is a file or inside ``folder``, one of its outputs exists
            (without ``force``), or cannot be written there (:func:`search.storage.file_target`).
    """
    path = default_out(folder) if out is None else Path(out).expanduser()
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real.exists() and not real.is_dir():
        raise FileTargetError(f"{path}: a file; name a folder for {', '.join(OUTPUTS)}")
    if real == root or root in real.parents:
        raise FileTargetError(f"{path}: inside the evaluated folder {folder}, whose images "
                              f"the outputs would join; name a folder outside it")
    existing = [name for name in OUTPUTS if (path / name).exists()]
    if existing and not force:
        raise FileTargetError(f"{path} already holds {', '.join(existing)}; give another "
                              f"--out, or --force to replace them")
    for name in OUTPUTS:
        file_target(path / name)
    return path


def _confusion_png(result: Evaluation) -> bytes:
    n = len(result.class_names)
    side = min(4.0 + 0.45 * n, 30.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    cells = ax.imshow(result.confusion, cmap="Blues", interpolation="nearest")
    fig.colorbar(cells, ax=ax, label="images", shrink=0.8)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"{result.root.name}: {result.images} images, top-1 {result.top1:.2f}%")
    if n <= _NAMES_UP_TO:
        ax.set_xticks(range(n), result.class_names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), result.class_names)
    if n <= _COUNTS_UP_TO:
        high = result.confusion.max() / 2
        for (t, p), count in np.ndenumerate(result.confusion):
            ax.text(p, t, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > high else "black")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_evaluation(result: Evaluation, out: Path) -> list[Path]:
    """Writes :data:`OUTPUTS` into ``out`` (made if missing), each atomically.

    Returns:
        The files written, in :data:`OUTPUTS` order.

    Raises:
        OSError: A write failed; each file is its old self or the whole new one.
    """
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "predictions.csv": result.predictions.to_csv(index=False).encode(),
        "per_class.csv": result.per_class.to_csv(index=False).encode(),
        "confusion.png": _confusion_png(result),
    }
    for name in OUTPUTS:
        replace_file(out / name, contents[name])
    return [out / name for name in OUTPUTS]


def _cell(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.1f}"


def summary_lines(result: Evaluation, meta: Mapping[str, Any],
                  written: Sequence[Path]) -> list[str]:
    """``ftsearch evaluate``'s report: totals, the model's recorded top-1, one line per class."""
    k = result.top_k
    lines = [f"{result.root}: {result.images} images read of {len(result.predictions)}, "
             f"{len(result.unreadable)} unreadable",
             f"top-1 {result.top1:.2f}%  top-{k} {result.top5:.2f}%"]
    if meta.get("top1") is not None:
        lines[-1] += (f"  (the model file records top-1 {meta['top1']:.2f}% for trial "
                      f"{meta.get('trial_id')}, epoch {meta.get('epoch')})")
    table = result.per_class
    width = max(5, *(len(name) for name in table["class"]))
    lines.append(f"{'class':<{width}}  {'images':>6}  {'top-1':>6}  {f'top-{k}':>6}  "
                 f"{'predicted':>9}")
    for row in table.itertuples(index=False):
        lines.append(f"{row[0]:<{width}}  {row.images:>6}  {_cell(row.top1):>6}  "
                     f"{_cell(row.top5):>6}  {row.predicted:>9}")
    absent = table.loc[(table["images"] == 0) & (table["unreadable"] == 0), "class"].tolist()
    if absent:
        lines.append(f"absent (no images): {_names(absent)}")
    if result.unreadable:
        lines.append(f"unreadable: {len(result.unreadable)} image(s), listed in "
                     f"predictions.csv (column error)")
    lines.append(f"wrote {', '.join(p.name for p in written)} -> {written[0].parent}")
    return lines
