"""search.fidelity: the common epoch, who is measured at it, and their top-1 there."""

from __future__ import annotations

import pandas as pd
import pytest

from search.contract import Status
from search.fidelity import TOP1_AT, Fidelity, equal_fidelity

S, T, E = Status.STOPPED_EARLY, Status.TERMINATED, Status.ERROR

# trial -> (status, top-1 per epoch). ASHA-like: two stopped at the first rung, one at the
# second, two ran every epoch (4), a classical head complete after its one epoch, and an
# error before any epoch.
ASHA = {
    "a": (S, [30.0]),
    "b": (S, [40.0]),
    "c": (S, [20.0, 50.0]),
    "d": (T, [10.0, 60.0, 55.0, 70.0]),
    "e": (T, [50.0, 45.0, 65.0, 80.0]),
    "f": (T, [75.0]),  # classical head: TERMINATED after one epoch
    "g": (E, []),
}


def frames(spec: dict[str, tuple[str, list[float]]], experiment: str | None = None
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.DataFrame({"trial_id": list(spec), "status": [s for s, _ in spec.values()],
                           "config.lr": [0.1 * (i + 1) for i in range(len(spec))]})
    epochs = pd.DataFrame([{"trial_id": t, "epoch": i, "top1": v}
                           for t, (_, curve) in spec.items() for i, v in enumerate(curve, 1)])
    if experiment is not None:
        trials["experiment"], epochs["experiment"] = experiment, experiment
    return trials, epochs


def values(frame: pd.DataFrame) -> dict[str, float]:
    return dict(zip(frame["trial_id"], frame[TOP1_AT], strict=True))


def test_the_common_epoch_is_the_highest_reached_by_enough_trials():
    trials, epochs = frames(ASHA)
    at, fid = equal_fidelity(trials, epochs)  # min_trials 4
    # Epoch 4: d, e and the complete classical f = 3 < 4; epoch 2: c, d, e, f.
    assert fid == Fidelity(epoch=2, trials=4, total=6, min_trials=4, complete_before=1)
    # Best up to epoch 2 (e's 45 at epoch 2 does not undo its 50); f counts with its final.
    assert values(at) == {"c": 50.0, "d": 60.0, "e": 50.0, "f": 75.0}
    assert at["config.lr"].tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6])  # rows kept whole
    assert TOP1_AT not in trials.columns  # a copy


def test_fewer_trials_asked_for_moves_to_the_last_rung_and_too_many_is_capped():
    trials, epochs = frames(ASHA)
    at, fid = equal_fidelity(trials, epochs, min_trials=3)
    assert (fid.epoch, fid.trials) == (4, 3)
    assert values(at) == {"d": 70.0, "e": 80.0, "f": 75.0}
    # 10 wanted, 6 trials have an epoch: all six at epoch 1.
    at, fid = equal_fidelity(trials, epochs, min_trials=10)
    assert fid == Fidelity(epoch=1, trials=6, total=6, min_trials=6, complete_before=0)
    assert values(at) == {"a": 30.0, "b": 40.0, "c": 20.0, "d": 10.0, "e": 50.0, "f": 75.0}


def test_trials_cut_short_for_other_reasons_are_left_out_terminated_ones_kept():
    spec = {**ASHA, "h": (Status.DIVERGED, [35.0]), "r": (Status.RUNNING, [5.0, 6.0, 7.0])}
    trials, epochs = frames(spec)
    at, fid = equal_fidelity(trials, epochs, min_trials=4)
    # Epoch 4 has d, e, f only; epoch 3 adds the running r. The diverged h ended at 1.
    assert (fid.epoch, fid.trials, fid.total) == (3, 4, 8)
    assert values(at) == {"d": 60.0, "e": 65.0, "f": 75.0, "r": 7.0}


def test_a_chosen_epoch_is_measured_without_a_rule():
    trials, epochs = frames(ASHA)
    at, fid = equal_fidelity(trials, epochs, epoch=4)
    assert fid == Fidelity(epoch=4, trials=3, total=6, min_trials=None, complete_before=1)
    assert fid.describe() == ("top-1 at epoch 4 (3 of 6 trials, 1 complete before it with "
                              "their final top-1; best top-1 up to that epoch)")
    with pytest.raises(ValueError, match="at least 1"):
        equal_fidelity(trials, epochs, epoch=0)


def test_describe_states_epoch_rule_and_counts():
    trials, epochs = frames({k: ASHA[k] for k in "abcde"})
    _, fid = equal_fidelity(trials, epochs, min_trials=3)
    assert fid.describe() == ("top-1 at epoch 2, the highest epoch reached by at least 3 "
                              "trials (3 of 5 trials; best top-1 up to that epoch)")


def test_several_experiments_are_keyed_by_experiment_and_trial_id():
    x_trials, x_epochs = frames({"t1": (T, [10.0, 90.0]), "t2": (T, [20.0, 30.0])}, "x")
    y_trials, y_epochs = frames({"t1": (S, [80.0]), "t2": (T, [15.0, 25.0])}, "y")
    trials = pd.concat([x_trials, y_trials], ignore_index=True)
    epochs = pd.concat([x_epochs, y_epochs], ignore_index=True)
    at, fid = equal_fidelity(trials, epochs, min_trials=3)
    # y's t1 stopped at 1 must not borrow x's t1 epoch 2.
    assert (fid.epoch, fid.trials, fid.total) == (2, 3, 4)
    assert list(zip(at["experiment"], at["trial_id"], at[TOP1_AT], strict=True)) == [
        ("x", "t1", 90.0), ("x", "t2", 30.0), ("y", "t2", 25.0)]
    with pytest.raises(ValueError, match="experiment"):
        equal_fidelity(trials, epochs.drop(columns="experiment"))


def test_fewer_than_two_trials_with_an_epoch_is_none():
    trials, epochs = frames({"a": (T, [50.0]), "g": (E, [])})
    at, fid = equal_fidelity(trials, epochs)
    assert fid is None and at.empty and TOP1_AT in at.columns
