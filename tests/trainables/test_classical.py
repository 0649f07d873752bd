"""Classical heads as trials, and the LP-FT probe, on real digits and Lite0's packaged weights."""

from __future__ import annotations

import pytest
import torch

from trainables import metrics as M
from trainables.classical import HEAD_STATE_KEY
from trainables.finetune import run_trial
from trainables.models import stage_count

# 64 px digits: 300 training and 150 validation images.
DIGITS = {"source": "digits", "samples_per_class": 30, "val_fraction": 0.3}
LITE = {"backbone": "efficientnet_lite0", "weights": "packaged", "resolution": 64,
        "data": DIGITS, "seed": 0}
CHANCE = 10.0  # ten classes


def _run(config: dict, state: dict | None = None) -> tuple[list[dict], list[dict]]:
    reports, states = [], []
    run_trial(config, report=lambda m, s: (reports.append(m), states.append(s)), state=state)
    return reports, states


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("frozen"))


@pytest.mark.parametrize("head", ["logreg", "svm", "xgboost"])
def test_each_classical_head_is_one_complete_result_far_above_chance(head, cache_dir):
    reports, states = _run({**LITE, "head": head, "cache_dir": cache_dir,
                            "xgb_n_estimators": 100})
    assert len(reports) == 1
    result = reports[0]
    assert result[M.EPOCH] == 1 and result[M.COMPLETE] is True
    assert result[M.TOP1] >= CHANCE + 50, result
    assert result[M.TOP5] >= result[M.TOP1]
    # Probabilities give a loss; an SVM's decision values do not.
    assert (result[M.VAL_LOSS] is None) == (head == "svm")
    assert result[M.PARAMS] > 3_000_000 and result[M.GMACS] > 0
    assert states[0][HEAD_STATE_KEY]["kind"] == head


def test_the_linear_head_also_clears_chance_by_fifty_points(cache_dir):
    reports, _ = _run({**LITE, "freeze_depth": stage_count("efficientnet_lite0"), "epochs": 4,
                       "lr": 0.1, "batch_size": 32, "cache_dir": cache_dir})
    assert reports[-1][M.TOP1] >= CHANCE + 50, reports[-1]


def test_features_are_computed_once_then_every_head_only_fits(tmp_path):
    _run({**LITE, "head": "logreg", "cache_dir": str(tmp_path)})
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1  # the pooled features, [N, 1280]
    stamp = files[0].stat().st_mtime_ns
    _run({**LITE, "head": "svm", "cache_dir": str(tmp_path)})
    assert files[0].stat().st_mtime_ns == stamp and sorted(tmp_path.glob("*.pt")) == files
    features = torch.load(files[0], weights_only=True, mmap=True)["train"]
    assert features.ndim == 2 and features.shape[1] == 1280


def test_features_from_an_earlier_stage(cache_dir):
    reports, states = _run({**LITE, "head": "logreg", "features_from": 6,
                            "cache_dir": cache_dir})
    assert reports[0][M.TOP1] > CHANCE + 20
    whole, _ = _run({**LITE, "head": "logreg", "cache_dir": cache_dir})
    assert reports[0][M.GMACS] < whole[0][M.GMACS]  # stages 7..9 do not run
    assert reports[0][M.PARAMS] < whole[0][M.PARAMS]


def test_a_restored_classical_trial_reports_its_result_again(cache_dir):
    reports, states = _run({**LITE, "head": "logreg", "cache_dir": cache_dir})
    again, _ = _run({**LITE, "head": "logreg", "cache_dir": cache_dir}, state=states[0])
    assert again == reports


def test_a_probed_head_starts_epoch_one_above_a_random_head(cache_dir):
    trial = {**LITE, "epochs": 1, "lr": 0.01, "lr_scale": 0.1, "freeze_depth": 3,
             "batch_size": 32, "max_steps_per_epoch": 3, "cache_dir": cache_dir}
    random_head, _ = _run(trial)
    probed, states = _run({**trial, "head_init": "probe"})
    assert probed[0][M.TOP1] > random_head[0][M.TOP1] + 20, (probed, random_head)


def test_probing_a_fully_frozen_backbone_is_the_logistic_head(cache_dir):
    # Nothing trains the features: the probe is exactly the logreg head, whatever the
    # (here negligible) SGD steps do to the classifier.
    trial = {**LITE, "epochs": 1, "lr": 1e-9, "freeze_depth": stage_count("efficientnet_lite0"),
             "max_steps_per_epoch": 1, "cache_dir": cache_dir}
    probed, _ = _run({**trial, "head_init": "probe"})
    logreg, _ = _run({**LITE, "head": "logreg", "cache_dir": cache_dir})
    assert probed[0][M.TOP1] == pytest.approx(logreg[0][M.TOP1], abs=1.0)
