"""The bad-input corpus: every case exits 2 before Ray starts, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from search.cli import main
from tests.conftest import FTSEARCH, ROOT, ftsearch_env

# Peak memory a refused alias bomb may take: the interpreter and the config modules, with
# room to spare, and far below the gigabytes the bomb expands to.
_BOMB_MAX_RSS_MB = 200

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
    ("train.freeze_depth", ("train.freeze_depth", 2), "random initial values"),
    ("train.head", ("train.head", "svm"), "weights 'none'"),
    ("train.svm_c", ("train.svm_c", 2.0), "head 'svm' only"),
    ("train.features_from", ("train", {"epochs": 2, "head": "logreg", "weights": "packaged",
                                       "backbone": "efficientnet_lite0", "features_from": 10}),
     "1..9"),
    ("train.head_init", ("train.head_init", "warm"), "probe"),
    ("train.lr", ("train.lr", 0), "greater than 0"),
    ("train.lr", ("train.lr", "fast"), "valid number"),
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
    ("train.resolution", ("train.resolution", 0), ">= 32"),
    ("search.num_samples", ("search.num_samples", 0), ">= 1"),
    ("train.weights", ("train.weights", "packaged"), "efficientnet_lite0"),
    ("data.source", ("data.source", "mnist"), "digits"),
    ("data.path", ("data", {"source": "imagefolder", "path": "/nonexistent/images"}),
     "does not exist"),
]


@pytest.mark.parametrize(("field", "change", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, field, change, words):
    raw = _set({**GOOD, "storage": str(tmp_path / "runs")}, *change)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert field in line and words in _normalise(line), line
    assert not (tmp_path / "runs").exists()  # nothing created, Ray never started


def _one_line(err: str) -> str:
    """The one ``ftsearch:`` line of ``err``; fails on a second line or a traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftsearch: "), err
    return lines[0]


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
    assert _one_line(capsys.readouterr().err).startswith(f"ftsearch: {field}: ")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["name: [unclosed\n", "- a\n- list\n", ""])
def test_config_file_that_is_not_yaml_or_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    assert "config:" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _alias_bomb(levels: int = 8, width: int = 9) -> str:
    """A "billion laughs" document: each level a list of ``width`` aliases of the one before."""
    lines = ["l0: &l0 lol"]
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"  # 9**8 = 43 million strings once expanded


@pytest.mark.parametrize(("case", "words"), [
    ("directory", "is a directory"),
    ("not_utf8", "is not UTF-8"),
    ("too_large", "larger than 1 MB"),
    ("alias_bomb", "through its aliases"),
])
def test_config_files_that_are_not_small_text(tmp_path, capsys, case, words):
    path = tmp_path / "c.yaml"
    if case == "directory":
        path.mkdir()
    elif case == "not_utf8":
        path.write_bytes(b"\xff\xfename: x\n")
    elif case == "too_large":
        path.write_text(yaml.safe_dump({**GOOD, "storage": str(tmp_path / "runs")})
                        + "# padding\n" * 110_000)
    else:
        path.write_text(_alias_bomb())
    assert main(["run", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"ftsearch: config: '{path}' ") and words in line, line
    assert not (tmp_path / "runs").exists()


# Runs the command given to it and prints its exit code, stderr and peak RSS. A child's
# ru_maxrss starts from the memory of the process that forked it, so the CLI is forked
# from this small interpreter, not from pytest (which holds torch: ~600 MB).
_PEAK_RSS = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=60)
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
print(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "peak_mb": peak_kb / 1024}))
"""


def test_alias_bomb_costs_neither_memory_nor_time(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, *FTSEARCH, "run", str(path)],
                          cwd=ROOT, env=ftsearch_env(), capture_output=True, text=True,
                          timeout=90)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout)
    assert result["code"] == 2, result["stderr"]
    assert "through its aliases" in _one_line(result["stderr"])
    assert result["peak_mb"] < _BOMB_MAX_RSS_MB, result
    assert wall < 5, f"{wall:.2f} s"


def test_a_dashboard_ray_address_does_not_change_a_refusal(tmp_path):
    # Ray Jobs exports RAY_ADDRESS; an http:// one is a dashboard, not a cluster to join.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_set({**GOOD, "storage": str(tmp_path / "runs")},
                                        "train.lr", 0)))
    env = {**ftsearch_env(), "RAY_ADDRESS": "http://127.0.0.1:8265"}
    proc = subprocess.run([*FTSEARCH, "run", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr).startswith("ftsearch: train.lr: ")
    assert not (tmp_path / "runs").exists()
