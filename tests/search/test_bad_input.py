"""The bad-input corpus: every case exits 2 before Ray starts, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.cli import main

GOOD = {
    "name": "bad",
    "data": {"source": "digits"},
    "train": {"epochs": 2},
    "space": {"lr_scale": {"type": "loguniform", "low": 0.001, "high": 1.0}},
}


def _imagefolder(root: Path, classes: list[str], images: int = 2) -> Path:
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (16, 16), (i * 40, 80, 120)).save(root / name / f"{i}.png")
    return root


def _set(raw: dict, dotted: str, value) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(raw))
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


# (field the message must name, change to the good config, extra words the message must hold)
CASES = [
    ("bogus", ("bogus", 1), "unknown key"),
    ("space.backbone", ("space.backbone", "resnet9000"), "resnet18"),
    ("space.freeze_depth.high", ("space.freeze_depth", {"type": "int", "low": 0, "high": 7}),
     "0..5"),
    ("train.freeze_depth", ("train.freeze_depth", 6), "0..5"),
    ("train.lr", ("train.lr", 0), "> 0"),
    ("train.lr", ("train.lr", "fast"), "> 0"),
    ("space.lr_scale", ("space.lr_scale", {"type": "loguniform", "low": 0, "high": 0.1}),
     "> 0"),
    ("space.lr_scale", ("space.lr_scale", {"type": "loguniform", "low": 0.1, "high": 0.01}),
     "below"),
    ("space", ("space", {}), "no parameter is searched"),
    ("search.algorithm", ("search.algorithm", "bayes"), "optuna"),
    ("scheduler.type", ("scheduler.type", "fifo"), "asha"),
    ("scheduler.grace_period", ("scheduler.grace_period", 3), "2 epochs"),
    ("resources.gpu", ("resources.gpu", -0.5), ">= 0"),
    ("resources.gpu", ("resources.gpu", 64), "GPU"),
    ("train.resolution", ("train.resolution", 0), "> 0"),
    ("search.num_samples", ("search.num_samples", 0), ">= 1"),
    ("train.weights", ("train.weights", "packaged"), "efficientnet_lite0"),
    ("data.source", ("data.source", "mnist"), "digits"),
    ("data.path", ("data", {"source": "imagefolder", "path": "/nonexistent/images"}), ""),
]


@pytest.mark.parametrize(("field", "change", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, field, change, words):
    raw = _set({**GOOD, "storage": str(tmp_path / "runs")}, *change)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ftsearch: ")]
    assert any(field in ln and words in _normalise(ln) for ln in lines), err
    assert not (tmp_path / "runs").exists()  # nothing created, Ray never started


def _normalise(text: str) -> str:
    return text.replace("greater than or equal to", ">=")


@pytest.mark.parametrize("case", ["empty", "one_class", "unwritable"])
def test_bad_paths(tmp_path, capsys, case):
    if case == "empty":
        (tmp_path / "images").mkdir()
        change, field = ("data", {"source": "imagefolder", "path": str(tmp_path / "images")}), \
            "data.path"
    elif case == "one_class":
        _imagefolder(tmp_path / "images", ["cat"])
        change, field = ("data", {"source": "imagefolder", "path": str(tmp_path / "images")}), \
            "data.path"
    else:
        (tmp_path / "file").write_text("not a directory")
        change, field = ("storage", str(tmp_path / "file" / "runs")), "storage"
    raw = _set({**GOOD, "storage": str(tmp_path / "runs")}, *change)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("text", ["name: [unclosed\n", "- a\n- list\n", ""])
def test_config_file_that_is_not_yaml_or_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    assert "config:" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
