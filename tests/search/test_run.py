"""End to end: `ftsearch run` / `ftsearch resume` on a real local Ray, Parquet read back."""

from __future__ import annotations

import time

import duckdb
import pandas as pd
import pytest

from tests.conftest import TINY, run_ftsearch, write_config

pytestmark = pytest.mark.slow


def test_run_writes_every_trial_once_and_every_epoch(tiny_experiment):
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    epochs = pd.read_parquet(tiny_experiment / "epochs.parquet")
    assert len(trials) == TINY["search"]["num_samples"]
    assert trials.trial_id.is_unique
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    # one epochs row per epoch each trial actually ran, numbered 1..n
    ran = epochs.groupby("trial_id").epoch.agg(["count", "max"])
    merged = trials.set_index("trial_id").join(ran)
    assert (merged["count"] == merged["epochs"]).all()
    assert (merged["max"] == merged["epochs"]).all()
    # DuckDB reads the same files
    n = duckdb.sql(f"select count(distinct trial_id) from '{tiny_experiment}/epochs.parquet'")
    assert n.fetchall() == [(len(trials),)]
    assert (tiny_experiment / "config.yaml").exists()


def test_asha_stopped_trials_early_visible_in_both_files(tiny_experiment):
    trials = pd.read_parquet(tiny_experiment / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(tiny_experiment / "epochs.parquet")
    stopped = trials[trials.status == "STOPPED_EARLY"]
    assert len(stopped) >= 1
    assert (stopped.epochs < TINY["train"]["epochs"]).all()
    per_trial = epochs.groupby("trial_id").epoch.max()
    assert (per_trial[stopped.index] < TINY["train"]["epochs"]).all()
    assert set(trials.status) <= {"TERMINATED", "STOPPED_EARLY"}


def test_searched_params_are_typed_and_conditional_bounds_hold(tiny_experiment):
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    assert str(trials["config.freeze_depth"].dtype) == "int64"
    assert trials["config.lr"].dtype == "float64"
    assert set(trials["config.backbone"]) == {"efficientnet_lite0", "resnet18"}
    scratch = trials[trials["config.backbone"] == "resnet18"]
    assert (scratch["config.freeze_depth"] == 0).all()  # random weights are never frozen


def test_multi_objective_run_flags_pareto_trials(tiny_experiment):
    trials = pd.read_parquet(tiny_experiment / "trials.parquet")
    assert trials.pareto.dtype == bool and trials.pareto.any()
    front = trials[trials.pareto]
    for _, t in trials[~trials.pareto].iterrows():
        if t.status not in ("TERMINATED", "STOPPED_EARLY"):
            continue
        assert any(f.last_top1 >= t.last_top1 and f.gmacs <= t.gmacs for _, f in front.iterrows())


def test_bad_config_exits_2_before_ray_starts(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", {**TINY, "storage": str(tmp_path),
                                               "search": {"num_samples": 0}})
    started = time.monotonic()
    proc = run_ftsearch("run", str(bad), "--set", "scheduler.type=fifo")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "search.num_samples" in lines[0] and "scheduler.type" in lines[1]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "tiny").exists()
