"""The searcher and scheduler ftsearch hands Tune: what they tell Optuna, what fills rungs."""

from __future__ import annotations

import optuna
import pytest

from search.config import parse_config
from search.tuner import build_scheduler, build_searcher
from trainables import metrics as M

CONFIG = {"name": "t", "train": {"epochs": 4},
          "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
          "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}


def _searcher():
    searcher = build_searcher(parse_config(CONFIG))
    searcher.set_search_properties("top1", "max", {})
    return searcher


@pytest.mark.parametrize(("last", "state"), [
    ({M.EPOCH: 1, M.TOP1: 40.0}, optuna.trial.TrialState.PRUNED),  # stopped by the scheduler
    ({M.EPOCH: 4, M.TOP1: 80.0}, optuna.trial.TrialState.COMPLETE),
    ({M.EPOCH: 1, M.TOP1: 90.0, M.COMPLETE: True}, optuna.trial.TrialState.COMPLETE),
    ({M.EPOCH: 2, M.TOP1: 10.0, M.DIVERGED: True}, optuna.trial.TrialState.FAIL),
])
def test_optuna_learns_how_each_trial_really_ended(last, state):
    searcher = _searcher()
    assert searcher.suggest("a") is not None
    searcher.on_trial_result("a", {**last, "training_iteration": last[M.EPOCH]})
    searcher.on_trial_complete("a", result=last)
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == state
    if state != optuna.trial.TrialState.FAIL:
        assert trial.value == last[M.TOP1]


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_a_classical_trial_complete_at_epoch_one_stays_out_of_asha_rungs():
    asha = build_scheduler(parse_config(CONFIG))
    asha.set_search_properties("top1", "max")
    for trial_id in ("fit", "sgd"):
        asha.on_trial_add(None, _Trial(trial_id))
    asha.on_trial_complete(None, _Trial("fit"), {M.EPOCH: 1, M.TOP1: 97.0, M.COMPLETE: True})
    # alone in the first rung, the slow SGD start is not stopped for trailing a finished fit
    assert asha.on_trial_result(None, _Trial("sgd"), {M.EPOCH: 1, M.TOP1: 20.0}) == "CONTINUE"
    rungs = [recorded for _, recorded in asha._brackets[0]._rungs]
    assert all("fit" not in recorded for recorded in rungs)
