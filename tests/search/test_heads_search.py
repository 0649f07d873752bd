"""A search mixing SGD fine-tuning with the three classical heads, run as a user runs it."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
import torch

from search.cli import main
from tests.conftest import run_ftsearch, write_config, write_val_images
from trainables.models import stage_count

LITE_STAGES = stage_count("efficientnet_lite0")
HEADS = ["linear", "logreg", "svm", "xgboost"]
CONFIG = {
    "name": "heads",
    "seed": 0,
    "data": {"source": "digits", "samples_per_class": 20, "val_fraction": 0.1},
    "train": {"backbone": "efficientnet_lite0", "weights": "packaged", "resolution": 64,
              "epochs": 2, "batch_size": 32, "max_steps_per_epoch": 3,
              "xgb_n_estimators": 50},
    "space": {
        "head": {"type": "choice", "values": HEADS},
        "freeze_depth": {"type": "int", "low": 0, "high": LITE_STAGES},
        "lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
        "svm_kernel": {"type": "choice", "values": ["linear", "rbf"]},
        "svm_c": {"type": "loguniform", "low": 0.5, "high": 5.0},
        "xgb_max_depth": {"type": "int", "low": 2, "high": 4},
    },
    # One point per head, so each runs whatever TPE proposes next.
    "search": {"num_samples": 6, "max_concurrent": 2, "points_to_evaluate": [
        {"head": "linear", "freeze_depth": LITE_STAGES, "lr": 0.05},
        {"head": "logreg"},
        {"head": "svm", "svm_kernel": "rbf", "svm_c": 2.0},
        {"head": "xgboost", "xgb_max_depth": 3},
    ]},
    # Synchronous HyperBand waits for a bracket's trials at each rung: a classical trial,
    # complete at epoch 1, must leave its bracket instead of holding the others back.
    "scheduler": {"type": "hyperband", "reduction_factor": 2},
    "resources": {"cpu": 1},
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    config = write_config(root / "heads.yaml", {**CONFIG, "storage": str(root / "runs")})
    proc = run_ftsearch("run", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "runs" / "heads"


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    return write_val_images(tmp_path_factory.mktemp("heads_val"), CONFIG["data"],
                            CONFIG["seed"])


@pytest.mark.slow
def test_every_trial_once_in_both_files_with_typed_head_columns(experiment):
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique
    assert set(trials["config.head"]) == set(HEADS)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    classical = trials[trials["config.head"] != "linear"]
    # Fitted in one go: one epoch row, complete (not stopped early), on the whole backbone.
    assert (classical["status"] == "TERMINATED").all(), classical[["config.head", "status"]]
    assert (classical["epochs"] == 1).all()
    assert (classical["config.freeze_depth"] == LITE_STAGES).all()
    assert (epochs[epochs["trial_id"].isin(classical["trial_id"])]["epoch"] == 1).all()
    # Each head's parameters only in its own trials.
    svm = trials["config.head"] == "svm"
    assert trials.loc[svm, "config.svm_c"].notna().all()
    assert trials.loc[~svm, "config.svm_c"].isna().all()
    assert trials.loc[trials["config.head"] == "linear", "config.lr"].notna().all()
    assert trials.loc[trials["config.head"] != "linear", "config.lr"].isna().all()
    # The SVM has no probabilities, so no loss; the others do.
    assert trials.loc[svm, "last_val_loss"].isna().all()
    assert trials.loc[trials["config.head"].isin(["logreg", "xgboost"]),
                      "last_val_loss"].notna().all()

    described = duckdb.sql(f"DESCRIBE SELECT * FROM '{experiment / 'trials.parquet'}'")
    types = {row[0]: row[1] for row in described.fetchall()}
    assert types["config.head"] == "VARCHAR" and types["config.svm_kernel"] == "VARCHAR"
    assert types["config.svm_c"] == "DOUBLE" and types["config.xgb_max_depth"] == "BIGINT"
    assert types["config.freeze_depth"] == "BIGINT"


def _predicted_top1(capsys, model, images) -> float:
    assert main(["predict", str(model), str(images), "--top", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    correct = 0
    for line in lines:
        name, *classes = line.split("\t")
        scores = [float(c.rsplit(" ", 1)[1]) for c in classes]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        correct += classes[0].rsplit(" ", 1)[0] == name.split("_")[1].removesuffix(".png")
    return 100.0 * correct / len(lines)


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_export_then_predict_reproduces_each_heads_top1(experiment, val_images, head,
                                                        tmp_path, capsys):
    trials = pd.read_parquet(experiment / "trials.parquet")
    row = trials[trials["config.head"] == head].sort_values("best_top1").iloc[-1]
    model = tmp_path / f"{head}.pt"
    assert main(["export", str(experiment), "--trial", row.trial_id, "--out", str(model)]) == 0
    capsys.readouterr()
    payload = torch.load(model, map_location="cpu", weights_only=True)  # no pickle
    assert payload["head"] == head
    if head != "linear":
        assert payload["head_state"]["kind"] == head
        assert payload["feature_depth"] == LITE_STAGES
    top1 = _predicted_top1(capsys, model, val_images)
    assert abs(top1 - payload["top1"]) <= 0.5, (head, top1, payload["top1"])
