"""`ftsearch evaluate` on a class-folder tree, and `ftsearch predict` on a tree."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from search import contract as C
from search.cli import main
from search.evaluate import OUTPUTS, Evaluation, evaluate
from tests.conftest import TINY

# Read back as written: class names stay strings ("0", not 0), flags "True"/"False"/"".
_TEXT = {name: str for name in ("path", "true_class", "predicted_class", "correct", "in_top5",
                                "top5")}
_CLASS = {"class": str}


@pytest.fixture(scope="module")
def model_file(tiny_experiment, tmp_path_factory) -> Path:
    """The tiny search's best trial, exported."""
    path = tmp_path_factory.mktemp("evaluate_model") / "model.pt"
    assert main(["export", str(tiny_experiment), "--out", str(path)]) == C.EXIT_OK
    return path


@pytest.fixture(scope="module")
def meta(model_file) -> dict[str, Any]:
    return torch.load(model_file, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def class_tree(tiny_experiment, tmp_path_factory) -> Path:
    """The tiny search's validation images as <class name>/<index>.png: `ftsearch images`."""
    root = tmp_path_factory.mktemp("digits_tree") / "val"
    assert main(["images", str(tiny_experiment), "--out", str(root)]) == C.EXIT_OK
    return root


def test_images_writes_the_split_every_trial_got(class_tree, meta):
    from trainables.data import load_data

    val = load_data(TINY["data"], seed=TINY["seed"]).val
    assert sorted(p.name for p in class_tree.iterdir()) == sorted(meta["class_names"])
    files = sorted(class_tree.rglob("*.png"), key=lambda p: p.name)
    assert len(files) == len(val)
    labels = [meta["class_names"].index(p.parent.name) for p in files]
    assert labels == val.labels.tolist()  # <index>.png in the split's order, in its class
    first = np.asarray(Image.open(files[0]))
    assert (first == val.images[0].permute(1, 2, 0).numpy()).all()


def test_images_never_writes_into_a_folder_that_holds_files(class_tree, tiny_experiment,
                                                            capsys):
    before = _relative_images(class_tree)
    assert main(["images", str(tiny_experiment), "--out", str(class_tree)]) == C.EXIT_BAD_INPUT
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert _relative_images(class_tree) == before


@pytest.fixture(scope="module")
def evaluated(model_file, class_tree, tmp_path_factory) -> tuple[Path, str, Evaluation]:
    """``ftsearch evaluate`` on the whole tree: its --out folder, its stdout, and the
    :class:`Evaluation` it wrote (kept by a spy, so the images are scored once)."""
    out = tmp_path_factory.mktemp("evaluation") / "digits"
    results: list[Evaluation] = []

    def spy(*args: Any, **kwargs: Any) -> Evaluation:
        results.append(evaluate(*args, **kwargs))
        return results[-1]

    stdout = io.StringIO()  # capsys is per test; this runs once for the module
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr("search.evaluate.evaluate", spy)
        code = main(["evaluate", str(model_file), str(class_tree), "--out", str(out)])
    assert code == C.EXIT_OK and len(results) == 1
    return out, stdout.getvalue(), results[0]


def _relative_images(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def _recorded(experiment: Path, meta: dict[str, Any], metric: str) -> float:
    """The trial's score for the exported checkpoint's epoch, as epochs.parquet holds it."""
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    row = epochs[(epochs.trial_id == meta["trial_id"]) & (epochs.epoch == meta["epoch"])]
    return float(row[metric].item())


def _small_tree(class_tree: Path, root: Path, classes: list[str], per_class: int = 2) -> Path:
    """A few images of ``classes`` from ``class_tree``, linked into ``root``."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for image in sorted((class_tree / name).iterdir())[:per_class]:
            (root / name / image.name).symlink_to(image)
    return root


def test_evaluate_reproduces_the_trials_recorded_top1_and_top5(evaluated, class_tree, meta,
                                                               tiny_experiment):
    out, stdout, _ = evaluated
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    predictions = pd.read_csv(out / "predictions.csv", dtype=_TEXT, keep_default_na=False)
    assert predictions["path"].tolist() == _relative_images(class_tree)  # one row per image
    assert (predictions["true_class"] == predictions["path"].str.split("/").str[0]).all()
    assert (predictions["error"] == "").all()
    correct = predictions["correct"].map({"True": True, "False": False})
    assert (correct == (predictions["predicted_class"] == predictions["true_class"])).all()
    top5 = predictions["top5"].map(json.loads)
    assert (top5.str[0] == predictions["predicted_class"]).all() and (top5.str.len() == 5).all()
    top1 = 100.0 * correct.mean()
    recorded = _recorded(tiny_experiment, meta, "top1")
    assert abs(top1 - recorded) <= 0.5, (top1, recorded)
    in_top5 = 100.0 * predictions["in_top5"].eq("True").mean()
    assert abs(in_top5 - _recorded(tiny_experiment, meta, "top5")) <= 0.5
    assert f"top-1 {top1:.2f}%  top-5 {in_top5:.2f}%" in stdout
    assert f"{len(predictions)} images read of {len(predictions)}, 0 unreadable" in stdout


def test_per_class_table_and_confusion_matrix_agree_with_the_predictions(
        evaluated, class_tree, meta):
    out, stdout, _ = evaluated
    predictions = pd.read_csv(out / "predictions.csv", dtype=_TEXT, keep_default_na=False)
    per_class = pd.read_csv(out / "per_class.csv", dtype=_CLASS)
    assert per_class["class"].tolist() == meta["class_names"]  # the model's order
    folders = {name: len(list((class_tree / name).iterdir())) for name in meta["class_names"]}
    assert per_class.set_index("class")["images"].to_dict() == folders
    assert per_class["correct"].sum() == predictions["correct"].eq("True").sum()
    assert per_class["predicted"].tolist() == [
        int((predictions["predicted_class"] == name).sum()) for name in meta["class_names"]]
    for row in per_class.itertuples():
        assert row.top1 == pytest.approx(100.0 * row.correct / row.images)
        assert f"\n{row[1]:<5}  {row.images:>6}  {row.top1:>6.1f}" in stdout
    matrix = evaluated[2].confusion
    assert matrix.shape == (10, 10) and matrix.sum() == len(predictions)
    assert 100.0 * matrix.trace() / matrix.sum() == pytest.approx(
        100.0 * predictions["correct"].eq("True").mean())
    index = {name: i for i, name in enumerate(meta["class_names"])}
    pairs = predictions.groupby(["true_class", "predicted_class"]).size()
    assert {(index[t], index[p]): n for (t, p), n in pairs.items()} == {
        (t, p): n for (t, p), n in np.ndenumerate(matrix) if n}  # every cell, rows true
    assert matrix.sum(axis=1).tolist() == per_class["images"].tolist()  # rows: true class
    assert matrix.sum(axis=0).tolist() == per_class["predicted"].tolist()  # cols: predicted
    with Image.open(out / "confusion.png") as png:
        assert png.format == "PNG" and min(png.size) > 300


def test_predict_on_a_tree_prints_one_line_per_image_named_below_it(
        evaluated, model_file, class_tree, tmp_path, capsys):
    tree = _small_tree(class_tree, tmp_path / "tree", ["0", "1", "7"], per_class=4)
    nested = tree / "7" / "more" / "deeper"
    nested.mkdir(parents=True)
    for image in sorted((tree / "7").glob("*.png"))[:2]:  # two levels down now
        image.rename(nested / image.name)
    (tree / "0" / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert main(["predict", str(model_file), str(tree), "--top", "1"]) == C.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    names = [line.split("\t")[0] for line in lines]
    assert len(names) == 12 and sum(n.startswith("7/more/deeper/") for n in names) == 2
    # A folder's files, then its subfolders, each sorted: the same on every run.
    assert names == sorted(names, key=lambda n: (n.split("/")[0], n.count("/"), n))
    predicted = pd.read_csv(evaluated[0] / "predictions.csv", dtype=_TEXT).set_index(
        "path")["predicted_class"].rename(lambda p: p.rsplit("/", 1)[1])
    assert {n.rsplit("/", 1)[1]: line.split("\t")[1].rsplit(" ", 1)[0]
            for n, line in zip(names, lines, strict=True)} == \
        predicted[[n.rsplit("/", 1)[1] for n in names]].to_dict()  # scored as evaluate did


def test_an_unknown_class_folder_is_refused_naming_it_before_any_inference(
        model_file, class_tree, tmp_path, capsys, monkeypatch):
    tree = _small_tree(class_tree, tmp_path / "tree", ["0", "1"])
    _small_tree(class_tree, tree / "cats", ["2"])  # images, but of no class of the model
    monkeypatch.setattr("search.evaluate.predict", lambda *a, **k: pytest.fail("inference"))
    out = tmp_path / "out"
    assert main(["evaluate", str(model_file), str(tree), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ftsearch: {tree}: subfolder(s) 'cats' not a class of the model")
    assert "its classes are '0', '1', '2', '3'" in line
    assert not out.exists()


def test_images_directly_in_the_folder_are_refused(model_file, class_tree, tmp_path, capsys):
    tree = _small_tree(class_tree, tmp_path / "tree", ["0", "1"])
    (tree / "loose.png").symlink_to(next((class_tree / "2").iterdir()))
    assert main(["evaluate", str(model_file), str(tree), "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ftsearch: {tree}: 1 image file(s) directly in it ('loose.png')")


def test_absent_classes_and_unreadable_images_are_reported_not_dropped(
        model_file, class_tree, tmp_path, capsys):
    tree = _small_tree(class_tree, tmp_path / "tree", ["3", "5"])
    (tree / "5" / "zz_broken.png").write_bytes(b"not a png")
    assert main(["evaluate", str(model_file), str(tree)]) == C.EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert f"ftsearch: {tree / '5' / 'zz_broken.png'}: cannot read image" in captured.err
    assert "4 images read of 5, 1 unreadable" in captured.out
    assert "absent (no images): '0', '1', '2', '4', '6', '7', '8', '9'" in captured.out
    out = tmp_path / "tree-evaluation"  # the default: beside the folder, not in it
    predictions = pd.read_csv(out / "predictions.csv", dtype=_TEXT, keep_default_na=False)
    assert len(predictions) == 5
    broken = predictions[predictions["path"] == "5/zz_broken.png"].iloc[0]
    assert broken["error"] and broken["predicted_class"] == "" and broken["correct"] == ""
    per_class = pd.read_csv(out / "per_class.csv", dtype=_CLASS).set_index("class")
    assert per_class.loc["5", "images"] == 2 and per_class.loc["5", "unreadable"] == 1
    assert per_class.loc["0", "images"] == 0 and pd.isna(per_class.loc["0", "top1"])


def test_earlier_results_are_kept_unless_forced(model_file, class_tree, tmp_path, capsys):
    tree = _small_tree(class_tree, tmp_path / "tree", ["0", "1"], per_class=1)
    out = tmp_path / "out"
    argv = ["evaluate", str(model_file), str(tree), "--out", str(out)]
    assert main(argv) == C.EXIT_OK
    (out / "per_class.csv").write_text("mine")
    capsys.readouterr()
    assert main(argv) == C.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"ftsearch: --out: {out} already holds predictions.csv, per_class.csv, "
                    f"confusion.png; give another --out, or --force to replace them")
    assert (out / "per_class.csv").read_text() == "mine"
    assert main([*argv, "--force"]) == C.EXIT_OK
    assert (out / "per_class.csv").read_text().startswith("class,images,")
    assert main(["evaluate", str(model_file), str(tree), "--out", str(tree / "0" / "e")]) == 2
    assert "inside the evaluated folder" in capsys.readouterr().err
    assert sorted(os.listdir(tree / "0")) == sorted(os.listdir(class_tree / "0"))[:1]
