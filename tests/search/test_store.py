from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from search.contract import (
    EPOCH_COLUMNS,
    EPOCHS_FILE,
    JOURNAL_FILE,
    SCHEMA_VERSION,
    TRIAL_COLUMNS,
    TRIALS_FILE,
    config_column,
)
from search.store import ResultsStore

TYPES = {"backbone": "string", "freeze_depth": "int64", "lr": "float64"}


def _result(epoch: int, top1: float, **extra) -> dict:
    return {"epoch": epoch, "top1": top1, "top5": min(100.0, top1 + 10), "train_loss": 1.0 / epoch,
            "val_loss": 1.5 / epoch, "lr": 0.01, "samples_per_s": 100.0, "seconds": 2.0,
            "params": 1000, "gmacs": 0.25, "peak_rss_mb": 500.0, "peak_gpu_mb": 0.0, **extra}


def _store(tmp_path, **kw) -> ResultsStore:
    return ResultsStore(str(tmp_path), param_types=TYPES, max_epochs=3, **kw)


CONFIG = {"backbone": "resnet18", "freeze_depth": 2, "lr": 0.05, "data": {"source": "digits"}}


def test_files_follow_the_contract_and_read_back_in_pandas_and_duckdb(tmp_path):
    store = _store(tmp_path)
    for e, acc in [(1, 50.0), (2, 70.0), (3, 65.0)]:
        store.record_result("a", CONFIG, _result(e, acc), node="n1")
    store.finish("a")
    store.record_result("b", {**CONFIG, "freeze_depth": 5}, _result(1, 20.0), node="n2")
    store.finish("b")
    store.write()

    trials = pd.read_parquet(tmp_path / TRIALS_FILE)
    epochs = pd.read_parquet(tmp_path / EPOCHS_FILE)
    assert list(trials.trial_id) == ["a", "b"]
    a = trials.set_index("trial_id").loc["a"]
    assert a.status == "TERMINATED" and a.best_top1 == 70.0 and a.last_top1 == 65.0
    assert a.epochs == 3 and a.gmacs == 0.25 and a.train_seconds == 6.0
    # Exactly the contract's columns: no column misnames what it holds (no `flops`).
    assert list(trials.columns) == [*TRIAL_COLUMNS[:2], *map(config_column, TYPES),
                                    *TRIAL_COLUMNS[2:]]
    assert list(epochs.columns) == list(EPOCH_COLUMNS)
    assert trials.set_index("trial_id").loc["b"].status == "STOPPED_EARLY"
    assert str(trials["config.freeze_depth"].dtype) == "int64"
    assert trials["config.backbone"].tolist() == ["resnet18", "resnet18"]
    assert len(epochs) == 4
    schema = pq.read_schema(tmp_path / TRIALS_FILE)
    assert schema.metadata[b"ftsearch.schema_version"] == SCHEMA_VERSION.encode()
    n = duckdb.sql(f"select count(*) from '{tmp_path / EPOCHS_FILE}' where trial_id='a'").fetchall()
    assert n == [(3,)]


def test_replayed_results_after_resume_do_not_duplicate(tmp_path):
    store = _store(tmp_path)
    store.record_result("a", CONFIG, _result(1, 50.0))
    store.record_result("a", CONFIG, _result(2, 60.0))
    store.write()
    # a new driver reloads the files, and the trial replays epoch 2 from its checkpoint
    again = _store(tmp_path)
    again.record_result("a", CONFIG, _result(2, 61.0))
    again.record_result("a", CONFIG, _result(3, 62.0))
    again.finish("a")
    again.write()
    epochs = pd.read_parquet(tmp_path / EPOCHS_FILE)
    assert epochs.epoch.tolist() == [1, 2, 3]
    assert epochs.top1.tolist() == [50.0, 61.0, 62.0]
    trials = pd.read_parquet(tmp_path / TRIALS_FILE)
    assert len(trials) == 1 and trials.status.iloc[0] == "TERMINATED"


def test_error_and_divergence_statuses(tmp_path):
    store = _store(tmp_path)
    store.record_result("x", CONFIG, _result(1, 10.0, diverged=True))
    assert store.finish("x") == "DIVERGED"
    store.record_result("y", CONFIG, _result(1, 10.0))
    assert store.finish("y", error="RuntimeError: boom") == "ERROR"
    store.write()
    trials = pd.read_parquet(tmp_path / TRIALS_FILE).set_index("trial_id")
    assert trials.loc["y", "error"] == "RuntimeError: boom"
    assert pd.isna(trials.loc["x", "error"])


def test_pareto_flags_the_non_dominated_trials(tmp_path):
    store = _store(tmp_path, objectives=[("top1", "max"), ("gmacs", "min")])
    for tid, acc, gmacs in [("cheap", 60.0, 0.1), ("good", 90.0, 1.0), ("bad", 50.0, 2.0),
                            ("mid", 80.0, 0.5)]:
        store.record_result(tid, CONFIG, {**_result(3, acc), "gmacs": gmacs})
        store.finish(tid)
    store.write()
    trials = pd.read_parquet(tmp_path / TRIALS_FILE).set_index("trial_id")
    assert trials.pareto.to_dict() == {"cheap": True, "good": True, "bad": False, "mid": True}


