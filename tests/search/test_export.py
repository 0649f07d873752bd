"""`ftsearch export` -> `ftsearch predict`: one standalone model file, used without Ray."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from search import contract as C
from search.cli import main
from search.predict import FORMAT, REQUIRED_KEYS
from tests.conftest import ROOT, TINY, ftsearch_env, run_ftsearch, write_val_images


def _ftsearch_without_ray(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys; from search.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY_IMPORTED', 'ray' in sys.modules, file=sys.stderr); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=ftsearch_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_file(tiny_experiment, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    proc = _ftsearch_without_ray("export", str(tiny_experiment), "--out", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RAY_IMPORTED False" in proc.stderr
    return path


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """The tiny search's validation images as PNG files named <index>_<label>.png."""
    return write_val_images(tmp_path_factory.mktemp("digits_val"), TINY["data"], TINY["seed"])


def test_model_file_holds_weights_and_everything_to_use_them(model_file, tiny_experiment):
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    best = trials.sort_values(["best_top1", "last_top1", "trial_id"],
                              ascending=[False, False, True]).iloc[0]
    assert payload["format"] == FORMAT and payload["trial_id"] == best.trial_id
    assert set(REQUIRED_KEYS) <= set(payload)  # what load_model checks for
    assert payload["backbone"] == best["config.backbone"]
    assert payload["num_classes"] == 10 and payload["class_names"] == [str(i) for i in range(10)]
    assert payload["resolution"] == TINY["train"]["resolution"]
    assert len(payload["mean"]) == 3 and len(payload["std"]) == 3
    assert payload["trial_config"]["lr"] == best["config.lr"]
    assert payload["top1"] == pytest.approx(best.best_top1)  # the best-scoring checkpoint
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())


