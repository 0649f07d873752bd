"""``ftsearch replay`` on a small committed grid, checked against numbers read off its files.

tests/data/grid-tiny is a real finished grid (tests/data/grid-tiny.yaml, run by
``ftsearch run``, ranked by ``ftsearch rank``): 8 linear-head points of 2 epochs and 3
logistic-regression points of 1 epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from search import contract as C
from search.cli import main
from search.replay import Method, ReplayError, load_grid, parse_method, replay_search
from search.space import grid_points

GRID = Path(__file__).resolve().parents[1] / "data" / "grid-tiny"


def _table() -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(GRID / C.TRIALS_FILE), pd.read_parquet(GRID / C.EPOCHS_FILE)


def test_the_grid_is_what_its_files_say():
    trials, epochs = _table()
    grid = load_grid(GRID)
    assert len(grid.curves) == len(trials) == 11
    assert grid.epochs == len(epochs) == 8 * 2 + 3
    assert grid.best == epochs.top1.max()
    ranking = pd.read_parquet(GRID / C.TRANSFERABILITY_FILE)
    # the ranking's CPU seconds (one backbone) over the grid's mean CPU seconds per epoch
    assert grid.ranking_epochs == pytest.approx(
        ranking.backbone_cpu_seconds.iloc[0] / epochs.seconds.mean())


def test_a_replayed_grid_pays_each_point_its_recorded_epochs_in_grid_order():
    trials, epochs = _table()
    grid = load_grid(GRID)
    curves = epochs.sort_values("epoch").groupby("trial_id").top1.apply(list)
    # by hand: walk ftsearch's own grid order, add each point's epochs until the best shows
    spent, reached = 0, None
    for point in grid_points(grid.cfg):
        match = trials
        for key, value in point.items():
            match = match[match[C.config_column(key)] == value]
        curve = curves[match.trial_id.iloc[0]]
        for top1 in curve:
            spent += 1
            if reached is None and top1 >= grid.best - 1:
                reached = spent
    got = replay_search(grid, Method("grid"), seed=0, budget=grid.epochs, target=grid.best - 1)
    assert got == {"best": grid.best, "reached": reached, "trials": 11, "spent": 19,
                   "prior_epochs": 0.0}


def test_the_prior_runs_the_best_sampled_cells_first_and_pays_for_the_ranking():
    trials, epochs = _table()
    grid = load_grid(GRID)
    ranking = grid.ranking.sort_values("rank")
    top = ranking[ranking.in_space].depth.tolist()[:2]
    assert top == [6, 5]  # depth 6: only the linear head reaches it here; 5: logreg
    linear6 = trials[(trials["config.head"] == "linear") & (trials["config.freeze_depth"] == 6)]
    logreg5 = trials[(trials["config.head"] == "logreg") & (trials["config.features_from"] == 5)]
    assert logreg5.best_top1.iloc[0] == grid.best
    # first trial: linear at depth 6 (2 epochs, whatever lr TPE picks); second: logreg on
    # stage 5 (1 epoch), which is the grid's best
    assert len(linear6) == 2 and (linear6.epochs == 2).all()
    got = replay_search(grid, Method("tpe", "asha", prior=True), seed=0, budget=grid.epochs,
                        target=grid.best - 1)
    assert got["prior_epochs"] == pytest.approx(grid.ranking_epochs)
    assert got["reached"] == pytest.approx(grid.ranking_epochs + 2 + 1)


@pytest.mark.parametrize("method", ["random", "tpe", "tpe+asha", "tpe+asha+prior"])
def test_no_search_spends_more_than_its_budget(method):
    grid = load_grid(GRID)
    for seed in range(3):
        got = replay_search(grid, parse_method(method), seed=seed, budget=10, target=101.0)
        assert got["reached"] is None and got["spent"] <= 10 and got["best"] <= grid.best


def test_the_cli_prints_one_line_per_method(capsys):
    assert main(["replay", str(GRID), "--seeds", "2", "--method", "grid",
                 "--method", "tpe+asha+prior"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("grid grid-tiny: 11 points, 19 epochs")
    assert out[1].startswith("transferability ranking:")
    assert out[2].startswith("grid ") and out[3].startswith("tpe+asha+prior ")


def test_replay_refuses_what_is_not_a_finished_grid(tmp_path, capsys):
    copy = tmp_path / "grid"
    shutil.copytree(GRID, copy)
    config = yaml.safe_load((copy / C.CONFIG_FILE).read_text())
    (copy / C.CONFIG_FILE).write_text(yaml.safe_dump({**config, "search": {
        **config["search"], "algorithm": "optuna"}}))
    with pytest.raises(ReplayError, match="needs a grid experiment"):
        load_grid(copy)
    shutil.copy(GRID / C.CONFIG_FILE, copy / C.CONFIG_FILE)
    trials = pd.read_parquet(copy / C.TRIALS_FILE)
    trials.iloc[1:].to_parquet(copy / C.TRIALS_FILE)
    with pytest.raises(ReplayError, match="1 grid point"):
        load_grid(copy)
    assert main(["replay", str(copy), "--method", "bogus"]) == 2
    assert "searcher[+scheduler][+prior]" in capsys.readouterr().err
