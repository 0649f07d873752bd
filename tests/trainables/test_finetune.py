from __future__ import annotations

import pytest
import torch

from trainables import metrics as M
from trainables.finetune import resolve_trial_config, run_trial
from trainables.runtime import TrialSetupError

DIGITS = {"source": "digits", "samples_per_class": 20, "val_fraction": 0.3}
SMALL = {
    "backbone": "efficientnet_lite0",
    "weights": "packaged",
    "resolution": 32,
    "epochs": 2,
    "batch_size": 32,
    "data": DIGITS,
    "lr": 0.05,
    "freeze_depth": 1,
    "max_steps_per_epoch": 3,
}


class _Stop(Exception):
    pass


def test_one_epoch_on_digits_beats_chance():
    reports = []
    last = run_trial(
        {
            "backbone": "efficientnet_lite0",
            "weights": "packaged",
            "resolution": 64,
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.1,
            "lr_scale": 0.1,
            "freeze_depth": 9,
            "data": DIGITS,
        },
        report=lambda m, s: reports.append(m),
    )
    assert len(reports) == 1 and reports[0][M.EPOCH] == 1
    assert last[M.TOP1] > 30.0, last  # chance is 10%
    assert last[M.TOP5] >= last[M.TOP1]
    for key in M.EPOCH_METRICS + (M.PARAMS, M.GMACS):
        assert key in last
    assert last[M.GMACS] > 0 and last[M.PARAMS] > 3_000_000


def test_resume_from_epoch_one_checkpoint_is_identical_to_an_uninterrupted_run(tmp_path):
    states = []
    run_trial(SMALL, report=lambda m, s: states.append(s))
    uninterrupted = states[-1]

    saved = []

    def stop_after_first(metrics, state):
        path = tmp_path / f"state{metrics[M.EPOCH]}.pt"
        torch.save(state, path)
        saved.append(path)
        raise _Stop

    with pytest.raises(_Stop):
        run_trial(SMALL, report=stop_after_first)
    restored = torch.load(saved[0], weights_only=True)
    assert restored["epoch"] == 1

    resumed = []
    run_trial(SMALL, report=lambda m, s: resumed.append((m, s)), state=restored)
    assert [m[M.EPOCH] for m, _ in resumed] == [2]
    final = resumed[-1][1]["model"]
    for key, value in uninterrupted["model"].items():
        assert torch.allclose(value.float(), final[key].float(), atol=1e-6), key


def test_non_finite_loss_ends_the_trial_as_diverged():
    reports = []
    last = run_trial(
        {
            **SMALL,
            "lr": 1e12,
            "lr_scale": 1.0,
            "freeze_depth": 0,
            "epochs": 3,
            "max_steps_per_epoch": 5,
        },
        report=lambda m, s: reports.append(m),
    )
    assert last[M.DIVERGED] is True
    assert len(reports) < 3 or reports[-1][M.DIVERGED]


def test_unknown_trial_parameter_is_named():
    # A setup failure: every trial with these parameters would fail the same way.
    with pytest.raises(TrialSetupError, match="learning_rate"):
        resolve_trial_config({"learning_rate": 0.1})
    with pytest.raises(TrialSetupError, match="width_mult"):
        resolve_trial_config({"backbone": "resnet18", "width_mult": 1.2})


def test_weights_mapping_picks_per_backbone():
    cfg = resolve_trial_config(
        {
            "backbone": "efficientnet_lite0",
            "weights": {"efficientnet_lite0": "packaged", "default": "none"},
        }
    )
    assert cfg.weights == "packaged"
    cfg = resolve_trial_config(
        {"backbone": "resnet18", "weights": {"efficientnet_lite0": "packaged", "default": "none"}}
    )
    assert cfg.weights == "none"


def test_failure_text_keeps_the_traceback_and_explains_out_of_memory():
    from trainables.runtime import failure_text as _failure_text

    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError as err:
        text = _failure_text(err)
    assert "Tried to allocate 2.00 GiB" in text and "Traceback" in text
    assert text.splitlines()[-1].startswith("OutOfMemoryError") and "batch_size" in text
    try:
        raise ValueError("bad weights")
    except ValueError as err:
        assert _failure_text(err).splitlines()[-1] == "ValueError: bad weights"