def test_predict_on_validation_images_reproduces_the_recorded_top1(model_file, val_images):
    proc = _ftsearch_without_ray("predict", str(model_file), str(val_images), "--top", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAY_IMPORTED False" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    files = sorted(p.name for p in val_images.iterdir())
    assert [line.split("\t")[0] for line in lines] == files
    correct = 0
    for line in lines:
        name, *classes = line.split("\t")
        pairs = [c.rsplit(" ", 1) for c in classes]
        probs = [float(p) for _, p in pairs]
        assert len(pairs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        correct += pairs[0][0] == name.split("_")[1].removesuffix(".png")
    top1 = 100.0 * correct / len(lines)
    recorded = torch.load(model_file, weights_only=True)["top1"]
    assert abs(top1 - recorded) <= 0.5, (top1, recorded)


def test_export_a_named_trial_and_predict_one_image(tiny_experiment, val_images, tmp_path,
                                                    capsys):
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    worst = trials.sort_values("best_top1").iloc[0]
    out = tmp_path / "named.pt"
    assert main(["export", str(tiny_experiment), "--trial", worst.trial_id, "--out",
                 str(out)]) == 0
    payload = torch.load(out, weights_only=True)
    epochs = pd.read_parquet(tiny_experiment / "epochs.parquet")
    curve = epochs[epochs.trial_id == worst.trial_id].set_index("epoch").top1
    assert payload["trial_id"] == worst.trial_id and payload["top1"] == curve[payload["epoch"]]
    image = sorted(val_images.iterdir())[0]
    capsys.readouterr()
    assert main(["predict", str(out), str(image), "--top", "2"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    name, first, second = line.split("\t")
    assert name == image.name
    assert float(first.rsplit(" ", 1)[1]) >= float(second.rsplit(" ", 1)[1])


def test_bad_inputs_name_the_file_and_exit_2(tiny_experiment, tmp_path, capsys):
    assert main(["export", str(tiny_experiment), "--trial", "nope", "--out",
                 str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_experiment / 'trials.parquet'}: no trial 'nope'; trials are [" in err
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"garbage")
    assert main(["predict", str(not_a_model), str(tmp_path)]) == 2
    assert f"{not_a_model}: not a readable model file" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(1)}, not_a_model)
    assert main(["predict", str(not_a_model), str(tmp_path)]) == 2
    assert f"{not_a_model}: not an ftsearch model file" in capsys.readouterr().err


# --------------------------------------------------------------------------- --out


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``root``: its type and, for a regular file, its bytes."""
    return {str(p.relative_to(root)): (p.lstat().st_mode,
                                       p.read_bytes() if stat.S_ISREG(p.lstat().st_mode) else None)
            for p in root.rglob("*")}


def _one_out_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftsearch: --out: "), err
    return lines[0]


def _fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    return str(tmp / "fifo")


def _link_to_fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "fifo")
    (tmp / "link.pt").symlink_to(tmp / "fifo")
    return str(tmp / "link.pt")


def _under_a_file(tmp: Path) -> str:
    (tmp / "file").write_bytes(b"not a directory")
    return str(tmp / "file" / "sub" / "model.pt")


def _directory(tmp: Path) -> str:
    (tmp / "models").mkdir()
    return str(tmp / "models")


# (make the --out argument in a temporary folder, what the message says about it)
BAD_OUTS: dict[str, tuple[Callable[[Path], str], str]] = {
    "empty": (lambda tmp: "", "empty path"),
    "directory": (_directory, "models: a directory"),
    "directory name": (lambda tmp: f"{tmp}/new/", "new/: names a directory"),
    "fifo": (_fifo, "fifo: a FIFO, not a regular file"),
    "link to a fifo": (_link_to_fifo, "link.pt (a link to "),
    "under a regular file": (_under_a_file, "file is a file, not a directory"),
    "unwritable place": (lambda tmp: "/proc/ftsearch-model.pt", "cannot create files in /proc"),
}


@pytest.mark.parametrize("case", BAD_OUTS)
def test_a_bad_out_is_refused_before_any_work_and_nothing_is_touched(case, tmp_path, capsys):
    make, says = BAD_OUTS[case]
    out = make(tmp_path)
    before = _snapshot(tmp_path)
    # No experiment there: a refusal about --out shows it came before the results were read.
    assert main(["export", str(tmp_path / "no-experiment"), "--out", out]) == C.EXIT_BAD_INPUT
    assert says in _one_out_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before  # nothing created, replaced or left behind


def test_dev_null_is_refused_and_stays_a_device(tmp_path):
    before = os.stat("/dev/null")
    proc = run_ftsearch("export", str(tmp_path / "no-experiment"), "--out", "/dev/null",
                        timeout=300)
    assert proc.returncode == C.EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert _one_out_line(proc.stderr) == ("ftsearch: --out: /dev/null: a character device, "
                                          "not a regular file")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino  # the very same node, not a new one


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_out_or_folder_is_refused(tmp_path, capsys):
    (tmp_path / "ro.pt").write_bytes(b"keep me")
    (tmp_path / "ro.pt").chmod(0o444)
    (tmp_path / "locked").mkdir(mode=0o555)
    before = _snapshot(tmp_path)
    for out, says in ((tmp_path / "ro.pt", "a read-only file"),
                      (tmp_path / "locked" / "m.pt", "cannot create files in")):
        assert main(["export", str(tmp_path / "no-experiment"), "--out", str(out)]) == 2
        assert says in _one_out_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


def test_export_writes_model_pt_by_default_and_through_a_link(tiny_experiment, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.pt").write_bytes(b"an older model")
    (tmp_path / "model.pt").symlink_to("old.pt")
    assert main(["export", str(tiny_experiment)]) == C.EXIT_OK
    assert (tmp_path / "model.pt").is_symlink()  # the link stays; its file is replaced
    assert torch.load(tmp_path / "old.pt", weights_only=True)["format"] == FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "old.pt"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   KeyboardInterrupt()], ids=["disk full", "interrupted"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(
        error, tiny_experiment, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the old model")

    def half_save(obj: Any, f: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a model")
        raise error

    monkeypatch.setattr(torch, "save", half_save)
    argv = ["export", str(tiny_experiment), "--out", str(out)]
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    else:
        assert main(argv) == C.EXIT_FAILED
        assert _one_out_line(capsys.readouterr().err) == (
            f"ftsearch: --out: {out}: not written (No space left on device)")
    assert out.read_bytes() == b"the old model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# --------------------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def payload(model_file) -> dict[str, Any]:
    return torch.load(model_file, map_location="cpu", weights_only=True)


def _without_first_weight(p: dict[str, Any]) -> None:
    p["state_dict"] = dict(list(p["state_dict"].items())[1:])


# (change a complete model file's contents, what the refusal says)
INCOMPLETE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "no weights": (lambda p: p.pop("state_dict"), "missing keys ['state_dict']"),
    "no backbone": (lambda p: p.pop("backbone"), "missing keys ['backbone']"),
    "num_classes a string": (lambda p: p.update(num_classes="10"),
                             "num_classes must be a positive int, not '10'"),
    "fewer class names": (lambda p: p.update(class_names=p["class_names"][:3]),
                          "3 class names for 10 classes"),
    "unknown backbone": (lambda p: p.update(backbone="resnet9000"),
                         "cannot build backbone 'resnet9000'"),
    "another backbone's name": (lambda p: p.update(backbone="resnet18"),
                                "weights do not fit backbone resnet18: "),
    "a weight missing": (_without_first_weight, ": 1 missing ("),
}


def _refused_model(model: Path, capsys) -> str:
    assert main(["predict", str(model), str(model.parent)]) == C.EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ftsearch: {model}: "), lines
    return lines[0]


@pytest.mark.parametrize("case", INCOMPLETE)
def test_an_incomplete_model_file_is_refused_naming_what_is_wrong(case, payload, tmp_path,
                                                                  capsys):
    change, says = INCOMPLETE[case]
    broken = dict(payload)
    change(broken)
    model = tmp_path / "model.pt"
    torch.save(broken, model)
    assert says in _refused_model(model, capsys)


def test_a_truncated_model_file_is_refused(model_file, tmp_path, capsys):
    model = tmp_path / "model.pt"
    data = model_file.read_bytes()
    model.write_bytes(data[:len(data) // 2])
    assert "not a readable model file" in _refused_model(model, capsys)
