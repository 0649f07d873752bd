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