def test_checkpoint_keeps_the_best(tmp_path):
    store = _store(tmp_path)
    store.record_checkpoint("a", "/ckpt/1", top1=50.0)
    store.record_checkpoint("a", "/ckpt/2", top1=70.0)
    store.record_checkpoint("a", "/ckpt/3", top1=60.0)
    assert store.trials["a"]["checkpoint"] == "/ckpt/2"


@pytest.mark.parametrize("name", [TRIALS_FILE, EPOCHS_FILE])
def test_write_leaves_no_temp_files(tmp_path, name):
    store = _store(tmp_path)
    store.record_result("a", CONFIG, _result(1, 50.0))
    store.write()
    store.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TRIALS_FILE, EPOCHS_FILE])


def test_results_not_yet_written_survive_a_new_store(tmp_path):
    # A driver killed between two writes: the journal still holds what the files lack.
    store = _store(tmp_path)
    store.record_result("a", CONFIG, _result(1, 40.0))
    store.write()
    store.record_result("a", CONFIG, _result(2, 50.0))
    store.record_checkpoint("a", "/ckpt/2", top1=50.0)
    store.finish("b", error="boom")
    reopened = _store(tmp_path)
    assert sorted(reopened.epochs) == [("a", 1), ("a", 2)]
    assert reopened.trials["a"]["checkpoint"] == "/ckpt/2"
    assert reopened.trials["b"]["status"] == "ERROR"
    reopened.write()
    assert not (tmp_path / JOURNAL_FILE).exists()
    assert len(pd.read_parquet(tmp_path / EPOCHS_FILE)) == 2


def test_orphaned_temp_files_are_removed_on_open(tmp_path):
    (tmp_path / f".{EPOCHS_FILE}.0123abcd.tmp").write_bytes(b"half a file")
    (tmp_path / f".{TRIALS_FILE}.0123abcd.tmp").write_bytes(b"half a file")
    (tmp_path / "unrelated.tmp").write_bytes(b"keep")
    _store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.tmp"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.record_result("a", CONFIG, _result(1, 40.0))
    store.write()
    before = (tmp_path / EPOCHS_FILE).read_bytes()
    store.record_result("a", CONFIG, _result(2, 50.0))

    def disk_full(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError):
        store.write()
    assert (tmp_path / EPOCHS_FILE).read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert sorted(_store(tmp_path).epochs) == [("a", 1), ("a", 2)]  # from the journal


def test_interrupted_trials_and_trials_that_ran_every_epoch(tmp_path):
    store = _store(tmp_path)
    for epoch in (1, 2, 3):
        store.record_result("done", CONFIG, _result(epoch, 50.0))
    store.record_result("cut", CONFIG, _result(1, 50.0))
    store.record_result("asha", CONFIG, _result(1, 50.0))
    store.start("waiting", CONFIG)
    assert store.finish("done", interrupted=True) == "TERMINATED"
    assert store.finish("asha") == "STOPPED_EARLY"
    assert sorted(store.interrupt_unfinished()) == ["cut", "waiting"]
    statuses = pd.read_parquet(_written(store)).set_index("trial_id").status.to_dict()
    assert statuses == {"done": "TERMINATED", "cut": "INTERRUPTED", "asha": "STOPPED_EARLY",
                        "waiting": "INTERRUPTED"}


def test_resume_forgets_unfinished_trials_tune_never_knew(tmp_path):
    store = _store(tmp_path)
    store.start("known", CONFIG)
    store.start("lost", CONFIG)
    store.record_result("lost", CONFIG, _result(1, 10.0))
    store.interrupt_unfinished()
    assert store.forget_unfinished_except({"known"}) == ["lost"]
    assert set(_store(tmp_path).trials) == {"known"}


def _written(store: ResultsStore):
    store.write()
    return f"{store.directory}/{TRIALS_FILE}"


def test_a_complete_result_ends_terminated_after_one_epoch_even_after_a_restart(tmp_path):
    # A classical head is fitted in one go: its one epoch is the whole trial.
    store = _store(tmp_path)
    store.record_result("svm", CONFIG, _result(1, 90.0, complete=True, val_loss=None))
    store.record_result("sgd", CONFIG, _result(1, 60.0))
    reopened = _store(tmp_path)  # a killed driver: the journal replays the result
    assert reopened.finish("svm") == "TERMINATED"
    assert reopened.finish("sgd") == "STOPPED_EARLY"
    trials = pd.read_parquet(_written(reopened)).set_index("trial_id")
    assert trials.loc["svm", "epochs"] == 1 and pd.isna(trials.loc["svm", "last_val_loss"])
