"""The Optuna study journal of an experiment: what optuna-dashboard shows of a search.

The first tests drive a real :class:`~search.store.ResultsStore` and journal file without
Ray (statuses, a second driver, a failing file); the slow ones run real searches: the
session's tiny multi-objective search read back, ``make demo``'s search read back and
shown by optuna-dashboard in headless Chromium. A search whose driver is killed with
``kill -9`` and resumed is checked in tests/search/test_crash_resume.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from search.config import dump_config, parse_config
from search.contract import CONFIG_FILE, EPOCHS_FILE, STUDY_JOURNAL_FILE, TRIALS_FILE, Status
from search.space import column_types
from search.store import ResultsStore
from search.study_journal import (
    FORGOTTEN_ATTR,
    RETRY_ATTR,
    STATUS_ATTR,
    TRIAL_ID_ATTR,
    StudyJournal,
    load_study,
)
from tests.conftest import TINY

_CONFIG = {"backbone": "resnet18", "freeze_depth": 2, "lr": 0.01, "lr_scale": 0.1}
_SINGLE = [("top1", "max")]
_STATES = {Status.TERMINATED: TrialState.COMPLETE, Status.STOPPED_EARLY: TrialState.PRUNED,
           Status.ERROR: TrialState.FAIL, Status.DIVERGED: TrialState.FAIL}


def _experiment(tmp_path: Path, objectives: list[tuple[str, str]] = _SINGLE
                ) -> tuple[Path, dict[str, str]]:
    """An experiment directory holding the config.yaml a run writes; its column types."""
    directory = tmp_path / "runs" / "exp"
    directory.mkdir(parents=True)
    cfg = parse_config({**TINY, "name": "exp", "storage": str(tmp_path / "runs"),
                        "search": {"objectives": [{"metric": m, "mode": mode}
                                                  for m, mode in objectives]}})
    (directory / CONFIG_FILE).write_text(dump_config(cfg))
    return directory, column_types(cfg)


def _driver(directory: Path, types: dict[str, str],
            objectives: list[tuple[str, str]] = _SINGLE) -> tuple[ResultsStore, StudyJournal]:
    """What one driver process holds: the store (reloaded from disk) and the journal."""
    store = ResultsStore(str(directory), param_types=types, max_epochs=3, objectives=objectives)
    return store, StudyJournal(str(directory), objectives=objectives, param_types=types)


def _epoch(store: ResultsStore, journal: StudyJournal, trial_id: str, epoch: int,
           top1: float, **extra: object) -> None:
    result = {"epoch": epoch, "top1": top1, "top5": 90.0, "val_loss": 1.0, "gmacs": 0.5,
              "params": 1000, **extra}
    store.record_result(trial_id, _CONFIG, result)
    journal.sync(store, [trial_id])


def _by_trial_id(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    out: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.trials:
        out.setdefault(trial.user_attrs[TRIAL_ID_ATTR], []).append(trial)
    return out


def journal_ops(directory: Path) -> tuple[Counter, Counter]:
    """From the raw file: (trial id -> Optuna trials created for it,
    (trial id, Optuna trial, step) -> values reported)."""
    ops = [json.loads(line) for line in (directory / STUDY_JOURNAL_FILE).read_text().splitlines()]
    created = [op["user_attrs"][TRIAL_ID_ATTR] for op in ops if op["op_code"] == 4]
    # Optuna numbers a storage's trials 0, 1, ... in the order they were created.
    reports = Counter((created[op["trial_id"]], op["trial_id"], op["step"]) for op in ops
                      if op["op_code"] == 7)
    return Counter(created), reports


def test_each_status_becomes_its_optuna_state(tmp_path):
    directory, types = _experiment(tmp_path)
    store, journal = _driver(directory, types)
    for trial_id in ("done", "stopped", "diverged", "error", "interrupted"):
        store.start(trial_id, _CONFIG)
        journal.sync(store, [trial_id])
    for epoch, top1 in ((1, 20.0), (2, 50.0)):
        _epoch(store, journal, "done", epoch, top1)
    _epoch(store, journal, "stopped", 1, 15.0)
    _epoch(store, journal, "diverged", 1, float("nan"), diverged=True)
    _epoch(store, journal, "interrupted", 1, 30.0)
    running = load_study(directory).trials
    assert [t.state for t in running] == [TrialState.RUNNING] * 5
    assert running[0].intermediate_values == {1: 20.0, 2: 50.0}  # live, as epochs arrive
    _epoch(store, journal, "done", 3, 40.0)

    for trial_id in ("done", "stopped", "diverged"):
        store.finish(trial_id)
    store.finish("error", error="RuntimeError: CUDA out of memory")
    store.finish("interrupted", interrupted=True)
    journal.sync(store)

    trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in load_study(directory).trials}
    assert {k: t.state for k, t in trials.items()} == {
        "done": TrialState.COMPLETE, "stopped": TrialState.PRUNED,
        "diverged": TrialState.FAIL, "error": TrialState.FAIL,
        # A resume continues it: Optuna could not reopen a finished trial.
        "interrupted": TrialState.RUNNING}
    assert {k: t.user_attrs[STATUS_ATTR] for k, t in trials.items()} == {
        "done": "TERMINATED", "stopped": "STOPPED_EARLY", "diverged": "DIVERGED",
        "error": "ERROR", "interrupted": "INTERRUPTED"}
    # The last result's top-1, as Tune tells its searcher; not the best (50).
    assert trials["done"].value == 40.0
    assert trials["done"].intermediate_values == {1: 20.0, 2: 50.0, 3: 40.0}
    assert trials["stopped"].value == 15.0  # Optuna values a pruned trial by its last report
    assert trials["diverged"].intermediate_values == {}  # NaN is not reported
    assert "CUDA out of memory" in trials["error"].user_attrs["error"]
    assert trials["done"].params == _CONFIG


def test_a_resumed_driver_adds_nothing_twice_and_finishes_what_it_left(tmp_path):
    directory, types = _experiment(tmp_path)
    store, journal = _driver(directory, types)
    for trial_id in ("a", "b", "lost", "failed"):
        store.start(trial_id, _CONFIG)
        journal.sync(store, [trial_id])
        _epoch(store, journal, trial_id, 1, 10.0)
    store.finish("failed", error="OSError: node lost")
    journal.sync(store, ["failed"])
    # The driver dies after the store recorded a's end and b's second epoch, before the
    # journal heard of them.
    _epoch(store, journal, "a", 2, 20.0)
    store.record_result("a", _CONFIG, {"epoch": 3, "top1": 30.0})
    store.finish("a")
    store.record_result("b", _CONFIG, {"epoch": 2, "top1": 12.0})
    store.write()

    store, journal = _driver(directory, types)  # the resumed driver
    store.forget_unfinished_except({"a", "b", "failed"})  # Tune never saved "lost"
    journal.sync(store)
    store.start("failed", _CONFIG)  # resume_errored: the errored trial runs again
    journal.sync(store, ["failed"])
    _epoch(store, journal, "b", 2, 12.5)  # replayed from the checkpoint: not reported again
    _epoch(store, journal, "b", 3, 14.0)
    store.finish("b")
    _epoch(store, journal, "failed", 2, 25.0)
    _epoch(store, journal, "failed", 3, 27.0)
    store.finish("failed")
    journal.sync(store)

    trials = _by_trial_id(load_study(directory))
    assert {k: [t.state for t in ts] for k, ts in trials.items()} == {
        "a": [TrialState.COMPLETE], "b": [TrialState.COMPLETE], "lost": [TrialState.FAIL],
        "failed": [TrialState.FAIL, TrialState.COMPLETE]}
    assert trials["a"][0].value == 30.0 and trials["a"][0].intermediate_values == {
        1: 10.0, 2: 20.0, 3: 30.0}
    # Epoch 2 as first reported; the trial's value is its last result.
    assert trials["b"][0].intermediate_values == {1: 10.0, 2: 12.0, 3: 14.0}
    assert trials["b"][0].value == 14.0
    assert trials["lost"][0].user_attrs[FORGOTTEN_ATTR] is True
    retry = trials["failed"][1]
    assert retry.user_attrs[RETRY_ATTR] == trials["failed"][0].number
    assert retry.value == 27.0 and retry.intermediate_values == {1: 10.0, 2: 25.0, 3: 27.0}
    created, reports = journal_ops(directory)
    assert created == {"a": 1, "b": 1, "lost": 1, "failed": 2}
    assert max(reports.values()) == 1, reports


def test_a_multi_objective_study_has_both_values_and_no_curves(tmp_path):
    objectives = [("top1", "max"), ("gmacs", "min")]
    directory, types = _experiment(tmp_path, objectives)
    store, journal = _driver(directory, types, objectives)
    for trial_id in ("done", "stopped"):
        store.start(trial_id, _CONFIG)
        _epoch(store, journal, trial_id, 1, 10.0)
    _epoch(store, journal, "done", 3, 60.0)
    store.finish("done")
    store.finish("stopped")
    journal.sync(store)
    study = load_study(directory)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["top1", "gmacs"]
    done, stopped = study.trials
    assert done.values == [60.0, 0.5] and done.intermediate_values == {}
    assert stopped.state == TrialState.PRUNED and stopped.values is None


def test_derived_and_rounded_values_keep_their_params(tmp_path):
    directory = tmp_path / "runs" / "exp"
    directory.mkdir(parents=True)
    cfg = parse_config({**TINY, "name": "exp", "storage": str(tmp_path / "runs"),
                        "space": {**TINY["space"],
                                  "freeze_depth": {"type": "fraction", "low": 0.0, "high": 1.0},
                                  "head": {"type": "choice", "values": ["logreg", "svm"]}}})
    (directory / CONFIG_FILE).write_text(dump_config(cfg))
    store, journal = _driver(directory, column_types(cfg))
    # freeze_depth is derived from the fraction (no range of its own), a grid rounds lr
    # past its bound, and random weights force head `linear`, outside the choices.
    first = {**_CONFIG, "freeze_fraction": 0.5, "freeze_depth": 2, "lr": 0.3000004,
             "head": "linear"}
    second = {**_CONFIG, "freeze_fraction": 1.0, "freeze_depth": 5, "head": "svm"}
    for trial_id, config in (("first", first), ("second", second)):
        store.start(trial_id, config)
        journal.sync(store, [trial_id])
    one, two = load_study(directory).trials
    assert one.params == {k: v for k, v in first.items() if k != "head"}
    assert two.params == second
    assert one.distributions["lr"].log and one.distributions["lr"].high == 0.3000004


def test_a_failing_journal_warns_once_and_the_results_go_on(tmp_path, capsys):
    directory, types = _experiment(tmp_path)
    (directory / STUDY_JOURNAL_FILE).mkdir()  # cannot be opened as a file
    store, journal = _driver(directory, types)
    for trial_id in ("a", "b"):
        store.start(trial_id, _CONFIG)
        journal.sync(store, [trial_id])
        _epoch(store, journal, trial_id, 1, 10.0)
    store.write()
    err = capsys.readouterr().err
    assert err.count("ftsearch: warning: the Optuna study journal") == 1, err
    assert "ftsearch resume" in err
    assert len(pd.read_parquet(directory / TRIALS_FILE)) == 2


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_append(tmp_path):
    directory, types = _experiment(tmp_path)
    store, journal = _driver(directory, types)
    store.start("a", _CONFIG)
    journal.sync(store, ["a"])
    with (directory / STUDY_JOURNAL_FILE).open("ab") as handle:
        handle.write(b'{"op_code":7,"worker_id":"x","trial_id":0,"st')  # killed mid-write
    store, journal = _driver(directory, types)
    _epoch(store, journal, "a", 1, 10.0)
    assert load_study(directory).trials[0].intermediate_values == {1: 10.0}


def test_remote_storage_writes_no_journal(tmp_path):
    store = ResultsStore(str(tmp_path / "exp"), param_types={}, max_epochs=3)
    journal = StudyJournal("s3://bucket/runs/exp", objectives=_SINGLE, param_types={})
    journal.sync(store)  # nothing to open, nothing raised
    assert journal.path is None


# --- real searches
def assert_mirrors_results(directory: Path, objectives: list[str], *,
                            exact_curves: bool = True) -> optuna.Study:
    """The study holds each trials.parquet row once, in its state, values and params.

    Without ``exact_curves`` (a resumed search), an epoch replayed from a checkpoint may
    differ from its first report, which the study keeps: only the epochs are compared.
    """
    study = load_study(directory)
    rows = pd.read_parquet(directory / TRIALS_FILE).set_index("trial_id")
    epochs = pd.read_parquet(directory / EPOCHS_FILE)
    trials = {t: ts for t, ts in _by_trial_id(study).items()
              if not ts[-1].user_attrs.get(FORGOTTEN_ATTR)}
    assert sorted(trials) == sorted(rows.index)
    assert all(len(ts) == 1 for ts in trials.values())  # no trial errored: none retried
    for trial_id, (trial,) in trials.items():
        row = rows.loc[trial_id]
        assert trial.state == _STATES[row.status], (trial_id, row.status)
        assert trial.user_attrs[STATUS_ATTR] == row.status
        config = {c.removeprefix("config."): v for c, v in row.items()
                  if c.startswith("config.") and not pd.isna(v)}
        assert trial.params == pytest.approx(config), trial_id
        if row.status == Status.TERMINATED:
            last = {"top1": row.last_top1, "gmacs": row.gmacs}
            assert trial.values == pytest.approx([last[m] for m in objectives])
        if len(objectives) == 1 and trial.state != TrialState.FAIL:
            mine = epochs[epochs.trial_id == trial_id]
            curve = dict(zip(mine.epoch.tolist(), mine.top1.tolist(), strict=True))
            assert sorted(trial.intermediate_values) == sorted(curve), trial_id
            if exact_curves:
                assert trial.intermediate_values == pytest.approx(curve), trial_id
    return study


@pytest.mark.slow
def test_a_finished_search_is_its_study(tiny_experiment):
    study = assert_mirrors_results(tiny_experiment, ["top1", "gmacs"])
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] >= 1 and states[TrialState.PRUNED] >= 1, states


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"optuna-dashboard exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"optuna-dashboard did not answer {url} in {timeout} s")


def _dashboard_dom(journal: Path, scratch: Path, *, trials: int) -> tuple[dict, dict, str]:
    """Serves ``journal`` with optuna-dashboard on loopback and loads its trials page in
    headless Chromium: (the study's summary and its detail from the dashboard's API, the
    rendered DOM)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH to load the dashboard's page in")
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    port = _free_port()
    log = (scratch / "dashboard.log").open("w")
    proc = subprocess.Popen([str(dashboard), str(journal), "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(f"{base}/api/studies", proc)
        with urllib.request.urlopen(f"{base}/api/studies") as answer:
            (summary,) = json.load(answer)["study_summaries"]
        with urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}") as answer:
            detail = json.load(answer)
        page = f"{base}/dashboard/studies/{summary['study_id']}/trials"
        # Virtual time lets the page's own API calls finish before the DOM is dumped; the
        # trial list renders only the rows in view, so the window is tall enough for all.
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                              "--virtual-time-budget=15000",
                              f"--window-size=1280,{600 + 120 * trials}",
                              f"--user-data-dir={scratch / 'chromium'}", "--dump-dom", page],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    return summary, detail, dom


@pytest.mark.slow
def test_optuna_dashboard_lists_the_demos_trials_in_chromium(demo_run, tmp_path):
    root = demo_run.root
    experiment = (root / "runs" / "demo").resolve()  # `make demo` links its newest run
    study = assert_mirrors_results(experiment, ["top1"])  # single-objective: with curves
    summary, detail, dom = _dashboard_dom(experiment / STUDY_JOURNAL_FILE, tmp_path,
                                          trials=len(study.trials))
    assert summary["study_name"] == experiment.name
    assert len(study.trials) == len(pd.read_parquet(experiment / TRIALS_FILE))
    assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
    # The rendered page lists every trial by number and shows the first one's attributes.
    for trial in study.trials:
        assert f">Trial {trial.number}<" in dom, trial.number
    first = study.trials[0]
    assert f"trial_id {first.user_attrs[TRIAL_ID_ATTR]}" in dom
    assert f"status {first.user_attrs[STATUS_ATTR]}" in dom
