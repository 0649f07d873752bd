"""The results contract: one Pareto rule, one best trial, columns the README documents."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from search import contract as C
from trainables import metrics as M

ROOT = Path(__file__).resolve().parents[2]


def test_pareto_mask_handles_modes_ties_and_missing_values():
    # (top1 max, gmacs min, params min)
    rows = [(90, 1.0, 10), (90, 1.0, 10), (80, 0.5, 10), (70, 0.5, 12), (95, None, 1),
            (60, 2.0, 20)]
    mask = C.pareto_mask(rows, ["max", "min", "min"])
    assert mask.tolist() == [True, True, True, False, False, False]


def test_best_trial_ranks_by_the_objective_column_among_clean_ends():
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "status": ["TERMINATED", "STOPPED_EARLY", "ERROR", "DIVERGED", "TERMINATED"],
        "best_top1": [80.0, 85.0, 99.0, 98.0, 85.0],
        "last_top1": [80.0, 70.0, 99.0, 10.0, 84.0],
        "last_val_loss": [0.5, 0.4, 0.1, 0.2, 0.3],
    })
    assert C.best_trial(trials)["trial_id"] == "e"  # tie on best_top1, higher last_top1
    assert C.best_trial(trials, metric="val_loss", mode="min")["trial_id"] == "e"
    assert C.best_trial(trials[trials.status == "ERROR"]) is None
    with pytest.raises(ValueError, match="top1"):
        C.objective_column("samples_per_s")


def test_every_objective_maps_to_a_trials_column():
    for column in C.OBJECTIVE_COLUMNS.values():
        assert column in C.TRIAL_COLUMNS


def test_setup_failure_marker_is_the_exception_name():
    from trainables.runtime import TrialSetupError

    assert TrialSetupError.__name__ == M.SETUP_FAILURE


def test_readme_results_section_names_every_column():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_0-9.<>]+)`", section))
    missing = [c for c in (*C.TRIAL_COLUMNS, *C.EPOCH_COLUMNS, C.PARETO_COLUMN,
                           f"{C.CONFIG_PREFIX}<param>") if c not in named]
    assert not missing, missing
    assert "| `flops`" not in section  # mentioned only as the dropped version-1 column
