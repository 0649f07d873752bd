"""`ftsearch export` -> `ftsearch predict`: one standalone model file, used without Ray."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from search.cli import main
from search.export import FORMAT
from tests.conftest import ROOT, TINY, ftsearch_env
from trainables.data import load_data


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
    folder = tmp_path_factory.mktemp("digits_val")
    data = load_data(TINY["data"], seed=TINY["seed"])
    for i, (image, label) in enumerate(zip(data.val.images, data.val.labels, strict=True)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}_{int(label)}.png")
    return folder


def test_model_file_holds_weights_and_everything_to_use_them(model_file, tiny_experiment):
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    best = trials.sort_values(["best_top1", "last_top1", "trial_id"],
                              ascending=[False, False, True]).iloc[0]
    assert payload["format"] == FORMAT and payload["trial_id"] == best.trial_id
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
