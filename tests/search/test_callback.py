"""The Tune callback on the driver: what it does when the results cannot be written."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

from search.callback import ParquetCallback
from search.changes import write_config
from search.config import parse_config
from search.contract import Status


def _trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 0.1},
                           last_result={"done": True, "epoch": 1})


def _full_disk(*_args, **_kwargs) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def callback(tmp_path):
    cfg = parse_config({"name": "exp", "storage": str(tmp_path),
                        "space": {"lr": {"type": "loguniform", "low": 0.01, "high": 1.0}}})
    Path(cfg.directory).mkdir(parents=True)
    write_config(cfg)  # as `ftsearch run` does: the study journal reads it
    cb = ParquetCallback(directory=str(tmp_path / "exp"), param_types={"lr": "float64"},
                         max_epochs=2, objectives=[("top1", "max")], min_interval_s=0.0)
    cb.setup()
    cb.on_trial_start(iteration=0, trials=[], trial=_trial("a"))
    return cb


def test_a_failed_write_as_a_trial_ends_surfaces_at_step_end_not_inside_tune(callback,
                                                                              monkeypatch):
    # Tune catches what on_trial_complete raises, logs a traceback and goes on; the error
    # must instead end fit() once, from on_step_end, which Tune does not catch.
    monkeypatch.setattr(callback.store, "write", _full_disk)
    callback.on_trial_complete(iteration=1, trials=[], trial=_trial("a"))  # does not raise
    assert callback.store.trials["a"]["status"] != Status.RUNNING  # journaled before
    with pytest.raises(OSError, match="No space left"):
        callback.on_step_end(iteration=1, trials=[])
    callback.on_step_end(iteration=2, trials=[])  # raised once


def test_a_failed_checkpoint_record_surfaces_at_experiment_end(callback, monkeypatch):
    monkeypatch.setattr(callback.store.journal, "append", _full_disk)
    checkpoint = SimpleNamespace(path="/nowhere/checkpoint_000000")
    callback.on_checkpoint(iteration=1, trials=[], trial=_trial("a"), checkpoint=checkpoint)
    with pytest.raises(OSError, match="No space left"):
        callback.on_experiment_end(trials=[])


def test_a_failed_write_of_a_result_raises_at_once(callback, monkeypatch):
    # An epoch's result must be on disk before Tune registers its checkpoint: never deferred.
    monkeypatch.setattr(callback.store.journal, "append", _full_disk)
    with pytest.raises(OSError, match="No space left"):
        callback.on_trial_result(iteration=1, trials=[], trial=_trial("a"),
                                 result={"epoch": 1, "top1": 50.0})


def _restored(trial_id: str, kept: str | None, top1: float = 40.0) -> SimpleNamespace:
    """A trial as Tune restores it: its checkpoint manager's best kept checkpoint."""
    best = None if kept is None else SimpleNamespace(checkpoint=SimpleNamespace(path=kept),
                                                     metrics={"top1": top1})
    manager = SimpleNamespace(best_checkpoint_result=best)
    return SimpleNamespace(**vars(_trial(trial_id)),
                           run_metadata=SimpleNamespace(checkpoint_manager=manager))


def test_a_resumed_driver_points_a_lost_checkpoint_record_at_the_one_tune_kept(callback,
                                                                              tmp_path):
    gone, kept = tmp_path / "checkpoint_000000", tmp_path / "checkpoint_000001"
    kept.mkdir()
    # The driver recorded epoch 1's checkpoint (since deleted by Tune) and lost epoch 2's.
    callback.store.record_checkpoint("a", str(gone), top1=50.0)
    callback.on_step_begin(iteration=0, trials=[_restored("a", str(kept))])
    assert callback.store.trials["a"]["checkpoint"] == str(kept)


def test_a_recorded_checkpoint_that_exists_is_kept(callback, tmp_path):
    mine, other = tmp_path / "checkpoint_000003", tmp_path / "checkpoint_000001"
    mine.mkdir()
    other.mkdir()
    callback.store.record_checkpoint("a", str(mine), top1=70.0)
    callback.on_step_begin(iteration=0, trials=[_restored("a", str(other))])
    assert callback.store.trials["a"]["checkpoint"] == str(mine)
